"""The generated module of an attention spec, as source text printed by backends.printing:
header and constants, the loss and its tables, the drift, the Jacobian, the links, the step
statistics (Cov(G), O(1/d) drift) and the norm-loss variant."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import sympy as sp

from ...model.spec import ModelSpec, link_entries, token_symbols
from ..exact import tool_salt
from ..printing import cse, function_source, module_header, pycode, tuple_source
from .. import runtime
from .integrals import BACKEND_VERSION, Integrals
from .routing import _check, stable

NORM_NODES = 24  # nodes per dimension of every quadrature of a norm-loss module
#: the pieces of the module contract this backend does not write, per loss kind, with the reason
UNAVAILABLE = {"square": {}, "norm": {}}
#: the contract pieces that need the drift tables of Integrals
DRIFT_PIECES = ("drift_eta1", "drift_eta2", "drift", "drift_jacobian")
#: Gauss-Hermite nodes per dimension of the direct quadrature of the step statistics over the
#: 2L variables (z*, g) (covariance_direct, step_coefficients)
COVARIANCE_NODES = 24
#: nodes per dimension of the values of the step table (its check uses 3/2 of them) and its
#: Chebyshev degrees in (theta, e'), m = cos theta, e = e' sin theta
STEP_TABLE_NODES = 32
STEP_TABLE_DEGREE = (16, 10)
#: what FINITE_D_CORRECTION says in every attention module
FINITE_D_NOTE = "complete"


# ----------------------------------------------------------------------------- code writing
def _arr(a) -> str:
    return "numpy.array(" + repr(np.asarray(a, dtype=float).tolist()) + ")"


def backend_salt() -> str:
    """What, besides the spec, determines an attention module: the exact backend's salt (tool
    version and the shared printing and runtime sources), this backend's version and a hash of
    its own source files."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).resolve().parent.glob("*.py")):
        h.update(path.read_bytes())
    return f"{tool_salt()} attention {BACKEND_VERSION} {h.hexdigest()[:16]}"


def _constants(spec: ModelSpec, h: str, unavailable: dict | None = None) -> list:
    """The constants every attention module defines after its imports (NAME .. SPEC_HASH),
    as source lines; h is the spec's hash, unavailable the module's UNAVAILABLE (default: the
    backend's for the spec's loss)."""
    unavailable = UNAVAILABLE[spec.loss] if unavailable is None else unavailable
    return [
        f"NAME = {spec.name!r}",
        f"L = {spec.L}",
        "R = 1",
        "OVERLAPS = ('m', 'e')",
        "DIRECTIONS = (1, 1)",
        "TEACHER_OVERLAPS = ((1.0,),)",
        f"PARAMETERS = {tuple(spec.parameters)!r}",
        f"DEFAULTS = {{{', '.join(f'{k!r}: {float(v)!r}' for k, v in spec.parameters.items())}}}",
        "SPHERICAL = True",
        f"LOSS = {spec.loss!r}",
        f"NOISE = {float(spec.noise)!r}",
        "METHOD = 'quadrature'",
        "OUTPUT_METHODS = {piece: 'quadrature' for piece in ('population_loss', 'drift_eta1', "
        "'drift_eta2', 'covariance', 'ito_correction', 'finite_d_correction')}",
        "BACKEND = 'attention'",
        f"UNAVAILABLE = {unavailable!r}",
        f"FINITE_D_CORRECTION = {FINITE_D_NOTE!r}",
        f"SPEC_HASH = {h!r}",
    ]


