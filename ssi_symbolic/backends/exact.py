"""The exact backend: a Derivation becomes generated/<name>.py, a plain NumPy/SciPy module.

The module imports only numpy and scipy, broadcasts over arrays of states and parameter values,
and computes every function after one common-subexpression elimination over all the module's
outputs (each function then evaluates only the shared subexpressions it needs). Expectations that
have no closed form are printed as tensor trapezoidal rules with the Gaussian weight over their
own variables (nodes over the same variables, needed first by the same kind of output, in
groups: one pass over the grid and one cse for all their integrands); orthant probabilities
(closed_forms.NormalOrthant, Plackett integrals) as one batched runtime._orthants call per
function and kind, after the subexpressions their arguments need.
A header records where the formulas came from and the sha256 of the spec and tool version;
:func:`ensure_module` regenerates only when that hash changes, and every write is atomic.

Generated module API (all functions broadcast):

    population_loss(*state, **params)            R
    drift_eta1(*state, **params)                 tuple: E[G1_i]
    drift_eta2(*state, **params)                 tuple: E[G2_i]
    drift(*state, eta, **params)                 tuple: eta E[G1_i] + eta^2 E[G2_i]
    covariance(*state, eta, **params)            nested tuple: Cov(G)_ij
    diffusion(*state, eta, d, **params)          numpy array (n, n, ...): Cov(G) / d
    ito_correction(*state, eta, **params)        tuple: d x O(1/d) drift of the spherical rescaling
    finite_d_correction(*state, eta, **params)   tuple: d x the whole O(1/d) drift (for the SDE)
    drift_jacobian(*state, eta, **params)        nested tuple: d drift_i / d x_j
    teacher_link(z1..zL, **params), student_link(z1..zL, **params)   tuples of K entries
(drift functions return a tuple even for one overlap, links a tuple even for a scalar link)
    student_link_gradient(z1..zL, **params)      tuple of K tuples of L entries dg_k/dz_l
                                                 (several directions: the fields z{k}_{l})
"""
from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
from pathlib import Path

import sympy as sp
from sympy.printing.str import StrPrinter

from ..version import __version__
from ..model.spec import ModelSpec, link_entries
from ..symbolic.derive import ETA, Derivation, RingForms, derive
from ..symbolic.expectation import kink_breaks
from ..symbolic.closed_forms import NormalOrthant
from ..symbolic.gaussian import GaussHermite, dag_free_symbols, dag_map, holds_delta
from ..background import Background
from .files import module_path, read_hash, write_atomic
from .printing import (closure, cse, expanded_form, forward_jacobian, function_source,
                       hoist_constant_parts, horner, module_header, pycode, tuple_source)
from .ring_printing import RingPrinter
from .node_counts import QUADRATURE_TOLERANCE, choose_nodes
from . import runtime

GENERATOR_VERSION = "1"
DEFAULT_NODES = 40
#: what a drift-only module leaves out
DIFFUSION_PIECES = ("covariance", "diffusion", "ito_correction", "finite_d_correction")


#: the files whose source determines the generated code of this backend
_PIPELINE = ("model/spec.py", "model/links.py", "model/integrability.py", "symbolic/gaussian.py",
             "symbolic/exact_engine.py", "symbolic/directions.py", "symbolic/closed_forms.py",
             "symbolic/expectation.py", "symbolic/derive.py", "symbolic/token_sums.py",
             "symbolic/transfer.py",
             "backends/exact.py", "backends/node_counts.py", "backends/printing.py",
             "backends/ring_printing.py", "backends/runtime.py",
             "backends/files.py", "version.py")


@functools.lru_cache(maxsize=1)
def tool_salt() -> str:
    """What, besides the spec, determines a generated module: the tool version and a hash of
    the pipeline's own source, so any change to the derivation regenerates every module."""
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent.parent
    for name in _PIPELINE:
        h.update((here / name).read_bytes())
    return f"ssi-symbolic {__version__} generator {GENERATOR_VERSION} source {h.hexdigest()[:16]}"


#: exact derivations whose outputs hold at least this many terms in all are printed from the
#: ring (RingPrinter) instead of through SymPy expressions and SymPy's cse
RING_PRINT_TERMS = 20000


def _ring_terms(ring: RingForms) -> int:
    """The number of terms of all the outputs of an exact derivation."""
    outs = ([ring.population_loss] + list(ring.drift_eta1) + list(ring.drift_eta2)
            + list(ring.covariance.values()) + list(ring.ito_correction)
            + list(ring.finite_d_correction))
    return sum(len(p) for p in outs)


#: polynomial drifts of at least this many overlaps get the forward-mode Jacobian
FORWARD_JACOBIAN_STATES = 16


class _NoForwardJacobian(Exception):
    """The forward-mode Jacobian met an unevaluated derivative (state_functions then
    differentiates the drift whole)."""


