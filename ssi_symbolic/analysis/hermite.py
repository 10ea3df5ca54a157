"""Static analysis of a spec: sequence information exponent (SIE) and flatness index
(MATH.md section 5).

SIE of a link g: R^L -> R^K: the smallest k >= 1 such that a Hermite coefficient
E[g(z) He_alpha(z)], |alpha| = k, is non-zero (z ~ N(0, I_L), He_alpha = prod_l He_{alpha_l}(z_l),
probabilists' Hermite polynomials); for vector or matrix links, the minimum over the entries.
A link without any non-zero coefficient of order >= 1 (a constant) has no finite SIE: reported as
``None`` (infinity).

* Exact (polynomial links): the coefficients of hermite_exact.py (each monomial written in the
  Hermite basis). Parameters stay symbolic unless values are given; a coefficient that is
  non-zero as an expression counts as non-zero (``parameter_dependent`` says when every
  coefficient of the leading order involves parameters, so that special parameter values may
  raise the SIE).
* Numerical (any other link): the coefficients of hermite_numeric.py (additive terms, products
  over disjoint tokens, leaves integrated in the dimensions of their linear forms with
  Gauss-Legendre panels split at the kinks or tensor Gauss-Hermite), orders 1..kmax formed until
  the first clearly non-zero one. Every coefficient carries an error estimate; it counts as
  non-zero when it exceeds both ``tol`` times the link's L2 norm and SAFETY times its error
  estimate. A term with kinks along several directions keeps tensor Gauss-Hermite (slow,
  algebraic convergence), and the result's note says so.

Every coefficient reported is the Hermite coefficient of the definition, E[g He_alpha]
(= alpha! times the coefficient of He_alpha in the expansion of g).

Flatness index: the lowest order of a non-zero derivative at the origin of the population loss R,
jointly in the overlaps (m, e_a) (q = 1 for plain SGD). When R is in closed form (polynomial
links, and the closed-form Gaussian expectations of symbolic/closed_forms.py: relu, Abs, erf, ...)
it is a polynomial (or analytic function) of the state and the homogeneous parts of its Taylor
expansion are read off exactly, with the parameters kept symbolic (``flatness_at_defaults`` gives
the value at the defaults when parameters exist). When R contains quadrature nodes, R is evaluated
from the generated module along lines through the origin at two quadrature levels, fitted by
polynomials, and each Taylor coefficient is tested against a tolerance and its error estimate
(method "numerical"; the quadrature nodes are doubled, up to twice, when the test is
inconclusive). The generated modules split their quadrature at the kinks they can locate; a kink
they cannot split converges slowly: the reported error estimates say how far the numerical
answers can be trusted.

`static_analysis` puts both together (the JSON of `ssi sie`). The exact and numerical coefficient
functions (hermite_coefficients, monomial_to_hermite, numerical_coefficients) are re-exported
here.

Several directions (MATH.md section 8): `leap_analysis` expands the teacher link in its K* L
fields z{k}_{l} (independent standard Gaussians when the teacher directions are orthonormal,
P = identity), by the same exact or numerical machinery, and reads off the information exponent
of each teacher direction (the lowest order of a non-zero coefficient involving that direction
only) and the leap structure (Abbe, Boix-Adsera, Misiakiewicz 2023, Gaussian leaps with Hermite
degrees; `leap_structure`). `static_analysis` of such a spec returns that report
(`multi_static_analysis`); the student link and the flatness of R are not analysed there.
"""
from __future__ import annotations

import itertools
import math
import time

import numpy as np
import sympy as sp

from ..model.spec import ModelSpec, link_variables, parse_link, token_symbols
from .hermite_exact import (_entries, _exact_coefficients, _is_polynomial, _nonzero,
                            _param_values, hermite_coefficients, monomial_to_hermite)
from .hermite_numeric import QUAD_TOL, _full_order, _numeric_tree, numerical_coefficients

#: A numerical coefficient counts as non-zero only above SAFETY times its error estimate.
SAFETY = 10.0


# ---------------------------------------------------------------------------------------------
# SIE

def _clearly_nonzero(value: float, error: float, threshold: float) -> bool:
    """The numerical methods' test for a non-zero Hermite coefficient: |value| above both the
    absolute threshold (tol times the link's L2 norm) and SAFETY times its error estimate."""
    return abs(value) > max(threshold, SAFETY * error)


def _label(i: int, n: int, alpha) -> str:
    return f"{alpha}" if n == 1 else f"[{i}] {alpha}"