def module_source(spec: ModelSpec, I: Integrals | None = None) -> str:
    """The generated module of an attention spec (imports numpy and scipy only)."""
    if spec.loss == "norm":
        _check(spec)
        return _norm_module_source(spec)
    I = I or Integrals(spec)
    unavailable = dict(UNAVAILABLE[spec.loss])
    if I.drift_tables is None:  # Integrals(spec, drift=False): loss and landscape only
        unavailable.update({piece: "built without the drift tables (Integrals(drift=False))"
                            for piece in DRIFT_PIECES})
    names = list(spec.parameters)
    pa = [f"{p}={float(v)!r}" for p, v in spec.parameters.items()]
    pcall = ", ".join(f"{p}={p}" for p in names)
    h = spec.hash(backend_salt())
    npc = len(I.pieces)
    L = spec.L
    doc = [
        "",
        f"Model {spec.name}: L = {L}, r = 1, output shape {spec.shape or 'scalar'}, loss "
        f"{spec.loss} (1/2 ||y - y_hat||^2, label noise {spec.noise}), spherical online SGD.",
        f"Teacher link: {sp.sstr(spec.teacher)}",
        f"Student link: {sp.sstr(spec.student)}",
        f"Positional coefficients C: {[[str(c) for c in row] for row in spec.C]}",
        "",
        "R(m, e) = teacher constant - sum_p c_p X_p(m, e) - sum_i b_i Sbar_i(e) + P(e)/2 + K Delta/2",
        "(ssi_symbolic/backends/attention): X_p = E[f_p(z*) S_i(z)] from a Chebyshev table in (m, e)",
        "built by tensor Gauss-Hermite quadrature (non-polynomial f_p) or from Mehler's formula",
        "(polynomial f_p); Sbar_i(e) = E S_i, P(e) = E|S|^2 as Chebyshev series in e.",
        "Teacher pieces (entry, coefficient c_p, f_p): "
        + "; ".join(f"({i}, {sp.sstr(c)}, {sp.sstr(f)[:80]})" for i, c, f in I.pieces),
        f"Constant part b: {[sp.sstr(x) for x in I.b]}",
        f"Tables: {I.table_info}",
        f"Estimated max error of population_loss (unit coefficients): {I.error_estimate():.2e}",
        "Cov(G), ito_correction and finite_d_correction (MATH.md 4): a Chebyshev table in",
        "(theta, e') of the step statistics per parameter set, built on first use by direct",
        "quadrature (step_table; its error estimate: quadrature_error).",
    ]
    lines = [
        "_cheb = numpy.polynomial.chebyshev",
        "",
        *_constants(spec, h, unavailable),
        f"QUADRATURE_NODES = {I.low_nodes}  # L-dim integrals; tables: TABLE_INFO",
        f"TABLE_INFO = {I.table_info!r}",
        f"LOSS_ERROR_ESTIMATE = {I.error_estimate()!r}",
        "HESSIAN = 'hermite-moments'",
        f"C = {I.C.tolist()!r}",
        f"K = {I.K}",
        "",
        f"_G = {_arr(I.G)}",
        f"_M = {_arr(I.M)}",
        f"_SBAR = {_arr(I.sbar_c)}",
        f"_P = {_arr(I.P_c)}",
        f"PIECE_ENTRY = {[i for i, _, _ in I.pieces]!r}",
        f"COVARIANCE_NODES = {COVARIANCE_NODES}",
        f"STEP_TABLE_NODES = {STEP_TABLE_NODES}",
        f"STEP_TABLE_DEGREE = {STEP_TABLE_DEGREE!r}",
        f"STEP_TABLE_CHECKS = {STEP_TABLE_CHECKS!r}",
        "_STEP_TABLES = {}",
    ]
    tab_lines, cross_terms = [], []
    for p in range(npc):
        if p in I.tables:
            tab_lines.append(f"_TABLE_{p} = {_arr(I.tables[p])}")
            em, ee = I.table_info["even_m"], I.table_info["even_e"]
            ym = "2 * m * m - 1" if em else "m"
            ye = "2 * e * e - 1" if ee else "e"
            cross_terms.append(f"_chebval2(({ym}), ({ye}), _TABLE_{p})")
        else:
            i = I.pieces[p][0]
            terms = []
            for k, v in sorted(I.fhat[p].items()):
                kk = "_".join(map(str, k))
                tab_lines.append(f"_SIGMA_{p}_{kk} = {_arr(I.sigma_c[k][:, i])}")
                terms.append(f"{float(v)!r} * m ** {sum(k)} * _cheb.chebval(e, _SIGMA_{p}_{kk})")
            cross_terms.append("(" + " + ".join(terms or ["0.0"]) + ")")
    lines += tab_lines
    # derivatives of the cross terms in m and in e
    dm_terms, de_terms = [], []
    for p in range(npc):
        if p in I.tables:
            em, ee = I.table_info["even_m"], I.table_info["even_e"]
            ym = "2 * m * m - 1" if em else "m"
            ye = "2 * e * e - 1" if ee else "e"
            lines.append(f"_TABLE_{p}_DM = _cheb.chebder(_TABLE_{p}, axis=0)")
            lines.append(f"_TABLE_{p}_DE = _cheb.chebder(_TABLE_{p}, axis=1)")
            dm_terms.append(f"{'4 * m * ' if em else ''}_chebval2(({ym}), ({ye}), _TABLE_{p}_DM)")
            de_terms.append(f"{'4 * e * ' if ee else ''}_chebval2(({ym}), ({ye}), _TABLE_{p}_DE)")
        else:
            tm, te = [], []
            for k, v in sorted(I.fhat[p].items()):
                kk = "_".join(map(str, k))
                deg = sum(k)
                if deg:
                    tm.append(f"{float(v) * deg!r} * m ** {deg - 1} * "
                              f"_cheb.chebval(e, _SIGMA_{p}_{kk})")
                te.append(f"{float(v)!r} * m ** {deg} * "
                          f"_cheb.chebval(e, _cheb.chebder(_SIGMA_{p}_{kk}))")
            dm_terms.append("(" + " + ".join(tm or ["0.0 * m"]) + ")")
            de_terms.append("(" + " + ".join(te or ["0.0 * e"]) + ")")
    drift_ok = I.drift_tables is not None
    if drift_ok:
        lines.append(f"_GRAM = {_arr(I.drift_tables)}  # (a, b, j, k): Chebyshev coefficients of "
                     f"G_ab, v = (c_p, b_k, 1)")
        lines.append(f"DRIFT_INFO = {I.drift_info!r}")
    # parameter coefficients
    coef = [pycode(stable(c)) for _, c, _ in I.pieces]
    bsrc = [pycode(stable(x)) for x in I.b]
    body_params = [f"_c = [{', '.join(f'numpy.asarray({c}, dtype=float)' for c in coef)}]",
                   f"_b = [{', '.join(f'numpy.asarray({x}, dtype=float)' for x in bsrc)}]"]
    # Hessian moments
    sig0 = {k: v.tolist() for k, v in I.sigma0.items()}
    Pi0 = {k: float(v) for k, v in I.Pi0.items()}
    Cv = I.C
    hmm, hme = [], []
    for p in range(npc):
        i = I.pieces[p][0]
        mm = 2 * sum(v * sig0[k][i] for k, v in I.fhat[p].items() if sum(k) == 2)
        me = sum(v * sum(Cv[l] * sig0[tuple(kk + (1 if j == l else 0) for j, kk in
                                             enumerate(k))][i] for l in range(L))
                 for k, v in I.fhat[p].items() if sum(k) == 1)
        hmm.append(float(mm))
        hme.append(float(me))

    def e2(k_of):
        out = 0.0
        for l in range(L):
            for l2 in range(L):
                k = [0] * L
                k[l] += 1
                k[l2] += 1
                out += Cv[l] * Cv[l2] * k_of(tuple(k))
        return out
    dsbar = [float(e2(lambda k, i=i: sig0[k][i])) for i in range(I.K)]
    dP = float(e2(lambda k: Pi0[k]))
    m1 = [float(sum(v * sig0[k][I.pieces[p][0]] for k, v in I.fhat[p].items() if sum(k) == 1))
          for p in range(npc)]
    de_sbar = [float(sum(Cv[l] * sig0[tuple(1 if j == l else 0 for j in range(L))][i]
                         for l in range(L))) for i in range(I.K)]
    de_P = float(sum(Cv[l] * Pi0[tuple(1 if j == l else 0 for j in range(L))] for l in range(L)))
    lines += [
        f"_H_MM = {hmm!r}  # d2 X_p / dm2 at the origin",
        f"_H_ME = {hme!r}  # d2 X_p / dm de at the origin",
        f"_D2_SBAR = {dsbar!r}  # d2 Sbar_i / de2 at e = 0",
        f"_D2_P = {dP!r}  # d2 P / de2 at e = 0",
        f"_D1_M = {m1!r}  # d X_p / dm at the origin",
        f"_D1_SBAR = {de_sbar!r}  # d Sbar_i / de at e = 0",
        f"_D1_P = {de_P!r}",
    ]
    header = module_header(spec, doc, h, backend_salt(), lines, backend="attention backend")
    clip = ["m = numpy.clip(numpy.asarray(m, dtype=float), -1.0, 1.0)",
            "e = numpy.clip(numpy.asarray(e, dtype=float), -1.0, 1.0)"]
    params = "_c, _b = teacher_coefficients(" + pcall + ")"
    fns = [
        function_source("teacher_coefficients", pa,
                        "Teacher coefficients c_p and constant parts b_i at the parameter values.",
                        body_params, "_c, _b"),
        function_source(
            "teacher_constant", pa,
            "1/2 E|T|^2 + K Delta / 2 = 1/2 [sum_pq c_p c_q G_pq + 2 sum_p c_p b_i(p) M_p + "
            "|b|^2]\n    + K Delta / 2 (depends on the parameters only).",
            [params,
             "out = 0.5 * K * NOISE + 0.5 * sum(x * x for x in _b)",
             "for p in range(len(_c)):",
             "    out = out + _c[p] * _b[PIECE_ENTRY[p]] * _M[p]",
             "    for q in range(len(_c)):",
             "        out = out + 0.5 * _c[p] * _c[q] * _G[p, q]"],
            "numpy.asarray(out, dtype=float)"),
        function_source(
            "student_mean", ["e"],
            "Sbar_i(e) = E S_i(g + C e), g ~ N(0, I): a tuple over output entries.",
            clip[1:], "tuple(_cheb.chebval(e, _SBAR[:, i]) for i in range(K))"),
        function_source(
            "student_square", ["e"],
            "P(e) = E |S(g + C e)|^2 (squared Frobenius norm of the student output).",
            clip[1:], "_cheb.chebval(e, _P)"),
        function_source(
            "cross_terms", ["m", "e"],
            "X_p(m, e) = E[f_p(z*) S_i(p)(z)] for every teacher piece p (a tuple).",
            clip, tuple_source(cross_terms)),
        function_source(
            "population_loss", ["m", "e"] + pa,
            "Population loss R(m, e) = E[1/2 ||y - y_hat||_F^2] (teacher constant - cross "
            "terms -\n    b . Sbar(e) + P(e)/2); NaN where |m| > 1 or |e| > 1 (outside the "
            "tables).",
            ["m, e = numpy.asarray(m, dtype=float), numpy.asarray(e, dtype=float)",
             params,
             "X = cross_terms(m, e)",
             "sb = student_mean(e)",
             f"out = teacher_constant({pcall}) + 0.5 * student_square(e)",
             "for p in range(len(_c)):",
             "    out = out - _c[p] * X[p]",
             "for i in range(K):",
             "    out = out - _b[i] * sb[i]",
             "inside = (numpy.abs(m) <= 1 + 1e-12) & (numpy.abs(e) <= 1 + 1e-12)"],
            "numpy.where(inside, out, numpy.nan)"),
        function_source(
            "gradient_origin", pa,
            "(dR/dm, dR/de) at (m, e) = (0, 0) from first Hermite moments (Stein's lemma).",
            [params,
             "gm = -sum(_c[p] * _D1_M[p] for p in range(len(_c)))",
             "ge = 0.5 * _D1_P - sum(_b[i] * _D1_SBAR[i] for i in range(K))",
             "ge = ge - sum(_c[p] * _M[p] * _D1_SBAR[PIECE_ENTRY[p]] for p in range(len(_c)))"],
            "_bc(gm, ge)"),
        function_source(
            "hessian_origin", pa,
            "Hessian of R in (m, e) at the origin, ((R_mm, R_me), (R_me, R_ee)), from Hermite\n"
            "    moments at e = 0 (no finite differences):\n"
            "    R_mm = -sum_p c_p 2 sum_(|k|=2) fhat_pk sigma_ik(0),\n"
            "    R_me = -sum_p c_p sum_(|k|=1) fhat_pk sum_l C_l sigma_(i, k+e_l)(0),\n"
            "    R_ee = P''(0)/2 - sum_i (b_i + sum_(p in i) c_p M_p) Sbar_i''(0).",
            [params,
             "hmm = -sum(_c[p] * _H_MM[p] for p in range(len(_c)))",
             "hme = -sum(_c[p] * _H_ME[p] for p in range(len(_c)))",
             "hee = 0.5 * _D2_P - sum(_b[i] * _D2_SBAR[i] for i in range(K))",
             "hee = hee - sum(_c[p] * _M[p] * _D2_SBAR[PIECE_ENTRY[p]] for p in range(len(_c)))"],
            "_bc_nested(((hmm, hme), (hme, hee)))"),
        function_source(
            "loss_gradient", ["m", "e"] + pa,
            "(dR/dm, dR/de) at q = 1 (derivatives of the Chebyshev tables and series).",
            clip + [params,
                    f"dXm = {tuple_source(dm_terms)}",
                    f"dXe = {tuple_source(de_terms)}",
                    "gm = -sum(_c[p] * dXm[p] for p in range(len(_c)))",
                    "ge = 0.5 * _cheb.chebval(e, _cheb.chebder(_P))",
                    "for i in range(K):",
                    "    ge = ge - _b[i] * _cheb.chebval(e, _cheb.chebder(_SBAR[:, i]))",
                    "ge = ge - sum(_c[p] * dXe[p] for p in range(len(_c)))"],
            "_bc(gm, ge)")]
    if drift_ok:
        fns += _drift_source(pa, pcall, I.drift_info)
        fns.append(_jacobian_source(pa, pcall, "1e-6"))
    fns.append(function_source(
        "quadrature_error", ["function", "*args", "**kwargs"],
        "(value, error estimate): for covariance, diffusion, ito_correction and "
        "finite_d_correction the table's estimate (_step_error); for step_coefficients and "
        "covariance_direct (n as a keyword, default COVARIANCE_NODES) the value with 3n/2 "
        "nodes and its difference from the value with n; for the other functions "
        "LOSS_ERROR_ESTIMATE (from two node counts and an off-node interpolation check when "
        "the module was derived).",
        ["if function in (step_coefficients, covariance_direct):",
         "    n = kwargs.pop('n', None) or COVARIANCE_NODES",
         "    coarse = numpy.asarray(function(*args, n=n, **kwargs), dtype=float)",
         "    fine = numpy.asarray(function(*args, n=(3 * n) // 2, **kwargs), dtype=float)",
         "    return fine, numpy.abs(fine - coarse)",
         "v = numpy.asarray(function(*args, **kwargs), dtype=float)",
         "if function in (covariance, diffusion, ito_correction, finite_d_correction):",
         "    return v, _step_error(function, args, kwargs)"],
        "v, numpy.full(v.shape, LOSS_ERROR_ESTIMATE)"))
    fns.append(_link_source(spec, pa))
    fns.append(_step_source(spec, pa, tabulated=True))
    return header + "\n\n" + runtime.ATTENTION_HELPERS + "\n\n" + "\n\n".join(fns)


