"""Code generation: a Derivation becomes generated/<name>.py, a plain NumPy/SciPy module.

The module imports only numpy and scipy, broadcasts over arrays of states and parameter values,
and computes every function after one common-subexpression elimination over all the module's
outputs (each function then evaluates only the shared subexpressions it needs). Expectations that
have no closed form are printed as tensor Gauss-Hermite quadratures over their own variables.
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
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import sympy as sp
from sympy.printing.numpy import SciPyPrinter

from . import __version__
from .derive import D_SYM, ETA, Derivation, derive
from .gaussian import GaussHermite
from .spec import ModelSpec, link_entries, token_symbols

GENERATOR_VERSION = "1"
HASH_PREFIX = "# spec-hash: "
DEFAULT_NODES = 40


#: the modules whose source determines the generated code
_PIPELINE = ("spec.py", "links.py", "gaussian.py", "derive.py", "codegen.py")


@functools.lru_cache(maxsize=1)
def tool_salt() -> str:
    """What, besides the spec, determines a generated module: the tool version and a hash of
    the pipeline's own source, so any change to the derivation regenerates every module."""
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for name in _PIPELINE:
        h.update((here / name).read_bytes())
    return f"ssi-symbolic {__version__} generator {GENERATOR_VERSION} source {h.hexdigest()[:16]}"


class _Printer(SciPyPrinter):
    """SciPy printer whose max/min/step functions broadcast elementwise."""

    def _print_Max(self, expr):
        out = self._print(expr.args[0])
        for a in expr.args[1:]:
            out = f"numpy.maximum({out}, {self._print(a)})"
        return out

    def _print_Min(self, expr):
        out = self._print(expr.args[0])
        for a in expr.args[1:]:
            out = f"numpy.minimum({out}, {self._print(a)})"
        return out

    def _print_Pow(self, expr, rational=False):
        # small integer powers as products: numpy's power is several times slower than multiply
        b, k = expr.base, expr.exp
        if k.is_Integer and 2 <= k <= 16 and (b.is_Symbol or b.is_Function):
            base = self._print(b)
            return "(" + "*".join([base] * int(k)) + ")"
        return super()._print_Pow(expr, rational=rational)

    def _print_Heaviside(self, expr):
        return f"numpy.heaviside({self._print(expr.args[0])}, 0.5)"


_PRINTER = _Printer({"fully_qualified_modules": True, "inline": True,
                     "allow_unknown_functions": False, "order": "none"})


def pycode(expr) -> str:
    """Vectorised NumPy/SciPy source for a SymPy expression."""
    return _PRINTER.doprint(expr)


def _horner(expr, gens):
    """Nested (Horner) form of an expression polynomial in the state: several times fewer
    array operations than the expanded sum. Non-polynomial expressions are left alone."""
    gens = [g for g in gens if isinstance(g, sp.Symbol) and g in expr.free_symbols]
    if not gens:
        return expr
    others = sorted(expr.free_symbols - set(gens), key=str)
    try:  # every symbol a generator: much faster than coefficients in a polynomial domain
        poly = sp.Poly(expr, *gens, *others, expand=False)
    except sp.PolynomialError:
        try:
            poly = sp.Poly(expr, *gens, *others)
        except sp.PolynomialError:
            return expr
    if poly.total_degree() <= 1:
        return expr
    k = len(gens)
    terms = {}
    for mon, c in poly.terms():
        rest = sp.Mul(c, *[o ** e for o, e in zip(others, mon[k:]) if e])
        terms.setdefault(mon[:k], []).append(rest)
    return _horner_terms({mon: sp.Add(*cs) for mon, cs in terms.items()}, gens)


def _horner_terms(terms, gens):
    """sum_monom coeff * gens^monom, nested as (...(P_k x + P_{k-1}) x ...) in gens[0]."""
    if not gens:
        return sp.Add(*terms.values())
    x, rest = gens[0], gens[1:]
    by_power = {}
    for mon, c in terms.items():
        by_power.setdefault(mon[0], {})[mon[1:]] = c
    powers = sorted(by_power, reverse=True)
    acc = sp.Integer(0)
    for i, k in enumerate(powers):
        acc = acc + _horner_terms(by_power[k], rest)
        nxt = powers[i + 1] if i + 1 < len(powers) else 0
        if k - nxt:
            acc = acc * x ** (k - nxt)
    return acc


MAX_ADD_TERMS = 24