def _numeric_details(trees, quad_tol: float):
    """(rules, nodes, method note) of numerical Hermite trees [(root, context, norm)]: the rules
    of the numerically integrated terms, the nodes per dimension ({dimension: [fine, coarse]})
    and a note saying which quadratures were used."""
    rules = [r for _, ctx, _ in trees for r in ctx.rules]
    notes = list(dict.fromkeys(x for _, ctx, _ in trees for x in ctx.notes))
    nodes = {}
    for r in rules:
        lv = r["nodes"] if r["rule"] == "gauss-legendre" else r["nodes_per_dimension"][:2]
        old = nodes.get(str(r["dimension"]), [0, 0])
        nodes[str(r["dimension"])] = [max(old[0], lv[0]), max(old[1], lv[1])]
    kinds = []
    if any(r["rule"] == "gauss-legendre" for r in rules):
        kinds.append("one-dimensional Gauss-Legendre, panels split at the kinks, nodes "
                     f"doubled to the tolerance {quad_tol:g}")
    if any(r["rule"] == "gauss-legendre x gauss-hermite" for r in rules):
        kinds.append("kinks along one direction: Gauss-Legendre panels across it, "
                     "Gauss-Hermite along the others")
    if any(r["rule"] == "gauss-hermite" for r in rules):
        kinds.append("tensor Gauss-Hermite over the linear forms a term depends on")
    if any(r.get("linear_forms") for r in rules):
        kinds.append("coefficients over the linear forms of a term projected onto the "
                     "tokens")
    method_note = "; ".join(["exact polynomial terms, products over disjoint tokens"]
                            + kinds + notes)
    return rules, nodes, method_note


def sie(link, L: int, params=None, kmax: int = 8, tol: float = 1e-8,
        method: str = "auto", quad_tol: float = QUAD_TOL) -> dict:
    """Sequence information exponent of a link (MATH.md section 5).

    link: SymPy expression or Matrix in z1..zL, or a link string; params: {name: value}
    substituted first (needed for the numerical method; the exact method keeps missing
    parameters symbolic). method: "auto" (exact when every entry is polynomial in the tokens,
    else numerical), "exact" or "numerical". kmax, tol: numerical method only (orders 1..kmax
    checked; coefficients below tol times the link's L2 norm, or below 10 times their quadrature
    error estimate, count as zero).

    quad_tol: numerical method, the absolute accuracy each one-dimensional rule is refined to.

    Returns a JSON-able dict: "sie" (int, or None when no non-zero coefficient of order >= 1
    exists -- constant link, SIE infinite -- or, numerically, none up to kmax), "method",
    "tolerance" (None for exact), "coefficients" ({str(alpha): value} at the SIE order; keys
    "[i] alpha" for entry i of a vector/matrix link), "entries" (per-entry SIE), "note",
    and method-specific keys (exact: "degree", "parameter_dependent"; numerical:
    "absolute_tolerance", "quadrature_tolerance", "l2_norm", "quadrature_error" (the largest
    error estimate of orders 1..SIE), "coefficient_errors" (per reported coefficient), "rules"
    (one per numerically integrated term: its dimension, linear forms, rule, nodes, kinks),
    "nodes" ({dimension: [fine, coarse]}: total nodes of one-dimensional rules, nodes per
    dimension of the others), "kmax")."""
    t0 = time.perf_counter()
    zs = token_symbols(L)
    entries = _entries(link, L, params)
    poly = all(_is_polynomial(x, zs) for x in entries)
    if method == "auto":
        method = "exact" if poly else "numerical"
    if method not in ("exact", "numerical"):
        raise ValueError(f"method must be 'auto', 'exact' or 'numerical', got {method!r}")
    n = len(entries)
    if method == "exact":
        if not poly:
            raise ValueError("exact SIE needs a link polynomial in the tokens")
        per = [_exact_coefficients(x, zs) for x in entries]
        orders = [min((sum(a) for a in d if sum(a) >= 1), default=None) for d in per]
        finite = [k for k in orders if k is not None]
        k = min(finite) if finite else None
        coefs = {}
        if k is not None:
            for i, d in enumerate(per):
                for a in sorted(d):
                    if sum(a) == k:
                        coefs[_label(i, n, a)] = d[a]
        dep = bool(coefs) and all(c.free_symbols for c in coefs.values())
        degree = max((sp.Poly(x, *zs).total_degree() for x in entries), default=0)
        out = {"sie": k, "method": "exact", "tolerance": None,
               "coefficients": {key: str(c) for key, c in coefs.items()},
               "entries": orders, "degree": int(degree), "parameter_dependent": dep,
               "note": ("constant link: no non-zero Hermite coefficient of order >= 1 "
                        "(SIE infinite)" if k is None else
                        "exact Hermite expansion" + ("; every leading coefficient depends on "
                                                    "the parameters" if dep else ""))}
    else:
        for x in entries:
            extra = sorted(str(s) for s in x.free_symbols if s not in zs)
            if extra:
                raise ValueError(f"numerical SIE needs values for the parameters {extra} "
                                 f"(pass params={{name: value}})")
        trees = [_numeric_tree(x, list(zs), kmax, quad_tol) for x in entries]
        norm = math.sqrt(sum(t[2] ** 2 for t in trees))
        thr = tol * norm

        def clear(v, e):
            return _clearly_nonzero(v, e, thr)

        orders = []
        for root, _, _ in trees:  # orders formed lazily: up to the first clear coefficient
            orders.append(next((kk for kk in range(1, kmax + 1)
                                if any(clear(v, e) for v, e in root.order(kk).values())), None))
        finite = [kk for kk in orders if kk is not None]
        k = min(finite) if finite else None
        top = k if k is not None else kmax
        coefs, errors, qerr = {}, {}, 0.0
        for i, (root, _, _) in enumerate(trees):
            for kk in range(1, top + 1):
                d = _full_order(root, kk, L)
                qerr = max([qerr] + [e for _, e in d.values()])
                if kk == k:
                    for a in sorted(d):
                        v, e = d[a]
                        if clear(v, e):
                            coefs[_label(i, n, a)] = float(v)
                            errors[_label(i, n, a)] = float(e)
        rules, nodes, method_note = _numeric_details(trees, quad_tol)
        if k is None:
            note = (f"no non-zero Hermite coefficient of order 1..{kmax}: constant link (SIE "
                    f"infinite) or SIE > {kmax}" if norm > 0 else "zero link (SIE infinite)")
            note += "; " + method_note
        else:
            note = method_note
        out = {"sie": k, "method": "numerical", "tolerance": tol,
               "absolute_tolerance": thr, "quadrature_tolerance": quad_tol, "l2_norm": norm,
               "quadrature_error": qerr, "nodes": nodes, "rules": rules, "kmax": kmax,
               "coefficients": coefs, "coefficient_errors": errors, "entries": orders,
               "note": note}
    out["seconds"] = time.perf_counter() - t0
    return out