def _ym(info):
    return "2 * m * m - 1" if info.get("even_m", False) else "m"


def _ye(info):
    return "2 * e * e - 1" if info.get("even_e", False) else "e"


def _jacobian_source(pa, pcall, h: str) -> str:
    """Source of the generated drift_jacobian: central differences of the module's drift with
    default step h (runtime._fd_jacobian)."""
    return function_source(
        "drift_jacobian", ["m", "e", "eta", f"h={h}"] + pa,
        "Jacobian d drift_i / d x_j over (m, e) by central differences of step h.",
        [], f"_fd_jacobian(drift, (m, e), h, dict(eta=eta, {pcall}))")


def _drift_source(pa, pcall, info) -> list:
    """loss_dl_square, drift_eta1, drift_eta2 and drift of a square-loss module (from the
    Gram table _GRAM of the O(eta^2) term and loss_gradient)."""
    return [
        function_source(
            "loss_dl_square", ["m", "e"] + pa,
            "B(m, e) = E sum_l dl_l^2 = v^T G(m, e) v with v = (c_p, b_k, 1) (see ssi_symbolic/backends/attention).",
            ["m = numpy.clip(numpy.asarray(m, dtype=float), -1.0, 1.0)",
             "e = numpy.clip(numpy.asarray(e, dtype=float), -1.0, 1.0)",
             f"_c, _b = teacher_coefficients({pcall})",
             "v = list(_c) + list(_b) + [1.0]",
             "m, e = numpy.broadcast_arrays(m, e)",
             f"tx = _cheb_basis(({_ym(info)}), _GRAM.shape[2]).reshape(_GRAM.shape[2], -1)",
             f"ty = _cheb_basis(({_ye(info)}), _GRAM.shape[3]).reshape(_GRAM.shape[3], -1)",
             'G = numpy.einsum("jn,abjk,kn->abn", tx, _GRAM, ty, optimize=True)',
             "G = G.reshape(G.shape[:2] + m.shape)",
             "out = 0.0",
             "for a in range(len(v)):",
             "    for b in range(len(v)):",
             "        out = out + v[a] * v[b] * G[a, b]"],
            "numpy.asarray(out, dtype=float)"),
        function_source(
            "drift_eta1", ["m", "e"] + pa,
            "O(eta) drift coefficients of spherical SGD (MATH.md 4): the projected gradient "
            "flow\n    -(I - x x^T) grad R at x = (m, e), q = 1 (the d/dq terms cancel under the "
            "projection).",
            [f"gm, ge = loss_gradient(m, e, {pcall})", "r = m * gm + e * ge"],
            "_bc(-(gm - m * r), -(ge - e * r))"),
        function_source(
            "drift_eta2", ["m", "e"] + pa,
            "O(eta^2) drift coefficients: -(x / 2) E sum_l dl_l^2 for x = m, e.",
            [f"B = loss_dl_square(m, e, {pcall})"], "_bc(-0.5 * m * B, -0.5 * e * B)"),
        function_source(
            "drift", ["m", "e", "eta"] + pa,
            "Drift d(m, e)/dt = eta drift_eta1 + eta^2 drift_eta2 (spherical online SGD).",
            [f"a1 = drift_eta1(m, e, {pcall})", f"a2 = drift_eta2(m, e, {pcall})"],
            "_bc(*[eta * x + eta ** 2 * y for x, y in zip(a1, a2)])")]