def cse(exprs, prefix="_x"):
    """Common-subexpression elimination over all `exprs` at once, then long sums split into
    partial sums of at most MAX_ADD_TERMS terms (a sum of thousands of terms on one line
    overflows Python's compiler)."""
    symbols = sp.numbered_symbols(prefix)
    repl, reduced = sp.cse(exprs, symbols=symbols, order="canonical")
    out = []
    split_names = sp.numbered_symbols(prefix + "s")

    def walk(e):
        if e.is_Atom:
            return e
        args = [walk(a) for a in e.args]
        if e.is_Add and len(args) > MAX_ADD_TERMS:
            while len(args) > MAX_ADD_TERMS:
                parts = []
                for k in range(0, len(args), MAX_ADD_TERMS):
                    sym = next(split_names)
                    out.append((sym, sp.Add(*args[k:k + MAX_ADD_TERMS], evaluate=False)))
                    parts.append(sym)
                args = parts
            return sp.Add(*args, evaluate=False)
        if args == list(e.args):
            return e
        return e.func(*args, evaluate=False) if e.is_Add or e.is_Mul else e.func(*args)

    for sym, val in repl:
        val = walk(val)
        out.append((sym, val))
    reduced = [walk(r) for r in reduced]
    return out, reduced


def _closure(outputs, repl_index, repl):
    """Indices of the CSE replacements needed (transitively) by `outputs`, in order."""
    need, stack = set(), [s for o in outputs for s in o.free_symbols if s in repl_index]
    while stack:
        s = stack.pop()
        if s in need:
            continue
        need.add(s)
        stack.extend(x for x in repl[repl_index[s]][1].free_symbols if x in repl_index)
    return sorted(repl_index[s] for s in need)


def _function(name, args, doc, body_lines, ret):
    lines = [f"def {name}({', '.join(args)}):", f'    """{doc}"""']
    lines += [f"    {ln}" for ln in body_lines]
    lines.append(f"    return {ret}")
    return "\n".join(lines) + "\n"


def _tuple_src(items) -> str:
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"