class _Module:
    """Collects the source of one generated module."""

    def __init__(self, D: Derivation):
        self.D = D
        spec = D.spec
        self.state = [str(s) for s in D.state]
        self.param_args = [f"{p}={float(v)!r}" for p, v in spec.parameters.items()]
        self.param_names = list(spec.parameters)
        self.quad = {}  # GaussHermite node -> placeholder symbol
        self.stage = {}  # placeholder -> the first output kind that needed it (node groups)
        self.orth = {}  # NormalOrthant -> placeholder symbol (see _orthant_lines)
        self.unsplit_kinks = False
        self._groups = None  # see node_groups
        self.group_list = []
        self._break_cache = {}
        #: called once when the quadrature nodes are all extracted, before the cse of the
        #: outputs (module_source starts the node functions and the node choice there)
        self.nodes_ready = None

    # quadrature nodes become placeholders before CSE; each gets its own function
    def _extract(self, expr, orthants: bool = False, stage: str = "jacobian"):
        """expr with its Gauss-Hermite nodes, and with `orthants` its orthant probabilities
        (outputs that are never differentiated: Cov(G), the O(1/d) drift), replaced by
        placeholder symbols."""
        expr = sp.sympify(expr)
        # numbered in order of first appearance (_first_atoms): sorting them by
        # sp.default_sort_key walked every integrand's sums in canonical order, 45 % of the
        # outputs' preparation for gelu((z1 + z2)/sqrt 2)
        nodes = _first_atoms(expr, GaussHermite)
        for n in nodes:
            if n not in self.quad:
                self.quad[n] = sp.Symbol(f"_gh{len(self.quad)}")
                self.stage[self.quad[n]] = stage
        if nodes:
            expr = _dag_replace(expr, self.quad)
        if orthants:
            found = sorted(_first_atoms(expr, NormalOrthant), key=sp.default_sort_key)
            for o in found:
                if o not in self.orth:
                    self.orth[o] = sp.Symbol(f"_o{len(self.orth)}")
            if found:
                expr = _dag_replace(expr, self.orth)
        return expr

    def state_functions(self, printer: str = "auto") -> list[str]:
        """The source of the functions of the state (loss, drift, Cov(G), Jacobian ...).
        printer: "sympy" (SymPy expressions, Horner forms and SymPy's cse), "ring" (the exact
        engine's polynomials printed directly, ring_printing.RingPrinter; exact derivations
        only) or "auto": "ring" for exact derivations of at least RING_PRINT_TERMS terms."""
        D = self.D
        ring = D.ring
        if printer == "auto":
            printer = "ring" if ring is not None and (
                _ring_terms(ring) >= RING_PRINT_TERMS
                or getattr(ring, "token_sums", None) is not None) else "sympy"
        if printer == "ring":
            if ring is None:
                raise ValueError("the ring printer needs an exact derivation (D.ring)")
            return self._assemble(*self._ring_outputs())
        try:
            return self._assemble(*self._sympy_outputs())
        except _NoForwardJacobian:  # an unevaluated derivative: the Jacobian differentiated
            return self._assemble(*self._sympy_outputs(forward_ok=False))  # whole, in the cse

    def _ring_outputs(self):
        """The outputs printed from the exact engine's ring elements (RingPrinter): one
        hash-consed Horner DAG over all outputs, the Jacobian the ring derivatives of the drift."""
        D, ring = self.D, self.D.ring
        n = len(D.state)
        ex = ring.engine
        eta = sp.Symbol("eta", positive=True)
        pr = RingPrinter(ex, list(D.state) + [eta] + list(D.parameters))
        zero = ex.R.zero
        loss = pr.add(ring.population_loss)
        d1 = [pr.add(x) for x in ring.drift_eta1]
        d2 = [pr.add(x) for x in ring.drift_eta2]
        cov = [[None] * n for _ in range(n)]
        for i in range(n):
            for j in range(i, n):
                cov[i][j] = cov[j][i] = pr.add(ring.covariance.get((i, j), zero))
        ito = [pr.add(x) for x in ring.ito_correction or [zero] * n]
        fdc = [pr.add(x) for x in ring.finite_d_correction or [zero] * n]
        g_eta = ex.gen[ETA]
        gens = [ex.gen.get(x) for x in D.state]
        full = [g_eta * a + g_eta ** 2 * b for a, b in zip(ring.drift_eta1, ring.drift_eta2)]
        sums = getattr(ring, "token_sums", None)
        if sums is None:
            jac = [[pr.add(f.diff(g) if g is not None else zero) for g in gens] for f in full]
        else:  # the chain rule through the summed cumulants (token_sums.jacobian_parts)
            jac = []
            for f in full:
                direct, g, dk = sums.jacobian_parts(f, D.state)
                gh = {b: pr.add(v) for b, v in g.items()}
                jac.append([("sum", pr.add(direct[x]),
                             [(gh[b], pr.add(dk[(b, x)])) for b in gh if (b, x) in dk])
                            for x in range(n)])
        pr.finish()
        self.jacobian_method = "symbolic"
        jacobian = ("ring" if sums is None else "ring-sums", jac)

        def code(h):
            if not isinstance(h, tuple):
                return pr.code(h)
            parts = [pr.code(h[1])] + [f"({pr.code(a)})*({pr.code(b)})" for a, b in h[2]]
            parts = [p for p in parts if p != "0"]
            return " + ".join(parts) if parts else "0"

        def lines(handles):
            flat = []
            for h in handles:
                if isinstance(h, tuple):
                    flat.append(h[1])
                    flat.extend(x for pair in h[2] for x in pair)
                else:
                    flat.append(h)
            return pr.lines(flat)
        return loss, d1, d2, cov, ito, fdc, jacobian, code, lines

    def _orthant_lines(self, placeholders) -> list:
        """The assignments of orthant-probability placeholders: one runtime._orthants call per
        dimension and kind (zero or shifted means), all of a kind's integrals evaluated at once
        (a few hundred separate calls of the K = 2 erf committee's Cov(G) cost more in NumPy
        call overhead than in arithmetic)."""
        groups = {}
        for ph in placeholders:
            args = self.orth_args[ph]
            n = 3 if len(args) == 6 else 4
            groups.setdefault((n, all(a == 0 for a in args[:n])), []).append(ph)
        lines = []
        for key in sorted(groups, key=lambda g: (g[0], not g[1])):
            phs = groups[key]
            calls = [tuple_source([pycode(a) for a in self.orth_args[ph]]) for ph in phs]
            lines.append(f"{tuple_source([str(ph) for ph in phs])[1:-1]} = "
                         f"_orthants({', '.join(calls)})")
        return lines

    def _sympy_outputs(self, forward_ok: bool = True):
        """The outputs as SymPy expressions after Horner forms and one cse over all of them.
        forward_ok=False: never the forward-mode Jacobian (after it met an unevaluated
        derivative)."""
        D = self.D
        n = len(D.state)
        loss = self._extract(D.population_loss, stage="loss")
        d1 = [self._extract(x, stage="drift") for x in D.drift_eta1]
        d2 = [self._extract(x, stage="drift") for x in D.drift_eta2]
        cov = [[self._extract(D.covariance[i, j], True, "diffusion") for j in range(n)]
               for i in range(n)]
        flat_cov = [cov[i][j] for i in range(n) for j in range(i, n)]
        ito = [self._extract(x, True, "diffusion") for x in D.ito_correction]
        fdc = [self._extract(x, True, "diffusion") for x in D.finite_d_correction]
        # the orthant probabilities' arguments go through the same cse, after the outputs
        orth = list(self.orth.items())
        orth_args = [horner(a, D.state) for o, _ in orth for a in o.args]
        methods = D.methods or D.output_methods()
        drift_methods = {methods["drift_eta1"], methods["drift_eta2"]}
        # a closed-form drift (arcsine, erf, sqrt ...) is differentiated through the common
        # subexpressions (forward mode, linear in their size; differentiating the expanded
        # drift took 30 s for the K = 2 erf committee), and so is a polynomial drift of many
        # overlaps (its n^2 Poly derivatives, each put in Horner form and through the CSE, took
        # 158 s of the untied L = 16 student's drift-only module; forward mode 29 s, the
        # Jacobian then about 3x slower to evaluate); smaller polynomial drifts by Poly.diff,
        # quadrature drifts whole (derivatives of the quadrature integrands)
        forward = forward_ok and "quadrature" not in drift_methods and (
            "closed form" in drift_methods or n >= FORWARD_JACOBIAN_STATES)

        def eliminate(jac):
            """One CSE over every output, the Jacobian entries `jac` included."""
            if self.nodes_ready is not None:
                self.nodes_ready()
                self.nodes_ready = None
            # an output holding quadrature placeholders in unexpanded products keeps its
            # product form: expanded for a Horner form it was several times longer (a
            # three-token Cov(G) entry: 8 products of sums of ~300 terms -> 4300 terms) and its
            # expansion was the longest step of the module
            phs = set(self.quad.values())
            outputs = [x if phs and not expanded_form(x) and dag_free_symbols(x) & phs
                       else horner(x, D.state)
                       for x in [loss] + d1 + d2 + flat_cov + ito + jac + fdc]
            repl, reduced = cse(outputs + orth_args)
            k = len(outputs)
            it = iter(reduced[k:])
            self.orth_args = {ph: tuple(next(it) for _ in o.args) for o, ph in orth}
            return repl, {s: i for i, (s, _) in enumerate(repl)}, reduced[:k]

        no_jac = [sp.Integer(0)] * (n * n)
        if forward:  # the Jacobian is written from the CSE of the other outputs (_assemble)
            repl, repl_index, reduced = eliminate(no_jac)
        else:
            jac_exprs = list(D.drift_jacobian())
            # a kink (ReLU, |x|) differentiates to a Dirac delta under the integral: such a
            # Jacobian is taken by central differences of the generated drift instead
            self.jacobian_method = ("finite-difference" if holds_delta(jac_exprs)
                                    else "symbolic")
            repl, repl_index, reduced = eliminate(
                [self._extract(x) for x in jac_exprs] if self.jacobian_method == "symbolic"
                else no_jac)
        r_loss = reduced[0]
        r_d1, r_d2 = reduced[1:1 + n], reduced[1 + n:1 + 2 * n]
        k0 = 1 + 2 * n + len(flat_cov)
        r_ito, r_jac = reduced[k0:k0 + n], reduced[k0 + n:k0 + n + n * n]
        r_fdc = reduced[k0 + n + n * n:]
        it = iter(reduced[1 + 2 * n:k0])
        r_cov = [[None] * n for _ in range(n)]
        for i in range(n):
            for j in range(i, n):
                r_cov[i][j] = r_cov[j][i] = next(it)
        placeholders = set(self.quad.values())
        printed = {}  # a shared assignment is printed once, however many functions need it
        free = {}  # replacement index -> its free symbols (closure's memo)

        def assignment(k):
            if k not in printed:
                s, v = repl[k]
                printed[k] = f"{s} = {pycode(v)}"
            return printed[k]

        def body(outs):
            lines = []
            used = set()
            for o in outs:
                used |= o.free_symbols
            for k in closure(outs, repl_index, repl, free):
                used |= free[k]
            call_args = ", ".join(self.state + self.param_names)
            groups = self.node_groups()
            needed = sorted(used & placeholders, key=lambda ph: int(str(ph)[3:]))
            for j in sorted({groups[ph][0] for ph in needed if ph in groups}):
                lines.append(f"_ghg{j} = _gh_group_{j}({call_args})")
            for ph in needed:
                if ph in groups:
                    j, pos = groups[ph]
                    lines.append(f"{ph} = _ghg{j}[{pos}]")
                else:
                    lines.append(f"{ph} = _gh_node_{int(str(ph)[3:])}({call_args})")
            orth = sorted(used & set(self.orth_args), key=lambda s: int(str(s)[2:]))
            extra = [a for ph in orth for a in self.orth_args[ph]]
            after, late = [], set(orth)
            for k in closure(list(outs) + extra, repl_index, repl, free):
                if free[k] & late:   # needs an orthant probability: after the batch
                    late.add(repl[k][0])
                    after.append(assignment(k))
                else:
                    lines.append(assignment(k))
            return lines + self._orthant_lines(orth) + after

        if forward:
            jacobian = ("forward", (repl, repl_index, reduced[1:1 + 2 * n], list(D.state)))
        elif self.jacobian_method == "symbolic":
            jacobian = ("symbolic", [r_jac[i * n:(i + 1) * n] for i in range(n)])
        else:
            jacobian = ("finite-difference", None)
        return r_loss, r_d1, r_d2, r_cov, r_ito, r_fdc, jacobian, pycode, body

    def _assemble(self, r_loss, r_d1, r_d2, r_cov, r_ito, r_fdc, jacobian, pycode, body):
        """The function sources from the printed outputs: pycode(x) is an output's expression,
        body(xs) the assignments the outputs xs need."""
        D = self.D
        st, pa = self.state, self.param_args
        names = ", ".join(D.overlap_names)
        child = None
        if jacobian[0] == "forward":  # on the second core while the others are printed
            child = Background(lambda: self._forward_jacobian_parts(jacobian[1], pycode))
        try:
            fns = self._output_functions(r_loss, r_d1, r_d2, r_cov, r_ito, r_fdc, pycode, body)
            parts = None
            if child is not None:
                parts = child.result()
                if parts is None:  # no child, or it failed: done here (its error met here)
                    try:
                        parts = self._forward_jacobian_parts(jacobian[1], pycode)
                    except ValueError:
                        raise _NoForwardJacobian from None
            if parts is not None:  # forward mode: symbolic, or finite differences at a kink
                self.jacobian_method = parts[0]
            text = self._jacobian_function(jacobian, pycode, body, parts)
        finally:
            if child is not None:
                child.close()
        fns.append(text)
        fns.append(function_source(
            "diffusion", st + ["eta", "d"] + pa,
            f"Diffusion matrix D = Cov(G) / d over ({names}), shape (n, n) + broadcast shape.",
            [f"c = covariance({', '.join(st + ['eta'] + [f'{p}={p}' for p in self.param_names])})"],
            "numpy.array(c) / d"))
        return fns

    def _output_functions(self, r_loss, r_d1, r_d2, r_cov, r_ito, r_fdc, pycode, body):
        """The sources of the loss, drift, Cov(G), Ito and finite-d functions."""
        D = self.D
        st, pa = self.state, self.param_args
        method = D.method
        names = ", ".join(D.overlap_names)
        n = len(D.state)
        fns = []
        fns.append(function_source(
            "population_loss", st + pa,
            f"Population loss R({names}) = E[1/2 ||y - y_hat||^2] ({method}).",
            body([r_loss]), f"_bc({pycode(r_loss)})[0]"))
        fns.append(function_source(
            "drift_eta1", st + pa,
            f"O(eta) drift coefficients E[G1_i] for ({names}): drift = eta * this + "
            f"eta^2 * drift_eta2 ({method}).",
            body(r_d1), f"_bc({', '.join(pycode(x) for x in r_d1)})"))
        fns.append(function_source(
            "drift_eta2", st + pa,
            f"O(eta^2) drift coefficients E[G2_i] for ({names}) ({method}).",
            body(r_d2), f"_bc({', '.join(pycode(x) for x in r_d2)})"))
        fns.append(function_source(
            "drift", st + ["eta"] + pa,
            f"Drift d({names})/dt = eta E[G1] + eta^2 E[G2] (MATH.md section 4; {method}).",
            body(list(r_d1) + list(r_d2)),
            "_bc(" + ", ".join(f"eta * ({pycode(a)}) + eta**2 * ({pycode(b)})"
                               for a, b in zip(r_d1, r_d2)) + ")"))
        flat = [r_cov[i][j] for i in range(n) for j in range(i, n)]
        cov_lines = body(flat)
        entries = {}
        for i in range(n):
            for j in range(i, n):
                cov_lines.append(f"_c{i}_{j} = {pycode(r_cov[i][j])}")
                entries[(i, j)] = entries[(j, i)] = f"_c{i}_{j}"
        rows = [tuple_source([entries[(i, j)] for j in range(n)]) for i in range(n)]
        fns.append(function_source(
            "covariance", st + ["eta"] + pa,
            f"Cov(G)_ij over ({names}), rows and columns in that order ({method}); "
            f"the diffusion is D = Cov(G) / d.",
            cov_lines, "_bc_nested(" + tuple_source(rows) + ")"))
        fns.append(function_source(
            "ito_correction", st + ["eta"] + pa,
            f"d times the O(1/d) drift of the spherical rescaling for ({names}): the SDE drift "
            f"is drift + ito_correction / d (zero for plain SGD; {method}).",
            body(r_ito), f"_bc({', '.join(pycode(x) for x in r_ito)})"))
        fns.append(function_source(
            "finite_d_correction", st + ["eta"] + pa,
            f"d times the whole O(1/d) drift for ({names}): the SDE drift is drift + "
            f"finite_d_correction / d ({D.finite_d_note}; {method}).",
            body(r_fdc), f"_bc({', '.join(pycode(x) for x in r_fdc)})"))
        return fns

    def _forward_jacobian_parts(self, jac, pycode):
        """printing.forward_jacobian(*jac), printed: (JACOBIAN, the assignment lines of the
        derivatives, the rows of the matrix returned); ("finite-difference", None, None) when
        a derivative holds a Dirac delta (a kink). ValueError at an unevaluated derivative."""
        n = len(self.D.state)
        jac_lines, jac_grads = forward_jacobian(*jac)
        if holds_delta([v for _, v in jac_lines] + [g for row in jac_grads for g in row]):
            return "finite-difference", None, None
        eta = sp.Symbol("eta")
        g1, g2 = jac_grads[:n], jac_grads[n:]
        jrows = [tuple_source([pycode(eta * g1[i][j] + eta ** 2 * g2[i][j])
                               for j in range(n)]) for i in range(n)]
        return "symbolic", [f"{s} = {pycode(v)}" for s, v in jac_lines], jrows

    def _jacobian_function(self, jacobian, pycode, body, parts=None):
        """The source of drift_jacobian. jacobian = (kind, data); for "forward" data holds the
        arguments of printing.forward_jacobian and `parts` its printed result
        (_forward_jacobian_parts), the drift's own assignments (body) printed here."""
        D = self.D
        n = len(D.state)
        st, pa = self.state, self.param_args
        method = D.method
        names = ", ".join(D.overlap_names)
        kind, jac = jacobian
        if kind == "forward":
            kind, jac_lines, jrows = parts
            if kind == "symbolic":
                return function_source(
                    "drift_jacobian", st + ["eta"] + pa,
                    f"Jacobian d drift_i / d x_j over ({names}), derived symbolically by the "
                    f"chain rule through the common subexpressions of the drift ({method}).",
                    body(jac[2]) + jac_lines, "_bc_nested(" + tuple_source(jrows) + ")")
        if kind in ("symbolic", "ring", "ring-sums"):
            jrows = [tuple_source([pycode(x) for x in row]) for row in jac]
            how = {"symbolic": "derived symbolically",
                   "ring": "the exact polynomial derivatives of the drift",
                   "ring-sums": "the exact derivatives of the drift by the chain rule through "
                                "the summed cumulants of its token sums"}[kind]
            return function_source(
                "drift_jacobian", st + ["eta"] + pa,
                f"Jacobian d drift_i / d x_j over ({names}), {how} ({method}).",
                body([x for row in jac for x in row]), "_bc_nested(" + tuple_source(jrows) + ")")
        call = ", ".join(["eta=eta"] + [f"{p}={p}" for p in self.param_names])
        return function_source(
            "drift_jacobian", st + ["eta", "h=1e-5"] + pa,
            f"Jacobian d drift_i / d x_j over ({names}) by central differences of step h "
            f"(error O(h^2) plus quadrature error / h): the symbolic derivative of this "
            f"model has a Dirac delta.",
            [f"x = [numpy.asarray(v, dtype=float) for v in ({', '.join(st)},)]",
             "cols = []",
             f"for j in range({n}):",
             "    xp = list(x); xp[j] = x[j] + h",
             "    xm = list(x); xm[j] = x[j] - h",
             f"    fp = drift(*xp, {call})",
             f"    fm = drift(*xm, {call})",
             "    cols.append([(a - b) / (2 * h) for a, b in zip(fp, fm)])"],
            f"_bc_nested(tuple(tuple(cols[j][i] for j in range({n})) for i in range({n})))")

    def _breaks(self, node):
        """kink_breaks(node), computed once."""
        if node not in self._break_cache:
            self._break_cache[node] = kink_breaks(node)
        return self._break_cache[node]

    def node_groups(self) -> dict:
        """{placeholder: (group j, position)} of the quadrature nodes evaluated together: nodes
        over the same variables, free of kinks, first needed by the same kind of output
        (loss, drift, diffusion, Jacobian), share one pass over the grid (_gh_expect_many,
        their integrands through one cse: tanh(z1) tanh(z2) has 62 two-dimensional nodes
        reading the same few tanh values). A node alone in its group, or split at kinks,
        keeps its own _gh_node function."""
        if self._groups is None:
            by_key = {}
            for node, ph in self.quad.items():  # in placeholder order
                breaks = self._breaks(node)
                if breaks is None or breaks:  # kinks: split, or slow (unsplit) convergence
                    continue
                by_key.setdefault((self.stage[ph], node.variables),
                                  []).append((node, ph))
            self._groups, self.group_list = {}, []
            for members in by_key.values():
                if len(members) < 2:
                    continue
                for pos, (_, ph) in enumerate(members):
                    self._groups[ph] = (len(self.group_list), pos)
                self.group_list.append(members)
        return self._groups

    def quadrature_functions(self) -> list[str]:
        """The sources of the quadrature nodes' functions: per group its integrand function
        (one cse over the members' integrands) and its _gh_group function, per node its
        _gh_node function (and its own integrand function outside a group). The items are
        shared with a forked child (background.two_ends: this process from the front, the
        child from the back); each starts from an empty SymPy cache, so its text is a function
        of its nodes alone, whichever process printed it after whatever other items."""
        from ..background import two_ends
        groups = self.node_groups()
        items = ([("group", j) for j in range(len(self.group_list))]
                 + [("node", ph) for ph in self.quad.values()])
        nodes = {ph: node for node, ph in self.quad.items()}
        done = {}

        def one(k):
            sp.core.cache.clear_cache()
            kind, key = items[k]
            if kind == "group":
                return self._group_functions(key), False
            return self._node_functions(nodes[key], key, groups)

        def front(indices):
            for k in indices:
                done[k] = one(k)

        def back(indices):
            return {k: one(k) for k in indices}

        done.update(two_ends(len(items), front, back) or {})
        for k in range(len(items)):
            if k not in done:  # the child failed or died: computed here
                done[k] = one(k)
        self.unsplit_kinks = self.unsplit_kinks or any(done[k][1] for k in done)
        return [f for k in range(len(items)) for f in done[k][0]]

    def _group_functions(self, j) -> list[str]:
        """The integrand function of group j (one cse over its members' integrands) and its
        _gh_group function."""
        args = self.state + self.param_names
        members = self.group_list[j]
        us = [str(u) for u in members[0][0].variables]
        lines, red = _integrand_lines([node.integrand for node, _ in members],
                                      members[0][0].variables)
        return [
            function_source(
                f"_gh_integrand_g{j}", ["_u"] + args,
                f"Integrands of nodes {', '.join(str(ph)[3:] for _, ph in members)} at "
                f"quadrature points _u = ({', '.join(us)}).",
                lines, tuple_source([pycode(r) for r in red])),
            function_source(
                f"_gh_group_{j}", args + ["n=None"],
                f"E over ({', '.join(us)}) ~ N(0, I) of the integrands of nodes "
                f"{', '.join(str(ph)[3:] for _, ph in members)} (a tuple), by the tensor "
                f"trapezoidal rule on [-10, 10] (the ball |u| <= 10) with n nodes per "
                f"dimension, one pass over the grid.", [],
                f"_gh_expect_many(_gh_integrand_g{j}, {len(us)}, {len(members)}, "
                f"{_node_count(len(us))}, {', '.join(args)})")]

    def _node_functions(self, node, ph, groups) -> tuple[list[str], bool]:
        """(the sources of node ph's functions, whether it has a kink left unsplit): an
        entry of its group's function, or its own integrand and _gh_node functions."""
        args = self.state + self.param_names
        idx = int(str(ph)[3:])
        us = [str(u) for u in node.variables]
        if ph in groups:
            j, pos = groups[ph]
            doc = (f"E over ({', '.join(us)}) ~ N(0, I) of the integrand below: entry {pos} "
                   f"of _gh_group_{j}.\n\n    {short_str(node.integrand, 400)}\n    ")
            return [function_source(f"_gh_node_{idx}", args + ["n=None"], doc, [],
                                    f"_gh_group_{j}({', '.join(args)}, n=n)[{pos}]")], False
        lines, (red,) = _integrand_lines([node.integrand], node.variables)
        fns = [function_source(
            f"_gh_integrand_{idx}", ["_u"] + args,
            f"Integrand of node {idx} at quadrature points _u = ({', '.join(us)}).",
            lines, pycode(red))]
        breaks = self._breaks(node)
        if breaks:
            doc = (f"E over ({', '.join(us)}) ~ N(0, I) of the integrand below: {us[0]} "
                   f"split at the kinks {', '.join(sp.sstr(b) for b in breaks)} with "
                   f"n-node Gauss-Legendre pieces, the rest by the trapezoidal rule.")
            blines = [f"_b{j} = {pycode(b)}" for j, b in enumerate(breaks)]
            call = (f"_split_expect(_gh_integrand_{idx}, {len(us)}, {_node_count(len(us))}, "
                    f"{tuple_source([f'_b{j}' for j in range(len(breaks))])}, "
                    f"{', '.join(args)})")
        else:
            doc = (f"E over ({', '.join(us)}) ~ N(0, I) of the integrand below, by the "
                   f"tensor trapezoidal rule on [-10, 10] (the ball |u| <= 10) with n nodes "
                   f"per dimension"
                   + (" (a kink not along the first variable: convergence like n^-2)."
                      if breaks is None else "."))
            blines = []
            call = (f"_gh_expect(_gh_integrand_{idx}, {len(us)}, {_node_count(len(us))}, "
                    f"{', '.join(args)})")
        doc += f"\n\n    {short_str(node.integrand, 400)}\n    "
        fns.append(function_source(f"_gh_node_{idx}", args + ["n=None"], doc, blines, call))
        return fns, breaks is None

    def link_functions(self) -> list[str]:
        spec = self.D.spec
        zt, zs = spec.variables("teacher"), spec.variables("student")
        fns = []
        T = [sp.sympify(x) for x in link_entries(spec.teacher)]
        S = [sp.sympify(x) for x in link_entries(spec.student)]
        grad = [[sp.diff(s, z) for z in zs] for s in S]
        grad_doc = ("dg_k/dz_l of the student link, as K tuples of L entries." if not spec.multi
                    else "dg/dz{k}_{l} of the student link: one tuple per output entry, the "
                         "fields direction by direction.")
        for name, args, exprs, doc in [
                ("teacher_link", zt, T, "Teacher link g*(z) entries (flattened row by row)."),
                ("student_link", zs, S, "Student link g(z) entries (flattened row by row)."),
                ("student_link_gradient", zs, [x for row in grad for x in row],
                 grad_doc)]:
            repl, red = cse(exprs)
            lines = [f"{s} = {pycode(v)}" for s, v in repl]
            if name == "student_link_gradient":
                L = len(zs)
                rows = [tuple_source([pycode(red[k * L + l]) for l in range(L)])
                        for k in range(len(S))]
                ret = "_bc_nested(" + tuple_source(rows) + ")"
            else:
                ret = "_bc(" + ", ".join(pycode(x) for x in red) + ")"
            fns.append(function_source(name, [str(z) for z in args] + self.param_args, doc,
                                       lines, ret))
        return fns