# ---------------------------------------------------------------------------------------------
# flatness

def _state_split(D):
    xs = [s for s in D.state if str(s) != "q"]
    qs = [s for s in D.state if str(s) == "q"]
    return xs, qs


def _homogeneous_parts(R, xs, kmax):
    """({k: degree-k homogeneous part} of R's Taylor expansion at 0, complete?) (exact);
    complete is True when R is a polynomial (all parts listed), False for a series to kmax."""
    if R.is_polynomial(*xs):
        P = sp.Poly(sp.expand(R), *xs)
        parts = {}
        for monom, c in P.terms():
            term = c
            for x, e in zip(xs, monom):
                term = term * x ** e
            parts[sum(monom)] = parts.get(sum(monom), 0) + term
        return parts, True
    t = sp.Dummy("t")
    Rt = R.xreplace({x: t * x for x in xs})
    ser = sp.series(Rt, t, 0, kmax + 1).removeO()
    return {k: sp.expand(ser.coeff(t, k)) for k in range(kmax + 1)}, False


def _first_nonzero(parts, kmax):
    for k in sorted(parts):
        if 1 <= k and _nonzero(parts[k]):
            return k, sp.expand(parts[k])
    return None, None


def _flatness_exact(spec, D, kmax):
    xs, qs = _state_split(D)
    R = D.population_loss.xreplace({q: sp.Integer(1) for q in qs})
    parts, complete = _homogeneous_parts(R, xs, kmax)
    k, lead = _first_nonzero(parts, kmax)
    out = {"flatness": k, "method": "exact", "leading_terms": str(lead) if k else "",
           "variables": [str(x) for x in xs]}
    if spec.parameters:
        vals = {sp.Symbol(p, real=True): v for p, v in spec.parameters.items()}
        kd, lead_d = _first_nonzero({j: p.xreplace(vals) for j, p in parts.items()}, kmax)
        out["flatness_at_defaults"] = kd
        out["leading_terms_at_defaults"] = str(lead_d) if kd else ""
    if k is None:
        out["note"] = ("R is constant in (m, e): no non-zero derivative at the origin"
                       if complete else
                       f"no non-zero derivative up to order {kmax}")
    return out


def _monomials(nvar, k):
    return [m for m in itertools.product(range(k + 1), repeat=nvar) if sum(m) == k]


#: Flatness (numerical): a Taylor coefficient is non-zero above this times its error estimate.
FLAT_SAFETY = 4.0
#: Flatness (numerical): at most this many doublings of the quadrature nodes when inconclusive,
#: each only while the predicted evaluation time stays under REFINE_SECONDS.
MAX_REFINE = 2
REFINE_SECONDS = 10.0