class _Module:
    """Collects the source of one generated module."""

    def __init__(self, D: Derivation):
        self.D = D
        spec = D.spec
        self.state = [str(s) for s in D.state]
        self.param_args = [f"{p}={float(v)!r}" for p, v in spec.parameters.items()]
        self.param_names = list(spec.parameters)
        self.quad = {}  # GaussHermite node -> placeholder symbol

    # quadrature nodes become placeholders before CSE; each gets its own function
    def _extract(self, expr):
        nodes = sorted(sp.sympify(expr).atoms(GaussHermite), key=sp.default_sort_key)
        for n in nodes:
            if n not in self.quad:
                self.quad[n] = sp.Symbol(f"_gh{len(self.quad)}")
        return sp.sympify(expr).xreplace(self.quad)

    def state_functions(self) -> list[str]:
        D = self.D
        n = len(D.state)
        loss = self._extract(D.population_loss)
        d1 = [self._extract(x) for x in D.drift_eta1]
        d2 = [self._extract(x) for x in D.drift_eta2]
        cov = [[self._extract(D.covariance[i, j]) for j in range(n)] for i in range(n)]
        flat_cov = [cov[i][j] for i in range(n) for j in range(i, n)]
        ito = [self._extract(x) for x in D.ito_correction]
        fdc = [self._extract(x) for x in D.finite_d_correction]
        jac_exprs = list(D.drift_jacobian())
        # a kink (ReLU, |x|) differentiates to a Dirac delta under the integral: such a
        # Jacobian is taken by central differences of the generated drift instead
        self.jacobian_method = ("finite-difference" if any(x.has(sp.DiracDelta)
                                                           for x in jac_exprs) else "symbolic")
        jac = ([self._extract(x) for x in jac_exprs] if self.jacobian_method == "symbolic"
               else [sp.Integer(0)] * (n * n))
        outputs = [_horner(x, D.state)
                   for x in [loss] + d1 + d2 + flat_cov + ito + jac + fdc]
        repl, reduced = cse(outputs)
        repl_index = {s: i for i, (s, _) in enumerate(repl)}
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

        def body(outs):
            lines = []
            used = set()
            for o in outs:
                used |= o.free_symbols
            for k in _closure(outs, repl_index, repl):
                used |= repl[k][1].free_symbols
            for ph in sorted(used & placeholders, key=str):
                idx = int(str(ph)[3:])
                lines.append(f"{ph} = _gh_node_{idx}({', '.join(self.state + self.param_names)})")
            for k in _closure(outs, repl_index, repl):
                s, v = repl[k]
                lines.append(f"{s} = {pycode(v)}")
            return lines

        st, pa = self.state, self.param_args
        method = D.method
        names = ", ".join(D.overlap_names)
        fns = []
        fns.append(_function(
            "population_loss", st + pa,
            f"Population loss R({names}) = E[1/2 ||y - y_hat||^2] ({method}).",
            body([r_loss]), f"_bc({pycode(r_loss)})[0]"))
        fns.append(_function(
            "drift_eta1", st + pa,
            f"O(eta) drift coefficients E[G1_i] for ({names}): drift = eta * this + "
            f"eta^2 * drift_eta2 ({method}).",
            body(r_d1), f"_bc({', '.join(pycode(x) for x in r_d1)})"))
        fns.append(_function(
            "drift_eta2", st + pa,
            f"O(eta^2) drift coefficients E[G2_i] for ({names}) ({method}).",
            body(r_d2), f"_bc({', '.join(pycode(x) for x in r_d2)})"))
        fns.append(_function(
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
        rows = [_tuple_src([entries[(i, j)] for j in range(n)]) for i in range(n)]
        fns.append(_function(
            "covariance", st + ["eta"] + pa,
            f"Cov(G)_ij over ({names}), rows and columns in that order ({method}); "
            f"the diffusion is D = Cov(G) / d.",
            cov_lines, "_bc_nested(" + _tuple_src(rows) + ")"))
        fns.append(_function(
            "ito_correction", st + ["eta"] + pa,
            f"d times the O(1/d) drift of the spherical rescaling for ({names}): the SDE drift "
            f"is drift + ito_correction / d (zero for plain SGD; {method}).",
            body(r_ito), f"_bc({', '.join(pycode(x) for x in r_ito)})"))
        fns.append(_function(
            "finite_d_correction", st + ["eta"] + pa,
            f"d times the whole O(1/d) drift for ({names}): the SDE drift is drift + "
            f"finite_d_correction / d ({D.finite_d_note}; {method}).",
            body(r_fdc), f"_bc({', '.join(pycode(x) for x in r_fdc)})"))
        if self.jacobian_method == "symbolic":
            jrows = [_tuple_src([pycode(r_jac[i * n + j]) for j in range(n)]) for i in range(n)]
            fns.append(_function(
                "drift_jacobian", st + ["eta"] + pa,
                f"Jacobian d drift_i / d x_j over ({names}), derived symbolically ({method}).",
                body(r_jac), "_bc_nested(" + _tuple_src(jrows) + ")"))
        else:
            call = ", ".join(["eta=eta"] + [f"{p}={p}" for p in self.param_names])
            fns.append(_function(
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
                f"_bc_nested(tuple(tuple(cols[j][i] for j in range({n})) for i in range({n})))"))
        fns.append(_function(
            "diffusion", st + ["eta", "d"] + pa,
            f"Diffusion matrix D = Cov(G) / d over ({names}), shape (n, n) + broadcast shape.",
            [f"c = covariance({', '.join(st + ['eta'] + [f'{p}={p}' for p in self.param_names])})"],
            "numpy.array(c) / d"))
        return fns

    def quadrature_functions(self) -> list[str]:
        fns = []
        args = self.state + self.param_names
        for node, ph in self.quad.items():
            idx = int(str(ph)[3:])
            us = [str(u) for u in node.variables]
            repl, (red,) = cse([node.integrand], "_y")
            lines = [f"{_tuple_src(us)} = _u"] + [f"{s} = {pycode(v)}" for s, v in repl]
            fns.append(_function(
                f"_gh_integrand_{idx}", ["_u"] + args,
                f"Integrand of node {idx} at quadrature points _u = ({', '.join(us)}).",
                lines, pycode(red)))
            doc = (f"E over ({', '.join(us)}) ~ N(0, I) of the integrand below, by tensor "
                   f"Gauss-Hermite quadrature with n nodes per dimension.\n\n"
                   f"    {sp.sstr(node.integrand)[:400]}\n    ")
            fns.append(_function(
                f"_gh_node_{idx}", args + ["n=None"], doc, [],
                f"_gh_expect(_gh_integrand_{idx}, {len(us)}, "
                f"QUADRATURE_NODES if n is None else n, {', '.join(args)})"))
        return fns

    def link_functions(self) -> list[str]:
        spec = self.D.spec
        zs = [str(z) for z in token_symbols(spec.L)]
        fns = []
        T = [sp.sympify(x) for x in link_entries(spec.teacher)]
        S = [sp.sympify(x) for x in link_entries(spec.student)]
        grad = [[sp.diff(s, z) for z in token_symbols(spec.L)] for s in S]
        for name, exprs, doc in [
                ("teacher_link", T, "Teacher link g*(z) entries (flattened row by row)."),
                ("student_link", S, "Student link g(z) entries (flattened row by row)."),
                ("student_link_gradient", [x for row in grad for x in row],
                 "dg_k/dz_l of the student link, as K tuples of L entries.")]:
            repl, red = cse(exprs)
            lines = [f"{s} = {pycode(v)}" for s, v in repl]
            if name == "student_link_gradient":
                L = spec.L
                rows = [_tuple_src([pycode(red[k * L + l]) for l in range(L)])
                        for k in range(len(S))]
                ret = "_bc_nested(" + _tuple_src(rows) + ")"
            else:
                ret = "_bc(" + ", ".join(pycode(x) for x in red) + ")"
            fns.append(_function(name, zs + self.param_args, doc, lines, ret))
        return fns


#: broadcasting helpers every generated module carries (it imports only numpy and scipy)
BROADCAST_HELPERS = '''
def _bc(*xs):
    """Broadcast the outputs to one common shape (constants become arrays): a tuple."""
    return tuple(numpy.broadcast_arrays(*[numpy.asarray(x, dtype=float) for x in xs]))


def _bc_nested(rows):
    flat = _bc(*[x for row in rows for x in row])
    n = len(rows[0])
    return tuple(tuple(flat[i * n:(i + 1) * n]) for i in range(len(rows)))
'''

_HELPERS = '\n' + BROADCAST_HELPERS + '''

_GRIDS = {}


def _gh_grid(k, n):
    """Tensor Gauss-Hermite rule for E over k independent N(0, 1): nodes (k, n^k), weights."""
    key = (k, n)
    if key not in _GRIDS:
        x, w = numpy.polynomial.hermite_e.hermegauss(n)
        w = w / numpy.sqrt(2.0 * numpy.pi)
        grids = numpy.meshgrid(*([x] * k), indexing="ij")
        weights = numpy.ones(())
        for _ in range(k):
            weights = numpy.multiply.outer(weights, w)
        _GRIDS[key] = (numpy.array([g.ravel() for g in grids]), weights.ravel())
    return _GRIDS[key]


_GH_CHUNK = 2 ** 22  # quadrature points times states held in memory at once


def _gh_expect(integrand, k, n, *args):
    """E over k independent N(0, 1) of integrand(u, *args), by tensor Gauss-Hermite
    quadrature, broadcast over the arguments and chunked to bound memory."""
    u, w = _gh_grid(k, n)
    args = numpy.broadcast_arrays(*[numpy.asarray(a, dtype=float) for a in args])
    shape = args[0].shape
    flat = [a.reshape(1, -1) for a in args]
    size = flat[0].shape[1]
    out = numpy.empty(size)
    step = max(1, _GH_CHUNK // w.size)
    uu = tuple(x[:, None] for x in u)
    for s in range(0, size, step):
        part = [a[:, s:s + step] for a in flat]
        f = numpy.broadcast_to(integrand(uu, *part), (w.size, part[0].shape[1]))
        out[s:s + step] = w @ f
    return out.reshape(shape)


def quadrature_error(function, *args, **kwargs):
    """(value, error estimate) of a function of this module: the value with 2n nodes per
    dimension and its difference from the value with n = QUADRATURE_NODES."""
    global QUADRATURE_NODES
    n = QUADRATURE_NODES
    coarse = numpy.asarray(function(*args, **kwargs), dtype=float)
    QUADRATURE_NODES = 2 * n
    try:
        fine = numpy.asarray(function(*args, **kwargs), dtype=float)
    finally:
        QUADRATURE_NODES = n
    return fine, numpy.abs(fine - coarse)
'''


def _salt(diffusion: bool) -> str:
    return tool_salt() + ("" if diffusion else " drift-only")


def module_source(D: Derivation, diffusion: bool = True) -> str:
    """The full source text of the generated module of a Derivation (diffusion=False: a
    drift-only module, whose covariance, Ito and finite-d functions are zero and DIFFUSION is
    False)."""
    spec = D.spec
    mod = _Module(D)
    state_fns = mod.state_functions()
    quad_fns = mod.quadrature_functions()
    link_fns = mod.link_functions()
    h = spec.hash(_salt(diffusion))
    src = spec.source or "(Python spec)"
    header = [
        f'"""Generated by ssi-symbolic from {Path(src).name if spec.source else src}: '
        f"do not edit; regenerate with `ssi derive`.",
        "",
        f"Model {spec.name}: L = {spec.L}, r = {spec.r}, output shape "
        f"{spec.shape or 'scalar'}, loss {spec.loss} (1/2 ||y - y_hat||^2, label noise "
        f"{spec.noise}), {'spherical' if spec.spherical else 'plain'} online SGD.",
        f"Teacher link: {sp.sstr(spec.teacher)}",
        f"Student link: {sp.sstr(spec.student)}",
        f"Positional coefficients C: {[[str(c) for c in row] for row in spec.C]}",
        "",
        "Formulas (MATH.md sections 3-4): population loss R; drift = eta E[G1] + eta^2 E[G2];",
        "covariance Cov(G) and diffusion D = Cov(G) / d. Expectations: "
        + ("exact (Gaussian moments, token by token)." if D.method == "exact" else
           "exact where polynomial, tensor Gauss-Hermite quadrature elsewhere "
           "(see quadrature_error)."),
        '"""',
        f"{HASH_PREFIX}{h}",
        f"# tool: {tool_salt()}",
        "import numpy",
        "import scipy.special",
        "",
        f"NAME = {spec.name!r}",
        f"L = {spec.L}",
        f"R = {spec.r}",
        f"OVERLAPS = {tuple(D.overlap_names)!r}",
        f"PARAMETERS = {tuple(spec.parameters)!r}",
        f"DEFAULTS = {{{', '.join(f'{k!r}: {float(v)!r}' for k, v in spec.parameters.items())}}}",
        f"SPHERICAL = {spec.spherical!r}",
        f"LOSS = {spec.loss!r}",
        f"NOISE = {float(spec.noise)!r}",
        f"METHOD = {D.method!r}",
        f"SPEC_HASH = {h!r}",
        f"QUADRATURE_NODES = {DEFAULT_NODES}",
        f"JACOBIAN = {mod.jacobian_method!r}",
        f"FINITE_D_CORRECTION = {D.finite_d_note!r}",
        f"DIFFUSION = {diffusion!r}",
    ]
    parts = ["\n".join(header), _HELPERS] + state_fns + quad_fns + link_fns
    return "\n\n".join(p.rstrip("\n") for p in parts) + "\n"


def read_hash(path) -> str | None:
    """The spec hash recorded in a generated module's header, or None."""
    try:
        with open(path) as fh:
            for _ in range(40):
                line = fh.readline()
                if not line:
                    break
                if line.startswith(HASH_PREFIX):
                    return line[len(HASH_PREFIX):].strip()
    except OSError:
        return None
    return None


def write_atomic(path, text: str) -> None:
    """Write text to path atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def module_path(spec: ModelSpec, out_dir="generated", diffusion: bool = True) -> Path:
    return Path(out_dir) / f"{spec.name}{'' if diffusion else '_drift_only'}.py"


def generate(spec: ModelSpec, out_dir="generated", force: bool = False,
             diffusion: bool = True) -> tuple[Path, bool]:
    """Write generated/<name>.py for a spec unless it is up to date (same hash).
    diffusion=False writes <name>_drift_only.py with the loss and drift only (much faster for
    long sequences; enough for ODE predictions, refused by the SDE).

    Returns (path, written)."""
    from . import attention  # softmax attention and norm-loss specs: quadrature backend
    if attention.handles(spec):
        return attention.generate(spec, out_dir, force)
    path = module_path(spec, out_dir, diffusion)
    if not force and read_hash(path) == spec.hash(_salt(diffusion)):
        return path, False
    text = module_source(derive(spec, diffusion=diffusion), diffusion)
    write_atomic(path, text)
    return path, True


def load_module(path):
    """Import a generated module from its file (no SymPy needed at run time)."""
    path = Path(path).resolve()
    name = f"ssi_generated_{path.stem}_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules.setdefault(name, module)
    return module


def ensure_module(spec: ModelSpec, out_dir="generated", diffusion: bool = True):
    """Generate if needed, then load: the generated module of a spec."""
    path, _ = generate(spec, out_dir, diffusion=diffusion)
    return load_module(path)


__all__ = ["generate", "module_source", "load_module", "ensure_module", "write_atomic",
           "read_hash", "tool_salt", "pycode", "ETA", "D_SYM"]