def _link_source(spec, pa) -> str:
    """teacher_link, student_link and student_link_gradient of the module, each after one
    common-subexpression elimination over its entries (overflow of an exponential in a softmax
    is harmless: the stable form divides by it)."""
    zs = [str(z) for z in token_symbols(spec.L)]
    zsym = token_symbols(spec.L)
    guard = 'with numpy.errstate(over="ignore"):'
    student = [stable(x) for x in link_entries(spec.student)]
    gradient = [stable(sp.diff(sk, zl)) for sk in student for zl in zsym]
    out = []
    for name, exprs, doc in [
            ("teacher_link", [stable(x) for x in link_entries(spec.teacher)],
             "Teacher link g*(z) entries (flattened row by row)."),
            ("student_link", student, "Student link g(z) entries (flattened row by row)."),
            ("student_link_gradient", gradient,
             "dg_k/dz_l of the student link, as K tuples of L entries.")]:
        repl, red = cse(exprs)
        body = [guard] + [f"    {x} = {pycode(v)}" for x, v in repl]
        if name == "student_link_gradient":
            L = spec.L
            rows = [tuple_source([pycode(red[k * L + l]) for l in range(L)])
                    for k in range(len(student))]
            body.append(f"    out = _bc_nested({tuple_source(rows)})")
        else:
            body.append(f"    out = _bc({', '.join(pycode(x) for x in red)})")
        out.append(function_source(name, zs + pa, doc, body, "out"))
    return "\n\n".join(out)