def _flatness_numerical(spec, D, out_dir, kmax, tol, radius, nodes=None):
    """Numerical flatness: R(t u) for unit directions u (the axes and random ones; u = 1 alone
    for one variable) and t at Chebyshev nodes in radius * ([-1, -1/5] U [1/5, 1]) (away from the
    origin, where a kink of the integrand crosses the quadrature grid and the quadrature error
    is not smooth), two quadrature levels (coarse, fine nodes per dimension: `nodes`, default the
    module's n0 and 2 n0, as its quadrature_error), least-squares polynomial fits of degrees
    2..kmax + 4. The module: the full one when it is up to date, else the drift-only one.
    For each order k the fit degree with the smallest error estimate (fine - coarse, plus
    degree D vs D + 2) is used; c_k is non-zero when |c_k| > max(tol * ptp(R), FLAT_SAFETY * err).
    When a lower-order coefficient is above the tolerance and its error but below the safety
    margin (inconclusive), the nodes are doubled (at most MAX_REFINE times, and only while the
    predicted time stays under REFINE_SECONDS); "inconclusive" reports what remains."""
    from ..backends.registry import links_module

    xs, _ = _state_split(D)
    nx = len(xs)
    xnames = [str(x) for x in xs]
    # R only is needed: the full module when it is up to date, else the drift-only one (no
    # Cov(G) derivation, which dominates the generation time)
    mod = links_module(spec, out_dir)
    names = [str(s) for s in D.state]
    quad = mod.METHOD == "quadrature"
    n0 = int(mod.QUADRATURE_NODES)
    deg = kmax + 4
    cheb = np.cos(np.pi * (np.arange(96) + 0.5) / 96)
    s = cheb[np.abs(cheb) >= 0.2]
    rng = np.random.default_rng(12345)

    def directions(count):
        u = rng.standard_normal((count, nx))
        return u / np.linalg.norm(u, axis=1, keepdims=True)

    def evaluate(U, n_nodes):
        pts = radius * U[:, None, :] * s[None, :, None]  # (ndir, npts, nx)
        args = [np.ones(pts.shape[:2]) if nm == "q" else pts[:, :, xnames.index(nm)]
                for nm in names]
        old = mod.QUADRATURE_NODES
        if n_nodes is not None:
            mod.QUADRATURE_NODES = n_nodes
        try:
            t0 = time.perf_counter()
            vals = np.broadcast_to(np.asarray(mod.population_loss(*args), dtype=float),
                                   pts.shape[:2])
            return vals, time.perf_counter() - t0
        finally:
            if old is not None:
                mod.QUADRATURE_NODES = old

    def taylor(vals, degree):
        """Power coefficients c_k in the scaled variable s = t / radius, per direction."""
        out = np.zeros((len(vals), deg + 3))
        for i, v in enumerate(vals):
            p = np.polynomial.chebyshev.cheb2poly(np.polynomial.chebyshev.chebfit(s, v, degree))
            out[i, :len(p)] = p
        return out

    degrees = list(range(2, deg + 1))

    def analyse(fine, coarse):
        """First order k with a clearly non-zero Taylor coefficient (above the tolerance and
        FLAT_SAFETY times its error estimate); per order the chosen fit degree and error
        estimate; `ambiguous` when some order < k (<= kmax if none) has a coefficient above
        the tolerance and above its error estimate, but not FLAT_SAFETY times above it."""
        cf = {d: taylor(fine, d) for d in range(2, deg + 3)}
        cc = {d: taylor(coarse, d) for d in degrees} if quad else cf
        thr = tol * float(np.ptp(fine))
        k, chosen, errs, ambiguous = None, {}, {}, False
        for j in range(1, kmax + 1):
            best = None
            for d in degrees:
                if d < j:
                    continue
                e = np.abs(cf[d][:, j] - cc[d][:, j]) + np.abs(cf[d][:, j] - cf[d + 2][:, j])
                if best is None or e.max() < best[1].max():
                    best = (d, e)
            d, e = best
            chosen[j], errs[j] = d, float(e.max())
            c = np.abs(cf[d][:, j])
            if np.any(c > np.maximum(thr, FLAT_SAFETY * e)):
                k = j
                break
            if np.any((c > thr) & (c > e)):  # above its error, not clearly: inconclusive
                ambiguous = True
        return k, chosen, errs, ambiguous, cf, thr

    # one state variable: the line through the origin is the whole state space (t takes both
    # signs), so one direction; else the axes and nx + 3 random directions
    U = np.ones((1, 1)) if nx == 1 else np.vstack([np.eye(nx), directions(nx + 3)])
    refinements = 0
    if quad:
        levels = [int(n) for n in (nodes or (n0, 2 * n0))]
        coarse, t_coarse = evaluate(U, levels[0])
        fine, t_fine = evaluate(U, levels[1])
        k, chosen, errs, ambiguous, cf, thr = analyse(fine, coarse)
        # inconclusive: double the nodes (the old fine level becomes the coarse one), at most
        # MAX_REFINE times and while the predicted evaluation time stays under REFINE_SECONDS
        while (ambiguous and nodes is None and refinements < MAX_REFINE
               and t_fine * max(t_fine / max(t_coarse, 1e-6), 2.0) < REFINE_SECONDS):
            levels = [levels[1], 2 * levels[1]]
            coarse, t_coarse = fine, t_fine
            fine, t_fine = evaluate(U, levels[1])
            k, chosen, errs, ambiguous, cf, thr = analyse(fine, coarse)
            refinements += 1
    else:
        fine, _ = evaluate(U, None)
        levels = None
        k, chosen, errs, ambiguous, cf, thr = analyse(fine, fine)
    top = k if k is not None else kmax
    out = {"flatness": k, "method": "numerical", "tolerance": tol, "absolute_tolerance": thr,
           "safety": FLAT_SAFETY, "radius": radius,
           "fit_degrees": {str(j): chosen[j] for j in sorted(chosen)},
           "directions": int(len(U)), "quadrature_nodes": levels, "refinements": refinements,
           "error_estimate": max((errs[j] for j in range(1, top + 1) if j in errs), default=0.0),
           "inconclusive": bool(ambiguous), "variables": xnames, "leading_terms": ""}
    if ambiguous:
        out["note"] = ("some Taylor coefficient of order < %s exceeds the tolerance and its "
                       "error estimate, but not by the safety factor: the flatness may be "
                       "lower; pass nodes=(n, 2n) with more quadrature nodes" % (k or kmax + 1))
    if k is None:
        out["note"] = (out.get("note", "") + "; " if ambiguous else "") + \
            f"no non-zero derivative of order 1..{kmax} detected"
        return out
    # leading homogeneous part P_k(x) = sum_mono a_mono x^mono, from P_k(u) = c_k(u) / radius^k
    d = chosen[k]
    monos = _monomials(nx, k)
    need = 1 if nx == 1 else int(1.5 * len(monos)) + 2
    ck = cf[d][:, k]
    if len(U) < need:
        U2 = directions(need - len(U))
        ck = np.concatenate([ck, taylor(evaluate(U2, levels[-1] if quad else None)[0], d)[:, k]])
        U = np.vstack([U, U2])
    A = np.array([[np.prod(u ** np.array(mn)) for mn in monos] for u in U])
    a, *_ = np.linalg.lstsq(A, ck / radius ** k, rcond=None)
    cut = max(thr, errs[k]) / radius ** k  # terms below the error estimate are dropped
    out["leading_terms_error"] = errs[k] / radius ** k
    terms = []
    for mn, c in zip(monos, a):
        if abs(c) > cut:
            mono = "*".join(f"{x}**{e}" if e > 1 else x for x, e in zip(xnames, mn) if e)
            terms.append(f"{c:+.6g}*{mono}")
    out["leading_terms"] = " ".join(terms).lstrip("+")
    return out