def _node_count(k: int) -> str:
    """The node count argument of a k-dimensional rule in a node function."""
    return f"_nodes({k}) if n is None else n"


def _first_atoms(expr, cls) -> list:
    """The subexpressions of type cls of expr, not looking inside them, in the order a
    left-to-right preorder walk over the stored arguments first meets them: deterministic
    (SymPy stores the arguments of sums and products sorted by Basic.compare, not by hash),
    each shared sub-expression entered once."""
    out, found, stack, seen = [], set(), [expr], set()
    while stack:
        x = stack.pop()
        if isinstance(x, cls):
            if x not in found:
                found.add(x)
                out.append(x)
        elif x.args and x not in seen:
            seen.add(x)
            stack.extend(reversed(x.args))
    return out


def _dag_replace(expr, mapping):
    """expr.xreplace(mapping) for a mapping of distinct sub-expressions to distinct new
    symbols (the placeholders), each shared sub-expression visited once, sums and products
    not sorted again: the replacement cannot make two terms or factors combine (distinct
    atoms for distinct sub-expressions), so the result is xreplace's up to argument order."""
    return dag_map(expr, mapping, keep_order=True)


def _merge_exps(x):
    """A product with several exponential factors with them merged: exp(a) exp(b) c ->
    exp(a + b) c."""
    if not x.is_Mul:
        return x
    exps = [a for a in x.args if isinstance(a, sp.exp)]
    if len(exps) < 2:
        return x
    rest = [a for a in x.args if not isinstance(a, sp.exp)]
    return sp.Mul(*rest, sp.exp(sp.Add(*[a.args[0] for a in exps])))