#: states where a table of step coefficients is checked against direct quadrature: the origin
#: region, the inside of the disk and its boundary near m = +-1 and e = +-1, where the softmax
#: makes the tensor Gauss-Hermite rule over (z*, g) converge slowest
STEP_TABLE_CHECKS = ((0.02, 0.01), (0.1, 0.05), (0.45, -0.3), (0.9, 0.1), (-0.2, 0.8),
                     (0.97, -0.2), (0.999, 0.0), (-0.995, 0.05), (0.05, 0.995))


def _step_source(spec, pa, tabulated: bool) -> str:
    """The O(1/d) and diffusion pieces of a module (MATH.md 4, runtime._step_coefficients):
    step_coefficients (direct quadrature at each state), covariance_direct, and covariance,
    diffusion, ito_correction, finite_d_correction from _coefficients, which is a Chebyshev
    table in (theta, e') built on first use per parameter set (tabulated=True) or the direct
    quadrature (False)."""
    names = list(spec.parameters)
    pcall = ", ".join(f"{p}={p}" for p in names)
    links = "(teacher_link, student_link, student_link_gradient)"
    fns = [function_source(
        "step_coefficients", ["m", "e", "n=None"] + pa,
        "The eta-coefficients of one spherical SGD step at each state (runtime "
        "_step_coefficients: E G1, E G2, Cov(G), Ito and token-norm drifts), by tensor "
        "Gauss-Hermite with n (default COVARIANCE_NODES) nodes per dimension over (z*, g): "
        "array (_SC_SIZE,) + broadcast shape, NaN outside the unit disk.",
        ["n = COVARIANCE_NODES if n is None else n",
         f"fn = lambda mm, ee, pv: _step_coefficients(mm, ee, {links}, C, LOSS == 'norm', n, "
         f"pv)"],
        f"_per_state(fn, _SC_SIZE, m, e, dict({pcall}))"),
        function_source(
        "covariance_direct", ["m", "e", "eta", "n=None"] + pa,
        "Cov(G) over (m, e) by direct quadrature at each state (step_coefficients with n "
        "nodes): ((mm, me), (em, ee)).",
        [f"c = step_coefficients(m, e, n, {pcall})"], "_bc_nested(_sc_pieces(c, eta)[0])")]
    if tabulated:
        key = tuple_source([f"float({p})" for p in names])
        fns.append(function_source(
            "step_table", pa,
            "(Chebyshev table, error estimate per component) of step_coefficients over the "
            "unit disk in (theta, e') (runtime _polar_table: degrees STEP_TABLE_DEGREE, values "
            "with STEP_TABLE_NODES nodes, error estimate from STEP_TABLE_CHECKS against direct "
            "quadrature with those nodes and 3/2 of them, plus the Chebyshev tail), built on "
            "first use per parameter set (about a minute) and kept for the session.",
            [f"key = {key}",
             "if key not in _STEP_TABLES:",
             f"    f = lambda mm, ee: step_coefficients(mm, ee, STEP_TABLE_NODES, {pcall})",
             f"    g = lambda mm, ee: step_coefficients(mm, ee, (3 * STEP_TABLE_NODES) // 2, "
             f"{pcall})",
             "    _STEP_TABLES[key] = _polar_table(f, STEP_TABLE_DEGREE, STEP_TABLE_CHECKS, g)"],
            "_STEP_TABLES[key]"))
        fns.append(function_source(
            "_coefficients", ["m", "e"] + pa,
            "(step coefficients, error estimates) at states (m, e) from step_table.",
            [], f"_tabulated(step_table, m, e, dict({pcall}))"))
    else:
        fns.append(function_source(
            "_coefficients", ["m", "e"] + pa,
            "(step coefficients, None) at states (m, e) by direct quadrature with "
            "QUADRATURE_NODES (quadrature_error re-evaluates with 3/2 of them).",
            [], f"step_coefficients(m, e, QUADRATURE_NODES, {pcall}), None"))
    how = ("from step_table" if tabulated else "by direct quadrature at each state")
    fns += [function_source(
        "covariance", ["m", "e", "eta"] + pa,
        f"Cov(G) over (m, e) (MATH.md 4; D = Cov(G) / d), {how}: ((mm, me), (em, ee)); "
        f"error estimate: quadrature_error(covariance, ...).",
        [f"c, _ = _coefficients(m, e, {pcall})"], "_bc_nested(_sc_pieces(c, eta)[0])"),
        function_source(
        "diffusion", ["m", "e", "eta", "d"] + pa,
        "Diffusion matrix D = Cov(G) / d over (m, e), shape (2, 2) + broadcast shape.",
        [], f"numpy.array(covariance(m, e, eta, {pcall})) / d"),
        function_source(
        "ito_correction", ["m", "e", "eta"] + pa,
        f"d times the O(1/d) drift of the spherical rescaling, E[-(1/2)(d dX)(d dQ) + "
        f"(3/8) X (d dQ)^2] (runtime _step_coefficients), {how}.",
        [f"c, _ = _coefficients(m, e, {pcall})"], "_bc(*_sc_pieces(c, eta)[1])"),
        function_source(
        "finite_d_correction", ["m", "e", "eta"] + pa,
        f"d times the whole O(1/d) drift (the SDE drift is drift + this / d): the rescaling "
        f"term plus the token-norm term -(eta^2 X / 2) E[token Gram excess], {how}.",
        [f"c, _ = _coefficients(m, e, {pcall})"], "_bc(*_sc_pieces(c, eta)[2])")]
    if not tabulated:
        return "\n\n".join(fns)
    fns.append(function_source(
        "_step_error", ["function", "args", "kwargs"],
        "Error estimate of covariance, diffusion, ito_correction or finite_d_correction "
        "called with (args, kwargs): the same combination of the coefficients' error "
        "estimates with |eta|^k (triangle inequality), divided by d for the diffusion.",
        ["names = ('m', 'e', 'eta') + (('d',) if function is diffusion else ()) + PARAMETERS",
         "bound = dict(DEFAULTS, **dict(zip(names, args)), **kwargs)",
         "params = {k: v for k, v in bound.items() if k not in ('m', 'e', 'eta', 'd')}",
         "_, err = _coefficients(bound['m'], bound['e'], **params)",
         "pieces = _sc_pieces(err, numpy.abs(bound['eta']))",
         "if function is diffusion:",
         "    return numpy.array(pieces[0]) / bound['d']",
         "k = {covariance: 0, ito_correction: 1, finite_d_correction: 2}[function]"],
        "numpy.array(pieces[k])"))
    return "\n\n".join(fns)