def flatness(spec: ModelSpec, out_dir="generated", kmax: int = 8, tol: float = 1e-6,
             method: str = "auto", radius: float = 0.5, nodes=None) -> dict:
    """Flatness index of a spec: the lowest order k >= 1 of a non-zero derivative of the
    population loss R at the origin, jointly in (m, e_a); q = 1 for plain SGD.

    method "auto": exact when the derivation is in closed form (D.method == "exact"), else
    numerical from the generated module (links_module(spec, out_dir): the full module when it is
    up to date, else the drift-only one, generated if needed). Exact: parameters kept
    symbolic (a Taylor coefficient non-zero as an expression counts), plus
    "flatness_at_defaults". Numerical (parameters at their defaults): R along lines through
    the origin (the axes and random directions, radius/5 <= |x| <= radius) at two quadrature
    levels (nodes = (coarse, fine) per dimension, default the module's (n0, 2 n0), doubled
    automatically when inconclusive), least-squares polynomial fits; a Taylor coefficient is
    non-zero when it exceeds tol times the variation of R on the sample and FLAT_SAFETY times
    its error estimate (fine vs coarse quadrature, fit degree D vs D + 2).

    Returns {"flatness": k or None, "method", "leading_terms" (the degree-k homogeneous part of R
    as a string), "variables", "seconds", ...}; numerical adds "tolerance",
    "absolute_tolerance", "error_estimate", "quadrature_nodes", "refinements", "inconclusive",
    "fit_degrees", "leading_terms_error"."""
    from ..backends.registry import backend_for
    from ..symbolic.derive import derive
    from ..symbolic.gaussian import has_quadrature

    t0 = time.perf_counter()
    if backend_for(spec).name == "attention":
        from .attention import flatness as attention_flatness
        return attention_flatness(spec, out_dir)
    D = derive(spec, diffusion=False)
    if method == "auto":
        method = ("exact" if D.method == "exact" and not has_quadrature(D.population_loss)
                  else "numerical")
    if method == "exact":
        if has_quadrature(D.population_loss):
            raise ValueError("exact flatness needs a closed-form population loss")
        out = _flatness_exact(spec, D, kmax)
    elif method == "numerical":
        out = _flatness_numerical(spec, D, out_dir, kmax, tol, radius, nodes)
    else:
        raise ValueError(f"method must be 'auto', 'exact' or 'numerical', got {method!r}")
    out["seconds"] = time.perf_counter() - t0
    return out