def _integrand_lines(integrands, us) -> tuple[list[str], list]:
    """(the lines of an integrand function up to its return, the reduced integrands): the
    quadrature variables unpacked from _u, the integrands' state-only parts
    (hoist_constant_parts) through one cse, then the rest through another, with exp(a) exp(b)
    written exp(a + b) (combine_exp: the product of separately overflowing factors at the far
    nodes, |u| ~ 10, would give inf / inf instead of a vanishing term)."""
    small, parts = hoist_constant_parts(integrands, us)
    lines = [f"{tuple_source([str(u) for u in us])} = _u"]
    if parts:
        repl, red = cse([part for _, part in parts], "_c", evaluate_powers=False)
        lines += [f"{s} = {pycode(v)}" for s, v in repl]
        lines += [f"{h} = {pycode(v)}" for (h, _), v in zip(parts, red)]
    repl, red = cse([combine_exp(x) for x in small], "_y")
    return lines + [f"{s} = {pycode(v)}" for s, v in repl], red


def combine_exp(expr):
    """expr with every product of exponentials exp(a) exp(b) written exp(a + b) (what
    sp.powsimp(expr, combine="exp") does for them, without its cost on large integrands)."""
    return dag_map(expr, post=_merge_exps)


class _BoundedStr(StrPrinter):
    """str() in the order SymPy stores the arguments, every sum cut after the terms that
    reach `limit` characters (" + ..."): the cost is bounded by the limit, not the size of
    the expression (a sum of hundreds of terms inside a product would print in full)."""

    def __init__(self, limit: int):
        super().__init__({"order": "none"})
        self.limit = limit

    def _print_Add(self, expr, order=None):
        out = ""
        for i, t in enumerate(expr.args):
            s = self._print(t)
            out += s if i == 0 else (" - " + s[1:] if s.startswith("-") else " + " + s)
            if len(out) >= self.limit and i + 1 < len(expr.args):
                return out + " + ..."
        return out