def _norm_module_source(spec: ModelSpec) -> str:
    """Module of a norm-loss attention spec: R = E ||T(z*) - S(z)||_F by pruned tensor
    Gauss-Hermite over the 2L Gaussian variables at each state."""
    names = list(spec.parameters)
    pa = [f"{p}={float(v)!r}" for p, v in spec.parameters.items()]
    h = spec.hash(backend_salt())
    L = spec.L
    doc = [
        "",
        f"Model {spec.name}: L = {L}, r = 1, loss norm (||y - y_hat||_F, not squared), "
        f"spherical online SGD.",
        f"Teacher link: {sp.sstr(spec.teacher)}",
        f"Student link: {sp.sstr(spec.student)}",
        "R(m, e) = E ||T(z*) - S(z)||_F, z = m z* + sqrt(1 - m^2) g + C e, by pruned tensor",
        "Gauss-Hermite quadrature over (z*, g) with QUADRATURE_NODES per dimension at each state",
        "(the norm is not smooth where T = S: read quadrature_error). Drift, covariance and the",
        "O(1/d) drift: the same quadrature of the step statistics at each state.",
    ]
    head = module_header(spec, doc, h, backend_salt(), [
        *_constants(spec, h),
        f"QUADRATURE_NODES = {NORM_NODES}",
        "COVARIANCE_NODES = QUADRATURE_NODES  # one rule for loss, drift and covariance",
        f"C = {[float(row[0]) for row in spec.C]!r}",
    ], backend="attention backend")
    pcall = ", ".join(f"{p}={p}" for p in names)
    args = ", ".join(["m", "e"] + names)
    fns = [function_source(
        "population_loss", ["m", "e"] + pa + ["n=None"],
        "R(m, e) = E ||T(z*) - S(z)||_F (norm loss) by tensor Gauss-Hermite over (z*, g), one "
        "state at a time (vectorised over the nodes); NaN outside |m|, |e| <= 1.",
        ["n = QUADRATURE_NODES if n is None else n",
         f"u, w = _gh_pruned({2 * L}, n, 1e-16)",
         f"zst, g = u[:{L}], u[{L}:]",
         "m, e, *ps = numpy.broadcast_arrays(*[numpy.asarray(x, dtype=float)",
         f"                                     for x in ({args},)])",
         "out = numpy.full(m.shape, numpy.nan)",
         "for idx in numpy.ndindex(m.shape):",
         "    mm, ee = m[idx], e[idx]",
         "    if abs(mm) > 1 + 1e-12 or abs(ee) > 1 + 1e-12:",
         "        continue",
         "    kw = {k: p[idx] for k, p in zip(PARAMETERS, ps)}",
         "    s = numpy.sqrt(max(0.0, 1 - mm * mm))",
         f"    z = [mm * zst[l] + s * g[l] + C[l] * ee for l in range({L})]",
         "    T = teacher_link(*zst, **kw)",
         "    S = student_link(*z)",
         "    out[idx] = w @ numpy.sqrt(sum((a - b) ** 2 for a, b in zip(T, S)) + 0.0)"],
        "out"),
        function_source(
        "quadrature_error", ["function", "*args", "**kwargs"],
        "(value with 3n/2 nodes, its difference from the value with n nodes).",
        ["global QUADRATURE_NODES",
         "n = QUADRATURE_NODES",
         "coarse = numpy.asarray(function(*args, **kwargs), dtype=float)",
         "QUADRATURE_NODES = (3 * n) // 2",
         "try:",
         "    fine = numpy.asarray(function(*args, **kwargs), dtype=float)",
         "finally:",
         "    QUADRATURE_NODES = n"],
        "fine, numpy.abs(fine - coarse)"),
        _link_source(spec, pa),
        _step_source(spec, pa, tabulated=False)]
    for name, doc, ret in [
            ("drift_eta1", "O(eta) drift coefficients E[G1]", "_bc(c[0], c[1])"),
            ("drift_eta2", "O(eta^2) drift coefficients E[G2]", "_bc(c[2], c[3])"),
            ("drift", "Drift eta E[G1] + eta^2 E[G2]",
             "_bc(eta * c[0] + eta ** 2 * c[2], eta * c[1] + eta ** 2 * c[3])")]:
        fns.append(function_source(
            name, ["m", "e"] + (["eta"] if name == "drift" else []) + pa,
            f"{doc} (norm loss: direct quadrature at each state, step_coefficients).",
            [f"c = step_coefficients(m, e, QUADRATURE_NODES, {pcall})"], ret))
    fns.append(_jacobian_source(pa, pcall, "1e-5"))
    return head + "\n\n" + runtime.ATTENTION_HELPERS + "\n\n" + "\n\n".join(fns)