# ---------------------------------------------------------------------------------------------
# several teacher directions: information exponent per direction and leap structure

def _field_label(alpha, zs) -> str:
    """"z1_1^1 z2_1^2" for the multi-index alpha over the fields zs."""
    return " ".join(f"{z}^{a}" for z, a in zip(zs, alpha) if a)


def direction_degrees(alpha, Ks: int, L: int) -> tuple:
    """(d_1, .., d_K*): the degree of the multi-index alpha over the fields z{k}_{l} (flattened
    direction by direction) in each teacher direction, d_k = sum_l alpha_{k,l}."""
    return tuple(sum(alpha[k * L:(k + 1) * L]) for k in range(Ks))


def leap_structure(degrees, Ks: int) -> dict:
    """Information exponents per direction and the leaps of a multi-index target from the
    per-direction degrees (d_1, .., d_K*) of its non-zero Hermite coefficients.

    Information exponent of direction k: the smallest |alpha| of a non-zero coefficient whose
    support is {k} (None when there is none). Leaps (Gaussian leap with Hermite degrees, Abbe,
    Boix-Adsera and Misiakiewicz 2023): from U = {}, among the alpha whose support is not inside
    U the cost sum_{k not in U} d_k is minimised; the step's leap is the minimal cost and the
    directions outside U in the support of a minimal-cost alpha are learnt; repeated until no
    alpha is left. Returns {"information_exponents": {"k": int|None}, "leaps": [{"step",
    "leap", "directions"}], "leap_complexity": int|None, "unreachable": [k]}, directions
    1-based."""
    degs = {tuple(int(x) for x in d) for d in degrees if any(d)}
    ie = {}
    for d in degs:
        supp = [k for k in range(Ks) if d[k]]
        if len(supp) == 1:
            k = supp[0]
            ie[k] = min(ie.get(k, d[k]), d[k])
    learnt, steps = set(), []
    while True:
        cand = []
        for d in degs:
            new = {k for k in range(Ks) if d[k] and k not in learnt}
            if new:
                cand.append((sum(d[k] for k in new), new))
        if not cand:
            break
        leap = min(c for c, _ in cand)
        new = set().union(*(s for c, s in cand if c == leap))
        learnt |= new
        steps.append({"step": len(steps) + 1, "leap": leap,
                      "directions": [k + 1 for k in sorted(new)]})
    return {"information_exponents": {str(k + 1): ie.get(k) for k in range(Ks)},
            "leaps": steps,
            "leap_complexity": max((s["leap"] for s in steps), default=None),
            "unreachable": [k + 1 for k in range(Ks) if k not in learnt]}


_LEAP_NOTE = ("information exponent of direction k: the lowest order of a non-zero Hermite "
              "coefficient of the teacher link involving the fields of direction k only "
              "(learning k from a start where no direction is learnt); leaps: Gaussian leaps "
              "with Hermite degrees (Abbe, Boix-Adsera, Misiakiewicz 2023) over the teacher "
              "directions, assumed orthonormal (fields independent standard Gaussians); the "
              "student link is not analysed")