def short_str(expr, limit: int) -> str:
    """At most `limit` characters of str(expr) with its arguments in stored order, every sum
    in it cut to the terms that fill `limit` (" + ..."): what a docstring shows of a large
    integrand, at a cost independent of its size."""
    return _BoundedStr(limit).doprint(expr)[:limit]


def salt(diffusion: bool = True) -> str:
    """The salt of this backend's spec hash (drift-only modules have their own)."""
    return tool_salt() + ("" if diffusion else " drift-only")


def _function_name(source: str) -> str:
    """The name of the function whose source text starts with "def name(..."."""
    return source[len("def "):source.index("(")]


def module_source(D: Derivation, diffusion: bool = True, printer: str = "auto") -> str:
    """The full source text of the generated module of a Derivation (diffusion=False: a
    drift-only module, whose covariance, Ito and finite-d functions are zero and DIFFUSION is
    False). printer: how the functions of the state are printed, see
    _Module.state_functions."""
    spec = D.spec
    mod = _Module(D)
    why = ("the spec asks for the drift only ([derivation] diffusion = false)"
           if not spec.diffusion else "generated with diffusion=False")
    unavailable = {} if diffusion else {
        piece: f"drift-only module ({why}): Cov(G) and the O(1/d) drift were not derived"
        for piece in DIFFUSION_PIECES}
    h = spec.hash(salt(diffusion))
    defaults = spec.parameters.items()

    def header(jacobian_method):
        doc = [
            "",
            f"Model {spec.name}: L = {spec.L}, r = {spec.r}, "
            + (f"K* = {spec.teacher_directions} teacher and K = {spec.student_directions} "
               f"student directions (teacher overlaps P = "
               f"{[[str(c) for c in row] for row in spec.teacher_overlaps]}), "
               if spec.multi else "")
            + f"output shape "
            f"{spec.shape or 'scalar'}, loss {spec.loss} (1/2 ||y - y_hat||^2, label noise "
            f"{spec.noise}), {'spherical' if spec.spherical else 'plain'} online SGD.",
            f"Teacher link: {sp.sstr(spec.teacher)}",
            f"Student link: {sp.sstr(spec.student)}",
            f"Positional coefficients C: {[[str(c) for c in row] for row in spec.C]}",
            "",
            "Formulas (MATH.md sections 3-4): population loss R; drift = eta E[G1] + eta^2 "
            "E[G2];",
            "covariance Cov(G) and diffusion D = Cov(G) / d. Expectations: exact Gaussian "
            "moments",
            "where polynomial; closed forms (arcsine, arc-cosine, bivariate normal CDF, "
            "completed",
            "squares) for erf/Phi, kinks and exponentials; tensor trapezoidal quadrature",
            "elsewhere (see quadrature_error). Per output: OUTPUT_METHODS.",
        ]
        constants = [
            f"NAME = {spec.name!r}",
            f"L = {spec.L}",
            f"R = {spec.r}",
            f"OVERLAPS = {tuple(D.overlap_names)!r}",
            f"DIRECTIONS = {(spec.teacher_directions, spec.student_directions)!r}",
            f"TEACHER_OVERLAPS = "
            f"{tuple(tuple(float(c) for c in row) for row in spec.teacher_overlaps)!r}",
            f"PARAMETERS = {tuple(spec.parameters)!r}",
            f"DEFAULTS = {{{', '.join(f'{k!r}: {float(v)!r}' for k, v in defaults)}}}",
            f"SPHERICAL = {spec.spherical!r}",
            f"LOSS = {spec.loss!r}",
            f"NOISE = {float(spec.noise)!r}",
            f"METHOD = {D.method!r}",
            f"OUTPUT_METHODS = {D.methods!r}",
            f"QUADRATURE_TOLERANCE = {QUADRATURE_TOLERANCE!r}",
            f"QUADRATURE_ERROR_FACTOR = {4.0 if mod.unsplit_kinks else 2.0!r}",
            f"SPEC_HASH = {h!r}",
            f"QUADRATURE_NODES = {DEFAULT_NODES}",
            *(["QUADRATURE_NODE_FACTORS = {}"] if mod.quad else []),
            *(["QUADRATURE_UNVERIFIED = {}"] if D.method == "quadrature" else []),
            f"JACOBIAN = {jacobian_method!r}",
            f"FINITE_D_CORRECTION = {D.finite_d_note!r}",
            f"DIFFUSION = {diffusion!r}",
            "BACKEND = 'exact'",
            f"UNAVAILABLE = {unavailable!r}",
        ]
        return module_header(spec, doc, h, tool_salt(), constants)

    def helpers_for(fns):
        orthant = any("_orthant" in f for f in fns)
        return [runtime.GAUSS_HERMITE_HELPERS, runtime.CHUNK_HELPERS] + (
            [runtime.BVN_HELPERS] if orthant or any("_bvn(" in f for f in fns) else []) + (
            [runtime.ORTHANT_HELPERS] if orthant else []) + (
            [runtime.NODE_COUNT_HELPERS] if any("_nodes(" in f for f in fns) else [])

    def join(parts):
        return "\n\n".join(p.rstrip("\n") for p in parts) + "\n"

    def probed_nodes(quad_fns, jacobian_method):
        """choose_nodes on the header, the helpers and the node functions alone (compiling
        gelu's 5000 lines of state functions was half of the node choice); the node functions
        do not read JACOBIAN, not yet known when the child starts."""
        return choose_nodes(join([header(jacobian_method)] + helpers_for(quad_fns) + quad_fns),
                            spec)

    def node_work():
        """The node functions, whether a kink is left unsplit, and the node count that meets
        the tolerance when the state functions hold no orthant integrals."""
        quad_fns = mod.quadrature_functions()
        nodes = (probed_nodes(quad_fns, getattr(mod, "jacobian_method", ""))
                 if D.method == "quadrature" and not mod.orth else None)
        return quad_fns, mod.unsplit_kinks, nodes

    # the node work depends on the nodes only: it runs on the second core (a forked child,
    # backends.background) while this process does the cse and prints the state functions
    started = {}

    def nodes_ready():
        started["count"] = len(mod.quad)
        if D.method == "quadrature" and not mod.orth:
            started["child"] = Background(node_work)
    mod.nodes_ready = nodes_ready
    try:
        state_fns = [f for f in mod.state_functions(printer)
                     if _function_name(f) not in unavailable]
        got = started["child"].result() if "child" in started else None
    finally:
        if "child" in started:
            started["child"].close()
    if got is None or started.get("count") != len(mod.quad):
        got = node_work()  # no child, or nodes found after it started: computed here
    quad_fns, mod.unsplit_kinks, nodes = got
    link_fns = mod.link_functions()
    body = state_fns + quad_fns + link_fns
    # diffusion calls covariance, which is wrapped already
    wrapped = [_function_name(f) for f in state_fns if _function_name(f) != "diffusion"]
    chunking = ("# a call on more than 2 _CHUNK states is evaluated in blocks of _CHUNK "
                "(cache-sized temporaries)\n" + "\n".join(f"{w} = _chunked({w})"
                                                           for w in wrapped))
    text = join([header(mod.jacobian_method)] + helpers_for(body) + body + [chunking])
    if D.method == "quadrature":   # the node count that meets the tolerance (choose_nodes)
        if any("_orthant" in f for f in body):  # orthant integrals: the whole module probed
            nodes = choose_nodes(text, spec)
        elif nodes is None:
            nodes = probed_nodes(quad_fns, mod.jacobian_method)
        nodes, factors, unverified = nodes
        text = text.replace(f"\nQUADRATURE_NODES = {DEFAULT_NODES}\n",
                            f"\nQUADRATURE_NODES = {nodes}\n", 1)
        if factors:  # the counts of the rules whose dimension needs another, as n_k / n
            listed = ", ".join(f"{k}: {n_k} / {nodes}" for k, n_k in sorted(factors.items()))
            text = text.replace("\nQUADRATURE_NODE_FACTORS = {}\n",
                                f"\nQUADRATURE_NODE_FACTORS = {{{listed}}}\n", 1)
        if unverified:  # the rules whose count no probe showed to meet the tolerance
            text = text.replace("\nQUADRATURE_UNVERIFIED = {}\n",
                                f"\nQUADRATURE_UNVERIFIED = {unverified!r}\n", 1)
    return text


def generate(spec: ModelSpec, out_dir="generated", force: bool = False,
             diffusion: bool = True) -> tuple[Path, bool]:
    """Write <out_dir>/<name>.py for a spec unless it is up to date (same hash).
    diffusion=False writes <name>_drift_only.py with the loss and drift only (much faster for
    long sequences; enough for ODE predictions, refused by the SDE).

    Returns (path, written)."""
    diffusion = diffusion and spec.diffusion
    path = module_path(spec, out_dir, diffusion)
    if not force and read_hash(path) == spec.hash(salt(diffusion)):
        return path, False
    with _without_cyclic_gc():
        D = derive(spec, diffusion=diffusion)
        text = module_source(D, diffusion)
    write_atomic(path, text)
    return path, True


@contextlib.contextmanager
def _without_cyclic_gc():
    """Python's cyclic garbage collector paused (reference counting still frees every object
    outside a cycle): a derivation allocates millions of short-lived SymPy objects beside a
    large cache, and the collector's full passes walk all of it again and again (15 % of relu +
    erf's derivation; the peak memory 85 -> 91 MB). Cycles made meanwhile are collected after."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


__all__ = ["generate", "module_source", "tool_salt", "salt", "DEFAULT_NODES"]