def leap_analysis(link, Ks: int, L: int, params=None, kmax: int = 8, tol: float = 1e-8,
                  method: str = "auto", quad_tol: float = QUAD_TOL) -> dict:
    """Information exponents per teacher direction and leap structure of a link in the fields
    z{k}_{l} of K* orthonormal directions at L tokens (MATH.md section 8), from its Hermite
    expansion in the K* L independent standard Gaussian fields.

    link: SymPy expression or Matrix in the fields, or a link string; params: {name: value}
    substituted first (needed for the numerical method). method: "auto" (exact when every
    entry is polynomial in the fields, else numerical), "exact" or "numerical"; kmax, tol,
    quad_tol as in `sie` (numerical: every order 1..kmax formed, a coefficient non-zero above
    tol times the L2 norm and SAFETY times its error estimate). A vector or matrix link: a
    multi-index counts when the coefficient of any entry is non-zero.

    Returns the keys of `leap_structure` and "method", "kmax" (the highest order examined:
    numerical the argument, exact the link's degree, where every coefficient is known),
    "tolerance" (None for exact), "coefficients" ({label: value} of every non-zero
    coefficient of order >= 1, label "z1_1^1 z2_1^1", "[i] ..." for entry i of a vector link;
    strings for exact, floats for numerical), "coefficient_errors" (numerical), "note",
    "seconds"."""
    t0 = time.perf_counter()
    zs = link_variables(L, Ks)
    values = _param_values(params)
    if isinstance(link, str):
        link = parse_link(link, L, list(values), "link", Ks)
    entries = _entries(link, L, params)
    poly = all(_is_polynomial(x, zs) for x in entries)
    if method == "auto":
        method = "exact" if poly else "numerical"
    if method not in ("exact", "numerical"):
        raise ValueError(f"method must be 'auto', 'exact' or 'numerical', got {method!r}")
    n = len(entries)

    def label(i, a):
        key = _field_label(a, zs)
        return key if n == 1 else f"[{i}] {key}"

    coefs, errors, alphas = {}, {}, set()
    if method == "exact":
        if not poly:
            raise ValueError("the exact leap analysis needs a link polynomial in the fields")
        found = []
        for i, x in enumerate(entries):
            for a, c in _exact_coefficients(x, zs).items():
                if sum(a) >= 1:
                    found.append((i, a, c))
        for i, a, c in sorted(found, key=lambda t: (sum(t[1]), [-x for x in t[1]], t[0])):
            alphas.add(a)
            coefs[label(i, a)] = str(c)
        top = max((sp.Poly(x, *zs).total_degree() for x in entries), default=0)
        note = "exact Hermite expansion; " + _LEAP_NOTE
    else:
        for x in entries:
            extra = sorted(str(s) for s in x.free_symbols if s not in zs)
            if extra:
                raise ValueError(f"numerical leap analysis needs values for the parameters "
                                 f"{extra} (pass params={{name: value}})")
        trees = [_numeric_tree(x, list(zs), kmax, quad_tol) for x in entries]
        norm = math.sqrt(sum(t[2] ** 2 for t in trees))
        thr = tol * norm
        found = []
        for i, (root, _, _) in enumerate(trees):
            for kk in range(1, kmax + 1):
                for a, (v, e) in _full_order(root, kk, len(zs)).items():
                    if _clearly_nonzero(v, e, thr):
                        found.append((i, a, float(v), float(e)))
        for i, a, v, e in sorted(found, key=lambda t: (sum(t[1]), [-x for x in t[1]], t[0])):
            alphas.add(a)
            coefs[label(i, a)] = v
            errors[label(i, a)] = e
        top = kmax
        _, _, method_note = _numeric_details(trees, quad_tol)
        note = (f"numerical Hermite coefficients of orders 1..{kmax} only: an information "
                f"exponent or a leap larger than kmax = {kmax} is not seen; a coefficient "
                f"counts when above {tol:g} times the L2 norm and {SAFETY:g} times its error "
                f"estimate; " + _LEAP_NOTE + "; " + method_note)
    out = leap_structure([direction_degrees(a, Ks, L) for a in alphas], Ks)
    out.update({"method": method, "kmax": int(top),
                "tolerance": tol if method == "numerical" else None,
                "coefficients": coefs})
    if method == "numerical":
        out["coefficient_errors"] = errors
    out["note"] = note
    out["seconds"] = time.perf_counter() - t0
    return out


# ---------------------------------------------------------------------------------------------
# the `ssi sie` report

def _sie_of_spec_link(link, spec: ModelSpec, kmax: int, tol: float) -> dict:
    zs = token_symbols(spec.L)
    defaults = dict(spec.parameters)
    if all(_is_polynomial(x, zs) for x in _entries(link, spec.L)):
        res = sie(link, spec.L, kmax=kmax, tol=tol)
        if defaults:
            res["sie_at_defaults"] = sie(link, spec.L, params=defaults)["sie"]
        return res
    return sie(link, spec.L, params=defaults, kmax=kmax, tol=tol)


def static_analysis(spec: ModelSpec, out_dir="generated", kmax: int = 8,
                    tol: float = 1e-8) -> dict:
    """The JSON of `ssi sie SPEC --json`: SIE of the teacher link, flatness index of R at the
    origin and the method ("exact" when both are exact, else "numerical"), with details.

    Keys: name, sie, flatness, method, sie_method, flatness_method, sie_tolerance,
    sie_coefficients, sie_note, student_sie, student_sie_method, leading_terms,
    flatness_details, sie_seconds (teacher and student SIE), flatness_seconds, seconds (and
    sie_at_defaults / flatness_at_defaults with parameters).

    A spec with several directions (spec.multi, MATH.md section 8) gets the report of
    `multi_static_analysis` instead (information exponents per teacher direction and leaps)."""
    if spec.multi:
        return multi_static_analysis(spec, kmax=kmax, tol=tol)
    t0 = time.perf_counter()
    teacher = _sie_of_spec_link(spec.teacher, spec, kmax, tol)
    if spec.student == spec.teacher:
        student = teacher
    else:
        student = _sie_of_spec_link(spec.student, spec, kmax, tol)
    sie_seconds = time.perf_counter() - t0
    flat = flatness(spec, out_dir=out_dir, kmax=kmax)
    both_exact = teacher["method"] == "exact" and flat["method"] == "exact"
    out = {"name": spec.name, "sie": teacher["sie"], "flatness": flat["flatness"],
           "method": "exact" if both_exact else "numerical",
           "sie_method": teacher["method"], "flatness_method": flat["method"],
           "sie_tolerance": teacher.get("tolerance"),
           "sie_coefficients": teacher["coefficients"], "sie_note": teacher["note"],
           "student_sie": student["sie"], "student_sie_method": student["method"],
           "leading_terms": flat.get("leading_terms", "")}
    if "sie_at_defaults" in teacher:
        out["sie_at_defaults"] = teacher["sie_at_defaults"]
    if "flatness_at_defaults" in flat:
        out["flatness_at_defaults"] = flat["flatness_at_defaults"]
    out["flatness_details"] = {k: v for k, v in flat.items()
                               if k not in ("flatness", "method", "leading_terms")}
    out["sie_seconds"] = sie_seconds
    out["flatness_seconds"] = flat.get("seconds")
    out["seconds"] = time.perf_counter() - t0
    return out


def multi_static_analysis(spec: ModelSpec, kmax: int = 8, tol: float = 1e-8) -> dict:
    """The JSON of `ssi sie SPEC --json` for a spec with several directions: information
    exponent of each teacher direction and the leap structure of the teacher link
    (`leap_analysis`, parameters at the spec's defaults); the student link and the flatness of
    R are not analysed. One teacher direction (K* = 1, several student directions) gives the
    same report with one direction. Teacher overlaps P other than the identity are refused
    (SpecError naming teacher.overlaps): the analysis needs independent fields.

    Keys: name, directions ([K*, K]), information_exponents ({"k": int|None}), leaps
    ([{"step", "leap", "directions"}]), leap_complexity, unreachable, method, kmax, tolerance,
    coefficients, coefficient_errors (numerical), note, seconds."""
    from ..errors import SpecError
    t0 = time.perf_counter()
    Ks = spec.teacher_directions
    P = spec.teacher_overlaps
    if any(P[i][j] != int(i == j) for i in range(Ks) for j in range(Ks)):
        raise SpecError(f"{spec.where('teacher.overlaps')}: the information exponents and leaps "
                        f"of `ssi sie` need orthonormal teacher directions (P = identity), got "
                        f"P = {[[str(c) for c in row] for row in P]}")
    try:
        res = leap_analysis(spec.teacher, Ks, spec.L, params=dict(spec.parameters),
                            kmax=kmax, tol=tol)
    except ValueError as exc:
        if isinstance(exc, SpecError):
            raise
        raise SpecError(f"{spec.where('teacher.link')}: {exc}") from None
    if spec.parameters:
        res["note"] = ("parameters at their defaults ("
                       + ", ".join(f"{k} = {v}" for k, v in spec.parameters.items()) + "); "
                       + res["note"])
    out = {"name": spec.name, "directions": [Ks, spec.student_directions]}
    for key in ("information_exponents", "leaps", "leap_complexity", "unreachable", "method",
                "kmax", "tolerance", "coefficients", "coefficient_errors", "note"):
        if key in res:
            out[key] = res[key]
    out["seconds"] = time.perf_counter() - t0
    return out


__all__ = ["hermite_coefficients", "numerical_coefficients", "sie", "flatness",
           "static_analysis", "monomial_to_hermite", "leap_analysis", "leap_structure",
           "direction_degrees", "multi_static_analysis"]
