"""The fast paths of the derivation and the generator against the plain SymPy operations they
replace: each must give the same expression (up to form) or the same numbers."""
import os
import random
import re

import numpy as np
import pytest
import sympy as sp

from ssi_symbolic.backends import exact, node_counts
from ssi_symbolic.backends.printing import horner
from ssi_symbolic.symbolic import closed_forms as cf
from ssi_symbolic.symbolic.expectation import _split_free
from ssi_symbolic.symbolic.gaussian import GaussHermite, dag_free_symbols

x, y, m, q = sp.symbols("x y m q", real=True)
u1, u2 = sp.symbols("u1 u2", real=True)


def _random_product(rng, atoms, depth=3):
    """A random product of sums and small powers over the atoms (shared sub-trees)."""
    if depth == 0:
        return rng.choice(atoms)
    parts = [_random_product(rng, atoms, depth - 1) for _ in range(rng.randint(1, 3))]
    out = sp.Add(*parts) if rng.random() < 0.5 else sp.Mul(*parts)
    return out ** 2 if rng.random() < 0.2 else out


@pytest.mark.parametrize("seed", range(8))
def test_expanded_terms_equal_sympy_expand(seed):
    """_expanded_terms multiplies out in dictionaries; its terms must add up to sp.expand of
    the same rewritten integrand (hardtanh, erf, exp and Abs of the two variables)."""
    rng = random.Random(seed)
    links = [sp.Max(-1, sp.Min(1, x)), sp.erf(m * x + y), sp.exp(x / 3 - y), sp.Abs(x - y),
             x, y, m, sp.sqrt(1 - m ** 2) * y, sp.Integer(2)]
    expr = _random_product(rng, links)
    random_vars = {x, y}
    body = cf.rewrite(expr, random_vars)
    got = sp.Add(*[c * t for c, t in cf._expanded_terms(body, random_vars)])
    assert sp.expand(got - sp.expand(body)) == 0
    for c, t in cf._expanded_terms(body, random_vars):  # coefficients free of the variables
        assert not (c.free_symbols & random_vars)


@pytest.mark.parametrize("seed", range(8))
def test_split_free_separates_the_quadrature_variables(seed):
    """_split_free(e, us) = (a, b): a + b = e and a free of us (checked by expansion)."""
    rng = random.Random(100 + seed)
    atoms = [sp.tanh(m * u1 + q * u2), u1, u2, m, q, sp.Integer(3), u1 * u2 - m,
             1 / (1 + sp.exp(-u2))]
    expr = _random_product(rng, atoms)
    a, b = _split_free(expr, {u1, u2})
    assert not (a.free_symbols & {u1, u2})
    assert sp.expand(a + b - expr) == 0
    # the free part is the free part of the expansion
    free = sp.Add(*[t for t in sp.Add.make_args(sp.expand(expr))
                    if not (t.free_symbols & {u1, u2})])
    assert sp.expand(a - free) == 0


def test_dag_free_symbols_equal_free_symbols():
    """Bound variables of integrals and quadrature nodes are handled as SymPy does."""
    rng = random.Random(7)
    atoms = [sp.sin(x), sp.Integral(x * y, (x, 0, 1)), GaussHermite(sp.tanh(u1 * m), sp.Tuple(u1)),
             q, sp.Integer(2), x * m]
    for _ in range(20):
        e = _random_product(rng, atoms)
        assert dag_free_symbols(e) == e.free_symbols


def test_dag_replace_and_first_atoms():
    """_dag_replace is xreplace; _first_atoms finds the nodes without entering them (n1
    inside n2's integrand is not listed again), each once, in the order of a left-to-right
    walk over the stored arguments."""
    n1 = GaussHermite(sp.tanh(u1 + m) * sp.exp(u1), sp.Tuple(u1))
    n2 = GaussHermite(sp.tanh(u1 * q) * n1.integrand, sp.Tuple(u1))
    e = (m * n1 + n2) ** 2 + sp.sqrt(q) * n1 * n2
    rule = {n1: sp.Symbol("_gh0"), n2: sp.Symbol("_gh1")}
    assert _rebuilt(exact._dag_replace(e, rule)) == e.xreplace(rule)
    got = exact._first_atoms(e, GaussHermite)
    assert set(got) == {n1, n2} and len(got) == 2
    assert got == exact._first_atoms(sp.Add(*e.args), GaussHermite)


def _rebuilt(e):
    """e rebuilt bottom-up with SymPy's evaluation (canonical argument order)."""
    return e if not e.args else e.func(*[_rebuilt(a) for a in e.args])


@pytest.mark.parametrize("seed", range(6))
def test_dag_replace_is_xreplace_up_to_argument_order(seed):
    """_dag_replace rebuilds sums and products without sorting them again: rebuilt with
    evaluation, its result is xreplace's, and its values are the same (random expressions of
    nodes, their powers and products with shared sub-trees and numeric coefficients)."""
    rng = random.Random(seed)
    nodes = [GaussHermite(sp.tanh(k * u1 + m) * sp.exp(-u1 ** 2 / (k + 1)), sp.Tuple(u1))
             for k in range(1, 4)]
    e = _random_product(rng, nodes + [m, q, sp.sqrt(q), sp.Rational(3, 7), -2 * m * nodes[0]],
                        depth=4)
    e = e + rng.choice(nodes) ** 2 * m - sp.erf(e) / 3
    rule = {n: sp.Symbol(f"_gh{k}") for k, n in enumerate(nodes)}
    got, want = exact._dag_replace(e, rule), e.xreplace(rule)
    assert _rebuilt(got) == want
    f, g = (sp.lambdify(sorted(want.free_symbols, key=str), x)
            for x in (got, want))
    vals = [0.3 + 0.1 * k for k in range(len(want.free_symbols))]
    assert abs(f(*vals) - g(*vals)) <= 1e-12 * max(1.0, abs(g(*vals)))


def test_combine_exp_merges_products_and_keeps_values():
    e = (x * sp.exp(x) * sp.exp(-y) + sp.tanh(sp.exp(x) * sp.exp(y) * m) / (1 + sp.exp(x))
         + sp.exp(2 * x) * sp.exp(-x ** 2))
    out = exact.combine_exp(e)
    for mul in out.atoms(sp.Mul):
        assert sum(isinstance(a, sp.exp) for a in mul.args) <= 1
    f, g = sp.lambdify((x, y, m), e), sp.lambdify((x, y, m), out)
    for v in [(0.3, -0.2, 0.7), (1.5, 2.0, -0.4)]:
        assert abs(f(*v) - g(*v)) <= 1e-12 * abs(f(*v))


def test_state_only_parts_are_taken_out_of_integrands():
    """hoist_constant_parts replaces every largest sub-expression free of the quadrature
    variables by a symbol (one per distinct part), leaves numbers and symbols, and keeps an
    exponential of a state-only argument as exp(symbol), so that combine_exp still merges it
    with the variables' exponentials; the parts put back give the integrand. The integrand
    function printed from it (_integrand_lines) gives the integrand's values."""
    from ssi_symbolic.backends.printing import hoist_constant_parts
    u1, u2 = sp.symbols("u1 u2", real=True)
    root = sp.sqrt((q - m ** 2) / (2 * q - m ** 2))
    e = (sp.erfc((2 * m * u1 / 5 + root * u2) / sp.sqrt(1 + 2 * root ** 2))
         * sp.exp(-m ** 2 / (2 * q)) * sp.exp(u1 * root) + 3 * m * u2
         + sp.tanh(u2 + root) / (1 + sp.exp(root * u1)) + q * root)
    (small,), parts = hoist_constant_parts([e], (u1, u2))
    syms = [h for h, _ in parts]
    assert len(set(parts)) == len(parts) and len({v for _, v in parts}) == len(parts)
    assert all(not (v.free_symbols & {u1, u2}) and not v.is_Atom for _, v in parts)
    # nothing state-only is left but atoms and the kept exponentials' symbols
    for sub in sp.preorder_traversal(small):
        if not sub.is_Atom and not (sub.free_symbols & {u1, u2}):
            assert isinstance(sub, sp.exp) and sub.args[0] in syms
    merged = exact.combine_exp(small)
    for mul in merged.atoms(sp.Mul):
        assert sum(isinstance(a, sp.exp) for a in mul.args) <= 1
    back = small.xreplace(dict(parts))
    f, g = (sp.lambdify((u1, u2, m, q), x) for x in (e, back))
    for v in [(0.3, -1.2, 0.4, 1.1), (2.5, 0.7, -0.6, 0.9)]:
        assert abs(f(*v) - g(*v)) <= 1e-12 * max(1.0, abs(f(*v)))
    lines, (red,) = exact._integrand_lines([e], (u1, u2))
    ns = {"numpy": np, "scipy": __import__("scipy.special")}
    exec("def _f(_u, m, q):\n    " + "\n    ".join(lines) + f"\n    return {exact.pycode(red)}",
         ns)
    for v in [(0.3, -1.2, 0.4, 1.1), (2.5, 0.7, -0.6, 0.9)]:
        assert abs(ns["_f"](v[:2], *v[2:]) - f(*v)) <= 1e-12 * max(1.0, abs(f(*v)))


def test_short_str_is_a_prefix_of_the_printed_sum():
    from sympy.printing.str import StrPrinter
    stored = StrPrinter({"order": "none"}).doprint  # str() with the arguments in stored order
    e = sp.Add(*[sp.Symbol(f"a{i}") * sp.tanh(x) ** i for i in range(1, 60)])
    s = exact.short_str(e, 120)
    assert len(s) == 120
    assert stored(e).startswith(s)
    small = m * sp.tanh(x) - 2 * sp.exp(q) + 3
    assert exact.short_str(small, 400) == stored(small)
    # a product holding sums of 2000 terms: each sum is cut after the terms that fill the
    # limit (" + ..."), and the 400 characters shown are the start of the full text
    big = sp.Add(*[sp.Symbol(f"b{i}") * x ** i for i in range(2000)])
    e = sp.tanh(x) * big * (q - big)
    cut = exact._BoundedStr(400).doprint(e)
    assert cut.count(" + ...") == 2 and len(cut) < 1200
    s = exact.short_str(e, 400)
    assert len(s) == 400 and stored(e).startswith(s)


def test_horner_of_an_unexpanded_sum_with_placeholders():
    """horner's path for products that are not expanded (many placeholder symbols): the same
    polynomial in the state."""
    phs = sp.symbols("_gh0:40")
    e = sp.Add(*[(m + phs[i]) * (q - 2 * phs[i + 1]) * (1 + m * q) for i in range(39)])
    h = horner(e, [m, q])
    assert sp.expand(h - e) == 0
    assert sp.count_ops(h) < sp.count_ops(sp.expand(e))


def test_dictionary_expansion_is_sympy_expand():
    """printing._expanded (horner's expansion of sums holding quadrature placeholders) gives
    the terms of sp.expand: their sum is the same SymPy expression, through radicals that
    multiply to rationals, pi and its inverse, constant functions, negative powers, powers
    of sums and shared sub-expressions."""
    from ssi_symbolic.backends.printing import _expanded
    phs = sp.symbols("_gh0:12")
    e1, e2 = sp.symbols("e1 e2", real=True)
    r3, r2 = sp.sqrt(3), sp.sqrt(2)
    shared = phs[0] + r3 * phs[1] - m / 3 + sp.asin(sp.Rational(2, 3)) / (2 * sp.pi)
    cases = [
        shared * (shared - r3 * m) * (e1 + 2) ** 2,
        (r3 * phs[2] + r2 * q) * (r3 * phs[3] - r2 * m / 7) * sp.pi * (1 / sp.pi + phs[4]),
        sp.exp(sp.Integer(2) + x) * (phs[5] + 1) / (1 + r2) + q ** 3 * (phs[6] - m) ** 3,
        e1 * e2 * (phs[7] + phs[8] * (phs[9] - sp.Rational(3, 10) * e2) - 1) ** 2 - e1 ** 2 / 4,
        sp.Float(0.25) * (m - phs[10]) * (m + phs[10]) + phs[11] ** -2 * (phs[11] + 1) ** 2,
    ]
    for expr in cases:
        terms = _expanded(expr)
        rebuilt = sp.Add(*[c * sp.Mul(*[b ** k for b, k in key]) for key, c in terms.items()])
        assert rebuilt == sp.expand(expr), expr


def test_per_dimension_node_counts_in_the_module(tmp_path):
    """A module whose nodes of one, two and three dimensions need different counts lists
    them in QUADRATURE_NODE_FACTORS; each rule runs with its count, quadrature_error doubles
    every count, and its bound holds against rules with four times the nodes."""
    from ssi_symbolic.backends.files import load_module
    from ssi_symbolic.backends.registry import generate
    from ssi_symbolic.model.spec import make_spec
    spec = make_spec("node_counts", 2, "tanh(z1)*tanh(z2)", "erf(z1 + z2)")
    path, _ = generate(spec, tmp_path)
    mod = load_module(path)
    assert mod.QUADRATURE_NODE_FACTORS
    counts = {k: mod._nodes(k) for k in (1, 2, 3)}
    assert len(set(counts.values())) > 1
    assert counts[3] == mod.QUADRATURE_NODES
    n = mod.QUADRATURE_NODES
    try:
        mod.QUADRATURE_NODES = 2 * n
        assert {k: mod._nodes(k) for k in counts} == {k: 2 * c for k, c in counts.items()}
    finally:
        mod.QUADRATURE_NODES = n
    state = tuple({"m": 0.4}.get(name, 0.1) for name in mod.OVERLAPS)
    value, bound = mod.quadrature_error(mod.covariance, *state, eta=0.3)
    try:
        mod.QUADRATURE_NODES = 4 * n
        fine = np.asarray(mod.covariance(*state, eta=0.3), dtype=float)
    finally:
        mod.QUADRATURE_NODES = n
    assert np.all(np.abs(value - fine) <= bound)
    assert np.all(np.isfinite(bound)) and np.all(bound > 0)
    # `ssi evaluate --json` reports the counts of the dimensions that differ
    from ssi_symbolic.numeric.evaluate import evaluate
    got = evaluate(spec, dict(zip(mod.OVERLAPS, state)), out_dir=tmp_path)["quadrature"]
    assert got["nodes_per_dimension"] == counts[3]
    assert got["nodes_per_dimension_by_rule_dimension"] == {
        str(k): counts[k] for k in sorted(mod.QUADRATURE_NODE_FACTORS)}
    assert set(got["nodes_per_dimension_by_rule_dimension"]) <= {"1", "2"}


def test_unverified_rules_are_listed_and_named(tmp_path, capsys):
    """The rules whose node count no probe showed to meet the tolerance (tanh(z1) tanh(z2):
    its two-dimensional nodes, see test_choose_nodes_is_the_smallest_passing_candidate) are
    listed in QUADRATURE_UNVERIFIED, by `ssi evaluate` and in one `ssi: note:` line of `ssi
    derive` (exit code 0, the path on stdout), and Model.derive warns with the same sentence
    (QuadratureWarning); a module without them (tanh(z1) against itself) has none of these."""
    import warnings
    import ssi_symbolic as ssi
    from ssi_symbolic import cli
    from ssi_symbolic.backends.files import load_module
    from ssi_symbolic.model.spec import make_spec
    from ssi_symbolic.numeric.evaluate import evaluate
    for spec in (make_spec("unverified_two", 2, "tanh(z1)*tanh(z2)"),
                 make_spec("unverified_none", 1, "tanh(z1)", "tanh(z1)")):
        spec_file = tmp_path / f"{spec.name}.toml"
        spec_file.write_text(f'name = "{spec.name}"\nL = {spec.L}\n[teacher]\nlink = '
                             f'"{spec.teacher}"\n[student]\nlink = "{spec.student}"\n')
        path = tmp_path / f"{spec.name}.py"
        for _ in range(2):  # written, then up to date: the note both times
            capsys.readouterr()
            assert cli.main(["derive", str(spec_file), "--out", str(tmp_path)]) == 0
            out, err = capsys.readouterr()
            assert out.splitlines() == [str(path)]
            notes = [x for x in err.splitlines() if x.startswith("ssi: note:")]
            mod = load_module(path)
            if spec.L == 1:
                assert mod.QUADRATURE_UNVERIFIED == {} and notes == []
                continue
            assert set(mod.QUADRATURE_UNVERIFIED) == {2}
            assert len(notes) == 1 and str(path) in notes[0] and "1e-08" in notes[0]
            assert re.search(rf"\b2-d: {mod._nodes(2)}\b", notes[0]), notes[0]
        got = evaluate(spec, {"m": 0.3}, out_dir=tmp_path)["quadrature"]
        assert got["unverified_rule_dimensions"] == {
            str(k): mod._nodes(k) for k in mod.QUADRATURE_UNVERIFIED}
        # the Python API: Model.derive warns with the note's sentence (a QuadratureWarning)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert ssi.Model(spec, out_dir=tmp_path).derive() == path
        said = [str(w.message) for w in caught if issubclass(w.category, ssi.QuadratureWarning)]
        assert said == ([notes[0][len("ssi: note: "):]] if spec.L == 2 else [])


@pytest.mark.parametrize("teacher, student, L", [("tanh(z1)", "tanh(z1)", 1),
                                                 ("tanh(z1)*tanh(z2)", "erf(z1 + z2)", 2),
                                                 ("tanh(z1)*tanh(z2)", None, 2)])
def test_choose_nodes_is_the_smallest_passing_candidate(teacher, student, L):
    """choose_nodes (cached 2n rules, failing node first) picks, for the nodes of each
    dimension k, what the plain loop over the candidates picks: the first n whose n and 2n
    rules agree at every probe state, among those whose 2n rule has at most MAX_POINTS points
    and at most PROBE_WORK integrand evaluations (else the next candidate, unprobed). It
    returns the count of the highest dimension, the others that differ from it, and the
    dimensions whose count no test passed (the next candidate unprobed, or the last). The
    second spec has nodes of one, two and three dimensions whose counts differ; the third's
    two-dimensional nodes are unverified."""
    import types

    from ssi_symbolic.model.spec import make_spec
    from ssi_symbolic.symbolic.derive import derive
    spec = make_spec("choose_nodes", L, teacher, student)
    text = exact.module_source(derive(spec))
    ns = types.ModuleType("probe")
    exec(compile(text, "probe", "exec"), ns.__dict__)
    # the nodes with their own integrand, and the groups (one function, several integrands)
    nodes = [(getattr(ns, k), "_gh_integrand_" + k[len("_gh_node_"):]) for k in sorted(vars(ns))
             if k.startswith("_gh_node_") and hasattr(ns, "_gh_integrand_" + k[len("_gh_node_"):])]
    nodes += [(getattr(ns, k), "_gh_integrand_g" + k[len("_gh_group_"):])
              for k in sorted(vars(ns)) if k.startswith("_gh_group_")]
    assert nodes

    def dim_and_count(integrand):
        line = next(x for x in text.splitlines() if f"({integrand}, " in x)
        rest = line.split(f"({integrand}, ")[1].split(", ")
        return int(rest[0]), (int(rest[1]) if "_gh_expect_many(" in line else 1)

    info = [dim_and_count(name) for _, name in nodes]
    dims = sorted({k for k, _ in info})
    unverified = {}  # k -> whether its count was taken without a passing n versus 2n test
    if student is not None and L == 2:
        assert dims == [1, 2, 3]
    states = node_counts._probe_states(spec)
    st = [np.array([s[i] for s in states]) for i in range(len(states[0]))]
    expected = {}
    with np.errstate(all="ignore"):
        for k in dims:
            members = [f for (f, _), (d, _) in zip(nodes, info) if d == k]
            work = sum(c for d, c in info if d == k)
            cands = [n for n in node_counts.NODE_CANDIDATES
                     if (2 * n) ** k <= node_counts.MAX_POINTS]
            expected[k], unverified[k] = cands[-1], True
            for n in cands[:-1]:
                if (2 * n) ** k * work > node_counts.PROBE_WORK:
                    expected[k] = n
                    break
                if all((np.abs(np.asarray(f(*st, n=n)) - np.asarray(f(*st, n=2 * n)))
                        <= node_counts.QUADRATURE_TOLERANCE
                        * np.maximum(1.0, np.abs(np.asarray(f(*st, n=2 * n))))).all()
                       for f in members):
                    expected[k], unverified[k] = n, False
                    break
    top = expected[max(dims)]
    if student is not None and L == 2:  # one count for every dimension would not do
        assert len(set(expected.values())) > 1, expected
    if student is None:
        assert unverified == {1: False, 2: True}, unverified
    assert node_counts.choose_nodes(text, spec) == (
        top, {k: n for k, n in expected.items() if n != top},
        {k: expected[k] for k in dims if unverified[k]})


def _module(spec):
    import types

    from ssi_symbolic.symbolic.derive import derive
    ns = types.ModuleType(spec.name)
    exec(compile(exact.module_source(derive(spec)), spec.name, "exec"), ns.__dict__)
    return ns


@pytest.mark.parametrize("teacher,student,C", [
    ("hardtanh(z1)", None, None),
    ("relu(z1)", "leaky_relu(z1, 0.2)", [[1.0]]),
    ("Phi(z1)", None, [[0.5]]),
])
def test_whole_closed_form_equals_term_by_term(teacher, student, C, monkeypatch):
    """An integrand of one token group goes to the closed-form engine whole (it expands the
    product once); the module must give the numbers of the term-by-term path it replaces
    (each expanded term its own expectation), loss, drift and Cov(G), at random states (a
    quadrature Cov(G), Phi with an encoding: within the sum of the two error bounds)."""
    from ssi_symbolic.model.spec import make_spec
    from ssi_symbolic.symbolic.expectation import Expectation
    spec = make_spec("whole", 1, teacher, student, positional=C)
    whole = _module(spec)
    monkeypatch.setattr(Expectation, "_whole_closed_form", lambda self, expr, random: None)
    terms = _module(spec)
    assert whole.OUTPUT_METHODS == terms.OUTPUT_METHODS
    rng = np.random.default_rng(5)
    for _ in range(3):
        state = [rng.uniform(0.1, 0.7) if k[0] in "me" else rng.uniform(0.8, 1.3)
                 for k in whole.OVERLAPS]
        for f in ("population_loss", "drift_eta1", "drift_eta2"):
            np.testing.assert_allclose(getattr(whole, f)(*state), getattr(terms, f)(*state),
                                       rtol=1e-12, atol=1e-14, err_msg=f)
        if whole.OUTPUT_METHODS["covariance"] != "quadrature":
            np.testing.assert_allclose(whole.covariance(*state, eta=0.3),
                                       terms.covariance(*state, eta=0.3), rtol=1e-12,
                                       atol=1e-14)
            continue
        # a smooth statistic too complex for a closed form is one node whole, term by term
        # closed forms plus nodes: the same number within the two error bounds
        (a, ea), (b, eb) = (m.quadrature_error(m.covariance, *state, eta=0.3)
                            for m in (whole, terms))
        assert np.all(np.abs(np.asarray(a) - np.asarray(b)) <= np.asarray(ea) + np.asarray(eb))


def test_gh_expect_many_equals_gh_expect_entry_by_entry():
    """_gh_expect_many (one pass over the grid for a tuple of integrands) against _gh_expect
    of each entry, over several states and grids, chunked (tiny _GH_CHUNK) and not."""
    from ssi_symbolic.backends import runtime

    def integrand(u, m):
        t = np.tanh(m * u[0] + u[1])
        return (t, t ** 2 * u[0], np.exp(-u[1] ** 2 / 4) + 0 * m, 3.0)

    m = np.linspace(-0.5, 0.7, 5)
    for k, n in [(2, 16), (2, 31)]:
        for chunk in (runtime._GH_CHUNK, 600):
            old = runtime._GH_CHUNK
            runtime._GH_CHUNK = chunk
            try:
                many = runtime._gh_expect_many(integrand, k, 4, n, m)
                for j in range(4):
                    one = runtime._gh_expect(lambda u, m, j=j: integrand(u, m)[j], k, n, m)
                    np.testing.assert_allclose(many[j], one, rtol=1e-13, atol=1e-15)
            finally:
                runtime._GH_CHUNK = old
        # the rule itself, written here: n equispaced nodes on [-10, 10], weights h phi(x)
        x = np.linspace(-10.0, 10.0, n)
        w = (x[1] - x[0]) * np.exp(-x * x / 2) / np.sqrt(2 * np.pi)
        U = np.meshgrid(x, x, indexing="ij")
        W = np.multiply.outer(w, w)
        for j in range(4):
            want = [np.sum(W * np.broadcast_to(integrand(U, mi)[j], W.shape)) for mi in m]
            np.testing.assert_allclose(many[j], want, rtol=1e-13, atol=1e-15)


def test_trapezoidal_rule_widens_where_its_boundary_holds_mass(monkeypatch):
    """E[exp(a u1) tanh(u2)^2 + c] for u ~ N(0, I_2): exp(a^2 / 2) E[tanh^2] + c. For a = 12
    the mass of exp(a u1) phi(u1) sits at u1 = 12, beyond [-10, 10]: the rule widens (to
    [-20, 20] and [-40, 40], the same spacing) and gets the value to 1e-12 (E[tanh(u)^2] by
    scipy's adaptive quad); with the widening off it misses most of it.
    An integrand whose boundary holds no mass (a = 2, polynomials of degree 12) is not
    widened: one evaluation of the integrand per block, the value of the [-10, 10] rule. A
    widening whose far nodes overflow (a = 20 on [-40, 40]) is not taken."""
    from ssi_symbolic.backends import runtime
    from scipy.integrate import quad
    tanh2 = quad(lambda x: np.tanh(x) ** 2 * np.exp(-x * x / 2) / np.sqrt(2 * np.pi),
                 -40, 40, epsabs=1e-15, limit=200)[0]
    calls = []

    def integrand(u, a, c):
        calls.append(u[0].shape)
        return (np.exp(a * u[0]) * np.tanh(u[1]) ** 2 + c, u[0] ** 12 + 0 * a)

    a, c = np.array([12.0, 2.0]), np.array([0.5, -1.0])
    got = runtime._gh_expect_many(integrand, 2, 2, 128, a, c)
    want = np.exp(a * a / 2) * tanh2 + c
    np.testing.assert_allclose(got[0], want, rtol=1e-12)
    assert abs(got[1][1] - 10395.0) <= 1e-9 * 10395.0   # E[u^12] = 11!!
    assert len(calls) >= 2 and calls[1] != calls[0]       # evaluated again, wider
    monkeypatch.setattr(runtime, "_TRAP_MAX_HALF_WIDTH", 10.0)
    calls.clear()
    narrow = runtime._gh_expect_many(integrand, 2, 2, 128, a, c)
    assert len(calls) == 1
    assert abs(narrow[0][0] - want[0]) > 0.5 * want[0]
    np.testing.assert_allclose(narrow[0][1], got[0][1], rtol=1e-14)  # a = 2: not widened
    monkeypatch.setattr(runtime, "_TRAP_MAX_HALF_WIDTH", 40.0)
    calls.clear()
    runtime._gh_expect_many(integrand, 2, 2, 128, np.array([2.0]), np.array([0.0]))
    assert len(calls) == 1
    # a = 20: [-40, 40] overflows (exp(800) where phi underflows to 0): the [-20, 20] value,
    # finite, is kept (E = exp(200) E[tanh^2], its mass at u1 = 20 half inside the grid)
    far = runtime._gh_expect_many(integrand, 2, 2, 128, np.array([20.0]), np.array([0.0]))
    assert np.isfinite(far[0]).all() and 0.4 < far[0][0] / (np.exp(200.0) * tanh2) < 0.6


def test_trapezoidal_rule_keeps_the_ball_and_widens_along_diagonals():
    """The k-dimensional rule keeps the points of its [-10, 10]^k grid inside the ball
    |u| <= 10: about 1 - pi/6 of the cube's points are left out at k = 3, and its sum is the
    full cube's (written here) to 1e-14 for an integrand of degree 12 whose mass reaches far
    out, and to 1e-13 for the integrands of _gh_expect_many. Its boundary points are those with a
    neighbour along some axis outside the ball. An integrand whose mass lies beyond the ball
    along a diagonal, exp(a (u1 + u2 + u3) / sqrt 3) with a = 12 (E = exp(a^2 / 2), its mass
    at |u| = 12, inside the cube's corners), is seen there and widened: the value to 1e-10."""
    from ssi_symbolic.backends import runtime
    k, n = 3, 32
    u, w, at, _ = runtime._trap_grid(k, n)
    assert np.all(np.sum(u * u, axis=0) <= 100.0 * (1 + 1e-12))
    assert 0.45 < 1 - w.size / n ** k < 0.55
    x = np.linspace(-10.0, 10.0, n)
    wx = (x[1] - x[0]) * np.exp(-x * x / 2) / np.sqrt(2 * np.pi)
    U = np.meshgrid(x, x, x, indexing="ij")
    W = np.multiply.outer(np.multiply.outer(wx, wx), wx)
    far = lambda v: v[0] ** 6 * v[1] ** 4 * v[2] ** 2 * np.tanh(v[0] + 0.3)  # noqa: E731
    np.testing.assert_allclose(np.sum(w * far(u)), np.sum(W * far(U)), rtol=1e-14)

    def f(v, c):
        return (v[0] ** 2 * v[1] ** 2 * np.tanh(v[0] + c), np.tanh(v[1] - v[2]) ** 2)

    c = np.array([0.3, -1.1])
    got = runtime._gh_expect_many(f, k, 2, n, c)
    for j in range(2):
        want = [np.sum(W * f(U, ci)[j]) for ci in c]
        np.testing.assert_allclose(got[j], want, rtol=1e-13, atol=1e-15)
    h, r2 = x[1] - x[0], 100.0 * (1 + 1e-12)
    boundary = [i for i, p in enumerate(u.T)
                if any(abs(p[a] + s_ * h) > 10.0 + 1e-9
                       or np.sum(p * p) - p[a] ** 2 + (p[a] + s_ * h) ** 2 > r2
                       for a in range(k) for s_ in (-1, 1))]
    assert list(at) == boundary

    def g(v, a):
        return (np.exp(a * (v[0] + v[1] + v[2]) / np.sqrt(3)),)

    a = np.array([12.0, 1.0])
    got = runtime._gh_expect_many(g, k, 1, n, a)[0]
    np.testing.assert_allclose(got, np.exp(a * a / 2), rtol=1e-10)


def test_node_groups_give_the_numbers_of_single_nodes(monkeypatch):
    """Nodes over the same variables are evaluated in groups (one grid pass, one cse); the
    module must give the numbers of one function per node, every state function, and pick
    the same node count."""
    import types

    from ssi_symbolic.model.spec import make_spec
    from ssi_symbolic.symbolic.derive import derive
    spec = make_spec("groups", 2, "tanh(z1)*tanh(z2)", "tanh(z1)*tanh(z2)")
    D = derive(spec)
    mods = []
    for grouped in (True, False):
        if not grouped:
            monkeypatch.setattr(exact._Module, "node_groups", lambda self: {})
        text = exact.module_source(D)
        assert ("def _gh_group_" in text) == grouped
        ns = types.ModuleType(f"groups_{grouped}")
        exec(compile(text, ns.__name__, "exec"), ns.__dict__)
        mods.append(ns)
    a, b = mods
    assert a.QUADRATURE_NODES == b.QUADRATURE_NODES
    state = np.array([0.2, 0.55, -0.3])
    for f in ("population_loss", "drift_eta1", "drift_eta2"):
        np.testing.assert_allclose(getattr(a, f)(state), getattr(b, f)(state), rtol=1e-13,
                                   atol=1e-15, err_msg=f)
    for f in ("drift", "covariance", "ito_correction", "finite_d_correction", "drift_jacobian"):
        np.testing.assert_allclose(np.asarray(getattr(a, f)(state, eta=0.3), dtype=float),
                                   np.asarray(getattr(b, f)(state, eta=0.3), dtype=float),
                                   rtol=1e-12, atol=1e-15, err_msg=f)


@pytest.mark.parametrize("seed", range(6))
def test_dag_diff_equals_sp_diff(seed):
    """dag_diff (chain rule over the DAG, zero terms skipped) against sp.diff, by values at
    random points, on random products of closed-form pieces, nodes and kinks."""
    from ssi_symbolic.symbolic.gaussian import dag_diff
    rng = random.Random(300 + seed)
    atoms = [sp.erf(m / sp.sqrt(1 + q)), sp.asin(m / (1 + m ** 2)), sp.exp(-m ** 2 / 2),
             sp.sqrt(q - m ** 2), m, q, sp.Integer(2), m ** q, sp.Max(m, q / 3),
             GaussHermite(sp.tanh(m * u1 + q * u2) * u1, sp.Tuple(u1, u2))]
    expr = _random_product(rng, atoms)
    for s in (m, q):
        a, b = dag_diff(expr, s), sp.diff(expr, s)
        # the nodes (differentiated under the integral) read as distinct numbers
        nodes = sorted((a - b).atoms(GaussHermite), key=sp.default_sort_key)
        at = {m: sp.Rational(3, 10), q: sp.Rational(6, 5)}
        at.update({x: sp.Rational(k + 2, 7) for k, x in enumerate(nodes)})
        assert abs(sp.N((a - b).xreplace(at), 30)) < 1e-25


def test_delta_split_equals_the_expansion():
    """_delta_split distributes only what holds a delta: smooth + terms must equal the
    integrand, every term must hold one DiracDelta, the smooth part none."""
    from ssi_symbolic.symbolic.gaussian import _delta_split
    d1, d2 = sp.DiracDelta(u1 - m), sp.DiracDelta(u2 + q * u1)
    integrand = (sp.tanh(u1) * (u2 + d1 * (u1 ** 2 + m)) + sp.exp(-u2) * (1 + u1 * d2)
                 + (u1 + q) * sp.Heaviside(u2))
    smooth, terms = _delta_split(integrand)
    assert not smooth.has(sp.DiracDelta)
    assert all(len([f for f in sp.Mul.make_args(t) if isinstance(f, sp.DiracDelta)]) == 1
               for t in terms)
    assert sp.expand(smooth + sp.Add(*terms) - integrand) == 0


@pytest.mark.parametrize("seed", range(6))
def test_cse_reassembles_the_expressions_and_shares_sums(seed):
    """printing.cse (tree_cse with opt_cse's hints but no minus signs): substituting the
    assignments back, in reverse, gives every input expression's value at random points; a
    sub-sum and a reciprocal power that occur in two outputs are computed once."""
    from ssi_symbolic.backends.printing import cse
    rng = random.Random(seed)
    atoms = [x, y, m, q, sp.erf(x - y), sp.sqrt(1 - m ** 2), 1 / (q + x), sp.Integer(3)]
    exprs = [_random_product(rng, atoms) for _ in range(4)]
    exprs += [(x + y + m) * sp.exp(-q), sp.sin(x + y) / (1 + m) ** 2, (1 + m) ** 2 - 2 * q]
    repl, reduced = cse(exprs)
    assert len(reduced) == len(exprs)
    full = {}
    for s, v in repl:  # in order: each assignment reads only earlier ones
        full[s] = v.xreplace(full)
    for point in ({x: 0.3, y: -0.7, m: 0.45, q: 1.3}, {x: -1.1, y: 0.2, m: -0.2, q: 2.1}):
        point = {k: sp.Float(v, 30) for k, v in point.items()}
        for e, r in zip(exprs, reduced):
            want = sp.sympify(e).xreplace(point).evalf(30)
            diff = (r.xreplace(full) - e).xreplace(point).evalf(30)
            assert abs(complex(diff)) <= 1e-25 * max(1.0, abs(complex(want)))
    shared = {v for _, v in repl}
    assert x + y in shared  # in x + y + m and sin(x + y)
    assert any(v == (1 + m) ** 2 or v == 1 + m for v in shared)


@pytest.mark.parametrize("seed", range(6))
def test_cancel_shortcut_equals_sp_cancel(seed):
    """projection._cancel (the expansion when every denominator is an integer) returns what
    sp.cancel returns, structurally: random sums of products of the overlaps, radicals, pi and
    symbolic or irrational denominators."""
    from ssi_symbolic.symbolic.projection import _cancel
    rng = random.Random(seed)
    atoms = [m, q, sp.sqrt(1 - m ** 2), sp.sqrt(2), sp.Rational(1, 3), sp.pi, 1 / (q + 1),
             1 / (1 + sp.sqrt(2)), sp.Integer(5)]
    for _ in range(6):
        e = _random_product(rng, atoms)
        assert _cancel(e) == sp.cancel(e), e


def test_tidy_affine_reads_the_coefficients_off_the_terms():
    """_tidy_affine: the coefficients of an affine expression are those of a Poly in the
    variables (tidied); an expression of degree 2 or with a variable inside a function is
    returned expanded."""
    from ssi_symbolic.symbolic.expectation import _tidy_affine, _tidy_coefficient
    e = (sp.sqrt(2) * m * u1 / (2 * sp.sqrt(1 - m ** 2)) + u2 * sp.sqrt(1 - m ** 2 / 2) * (m + 1)
         + m / (1 + m) - 1 / (1 + m) + 3)
    P = sp.Poly(sp.expand(e), u1, u2)
    want = (_tidy_coefficient(P.coeff_monomial(1)) + _tidy_coefficient(P.coeff_monomial(u1)) * u1
            + _tidy_coefficient(P.coeff_monomial(u2)) * u2)
    assert _tidy_affine(e, (u1, u2)) == want
    assert sp.simplify(_tidy_affine(e, (u1, u2)) - e) == 0
    for bad in (u1 ** 2 + m * u2, sp.erf(u1) + u2, u1 * u2):
        assert _tidy_affine(bad, (u1, u2)) == sp.expand(bad)


_TWO_PROCESS = """
import os, sys
from pathlib import Path
from ssi_symbolic.model.spec import load_spec
from ssi_symbolic.symbolic.derive import derive
from ssi_symbolic import background
from ssi_symbolic.backends import exact
assert background.can_fork()
D = derive(load_spec(Path(sys.argv[1])))
where = Path(sys.argv[2])   # the pid of each process that chose the node count
choose = exact.choose_nodes
def spy(text, spec):
    with open(where, "a") as f:
        f.write(f"{os.getpid()}\\n")
    return choose(text, spec)
exact.choose_nodes = spy
parallel = exact.module_source(D)
pids = where.read_text().split()
assert pids and all(int(p) != os.getpid() for p in pids), 'the node choice ran in this process'
where.write_text("")
os.environ['SSI_SERIAL'] = '1'
assert not background.can_fork()
serial = exact.module_source(D)
assert [int(p) for p in where.read_text().split()] == [os.getpid()]
assert parallel == serial, 'the two paths differ'
"""


def test_node_choice_in_a_child_gives_the_same_module(tmp_path):
    """module_source with the node functions and the node choice in a forked child (a fresh,
    single-threaded process) is the same text as with everything in one process
    (SSI_SERIAL=1); the child did the node choice (the pid of the process that ran it)."""
    import subprocess
    import sys
    spec = tmp_path / "tanh_relu.toml"
    spec.write_text('name = "tanh_relu"\nL = 1\n[teacher]\nlink = "tanh(z1)"\n'
                    '[student]\nlink = "relu(z1)"\n')
    p = subprocess.run([sys.executable, "-c", _TWO_PROCESS, str(spec),
                        str(tmp_path / "pids")], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]


_SPLIT_PROBES = """
import sys
import numpy as np
from pathlib import Path
from ssi_symbolic import background
from ssi_symbolic.backends import exact, node_counts
from ssi_symbolic.model.spec import load_spec
spec = load_spec(Path(sys.argv[1]))
path, _ = exact.generate(spec, sys.argv[2])
text = path.read_text()
assert background.can_fork()
seen, forked = {}, []
original = node_counts._smallest_passing

def record(order, allowed, value, *rest):  # every member at every candidate, then the search
    for i in order:
        for n in allowed[:3]:
            seen[i, n] = value(i, n).copy()
    return original(order, allowed, value, *rest)

class Counted(background.Background):
    def __init__(self, work):
        super().__init__(work)
        forked.append(self.pid is not None)

node_counts._smallest_passing = record
node_counts.Background = Counted
node_counts.SPLIT_WORK = 10 ** 12                     # one call over the four probe states
whole, whole_seen = node_counts.choose_nodes(text, spec), dict(seen)
assert not forked
node_counts.SPLIT_WORK = 0                            # every rule split, the half in a child
seen.clear()
split, split_seen = node_counts.choose_nodes(text, spec), dict(seen)
assert forked and all(forked), forked
background.can_fork = lambda: False                   # split, no child: both halves here
forked.clear()
seen.clear()
alone, alone_seen = node_counts.choose_nodes(text, spec), dict(seen)
assert forked and not any(forked)
assert whole == split == alone, (whole, split, alone)
assert whole_seen.keys() == split_seen.keys() == alone_seen.keys() and whole_seen
for key, v in whole_seen.items():
    assert split_seen[key].shape == v.shape, key
    assert np.array_equal(split_seen[key], alone_seen[key]), key   # same arithmetic
    assert np.allclose(split_seen[key], v, rtol=1e-13, atol=1e-15), key
"""


def test_node_choice_splits_large_probes_between_two_processes(tmp_path):
    """choose_nodes evaluates a large probe rule in two halves of the probe states, the second
    in a forked child: the same counts, and per state the same values, as one call over all
    states (to round-off) and as both halves in this process (bit for bit); a child ran for
    every split rule (fresh single-threaded process, SPLIT_WORK = 0: every rule split)."""
    import subprocess
    import sys
    spec = tmp_path / "tanh_relu.toml"
    spec.write_text('name = "tanh_relu"\nL = 1\n[teacher]\nlink = "tanh(z1)"\n'
                    '[student]\nlink = "relu(z1)"\n')
    p = subprocess.run([sys.executable, "-c", _SPLIT_PROBES, str(spec), str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]


_MODULE_TEXT = """
import hashlib, os, sys
from pathlib import Path
from ssi_symbolic import background
from ssi_symbolic.backends import exact
from ssi_symbolic.model.spec import load_spec
from ssi_symbolic.symbolic.derive import derive
assert background.can_fork() == (sys.argv[2] == 'shared')
D = derive(load_spec(Path(sys.argv[1])))
os.environ['SSI_SERIAL'] = '1'   # the module step in this process either way
text = exact.module_source(D)
print(hashlib.sha256(text.encode()).hexdigest())
"""


def test_module_text_does_not_depend_on_the_expectation_split(tmp_path):
    """The three-token erf/tanh case of the link zoo: its module is the same text whether its
    expectations were shared with a forked child (each process claiming the next one, so the
    split follows the timing) or all computed in one process (SSI_SERIAL=1). Before every
    value was rebuilt by transfer.unpack, the natively built values and the child's rebuilt
    ones, structurally identical, steered one group's common subexpressions apart."""
    import subprocess
    import sys
    spec = tmp_path / "erf_tanh_L3.toml"
    spec.write_text('name = "erf_tanh_L3"\nL = 3\n[teacher]\nlink = "erf((z1 + z2 + z3)/sqrt(3))"'
                    '\n[student]\nlink = "(tanh(z1) + tanh(z2) + tanh(z3))/sqrt(3)"\n'
                    'positional = [[0.5, -0.3], [0.2, 0.8], [-0.6, 0.1]]\n')
    texts = []
    for how in ("shared", "serial"):
        env = dict(os.environ)
        env.pop("SSI_SERIAL", None)
        if how == "serial":
            env["SSI_SERIAL"] = "1"
        p = subprocess.run([sys.executable, "-c", _MODULE_TEXT, str(spec), how], env=env,
                           capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stderr[-2000:]
        texts.append(p.stdout.strip())
    assert texts[0] == texts[1]


_BACKGROUND = """
from ssi_symbolic.background import Background, can_fork
assert can_fork()
assert Background(lambda: {"n": [1, 2]}).result() == {"n": [1, 2]}
assert Background(lambda: 1 / 0).result() is None
b = Background(lambda: 3)
b.close()  # stopped before reading: reaped, no result
assert b.result() is None
"""


def test_background_returns_the_value_or_none():
    """Background, in a fresh single-threaded process (a pytest-xdist worker has threads and
    forks nothing): the child's return value; None when the work raises (the caller then
    computes it and meets the error itself) or when the child was stopped before reading."""
    import subprocess
    import sys
    from ssi_symbolic.background import Background, can_fork
    if not can_fork():  # here: nothing is forked, the caller computes
        assert Background(lambda: 1).result() is None
    p = subprocess.run([sys.executable, "-c", _BACKGROUND], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]


def test_background_without_a_child_leaves_the_work_to_the_caller(monkeypatch):
    """A failed fork (no process or memory left) or pipe gives no child and no error: result()
    is None and the caller computes the work itself."""
    import os
    from ssi_symbolic import background

    def refuse(*args):
        raise OSError(11, "Resource temporarily unavailable")
    monkeypatch.setattr(background, "can_fork", lambda: True)
    monkeypatch.setattr(os, "fork", refuse)
    assert background.Background(lambda: 1).result() is None
    monkeypatch.setattr(os, "pipe", refuse)
    assert background.Background(lambda: 1).result() is None


def test_generation_pauses_the_cyclic_gc_and_restores_it():
    """exact._without_cyclic_gc: the collector is off inside, back as it was after (also when
    the body raises, and left off when it was off)."""
    import gc
    assert gc.isenabled()
    with exact._without_cyclic_gc():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(ZeroDivisionError):
        with exact._without_cyclic_gc():
            1 / 0
    assert gc.isenabled()
    gc.disable()
    try:
        with exact._without_cyclic_gc():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_transfer_rebuilds_expressions_exactly():
    """symbolic.transfer: pack/unpack gives every expression back with the same srepr (no
    re-evaluation: a product built unevaluated stays so, where pickle would distribute its
    number), and with `known`, the subexpressions equal to known ones are those objects."""
    from ssi_symbolic.symbolic.closed_forms import NormalCDF2, NormalOrthant
    from ssi_symbolic.symbolic.transfer import pack, unpack
    unevaluated = sp.Mul._from_args((sp.Integer(2), x + y))
    exprs = [
        unevaluated,
        GaussHermite(sp.tanh(u1 + m * u2) * sp.Heaviside(u1, sp.S.Half), sp.Tuple(u1, u2)),
        NormalCDF2(m / sp.sqrt(2), -m, m / 3) + sp.erfc(-m / sp.sqrt(2)) / 2,
        NormalOrthant(m, 1, 2, m / 2, 0, sp.Rational(1, 3)),
        sp.exp(-m ** 2 / (2 * (1 - m ** 2))) / sp.sqrt(2 * sp.pi * (1 - m ** 2)),
        sp.Float("0.1", 30) * sp.pi * sp.E + sp.asin(m) + sp.Abs(q) * sp.DiracDelta(x - 1),
        sp.Max(x, 0) - sp.Min(y, 1) + sp.Piecewise((x, x > 0), (0, True)),
        sp.Integer(0), sp.Rational(-7, 3),
    ]
    sent = pack(exprs)
    # interning: the node's integrand, given as known, is the very object returned (first:
    # SymPy's constructor cache would hand back the node of an earlier unpack)
    known = sp.tanh(u1 + m * u2) * sp.Heaviside(u1, sp.S.Half)
    got = unpack(sent, known=[known])[1]
    assert got.args[0] is known
    back = unpack(sent)
    assert [sp.srepr(e) for e in back] == [sp.srepr(e) for e in exprs]
    assert back[0].args == (2, x + y)  # not 2*x + 2*y
    import pickle
    assert sp.srepr(pickle.loads(pickle.dumps(unevaluated))) != sp.srepr(unevaluated)


_TWO_ENDS = """
import os
from ssi_symbolic.background import can_fork, two_ends
assert can_fork()
mine = []
theirs = two_ends(2000, lambda ix: mine.extend(ix), lambda ix: list(ix))
assert theirs is not None and sorted(mine + theirs) == list(range(2000)), (len(mine), theirs)
assert mine == sorted(mine) and theirs == sorted(theirs, reverse=True)  # front and back
# a child that dies after claiming: no value; the parent got the rest, the caller computes it
mine = []
assert two_ends(10, lambda ix: mine.extend(ix), lambda ix: (next(ix), os._exit(3))) is None
assert set(range(10)) - set(mine) <= {9} and mine == sorted(mine)
# a child that raises: likewise
assert two_ends(5, lambda ix: list(ix), lambda ix: 1 / 0) is None
# the parent raising stops the child and propagates
try:
    two_ends(5, lambda ix: 1 / 0, lambda ix: list(ix))
except ZeroDivisionError:
    pass
else:
    raise AssertionError("the parent's error was lost")
"""


def test_two_ends_shares_the_indices_between_two_processes():
    """background.two_ends, in a fresh single-threaded process: every index is claimed once,
    by the parent from the front or by the child from the back; a child that died or raised
    returns nothing; without a child the parent claims everything."""
    import subprocess
    import sys
    from ssi_symbolic.background import can_fork, two_ends
    if not can_fork():  # here (a pytest-xdist worker has threads): everything in this process
        mine = []
        assert two_ends(7, lambda ix: mine.extend(ix), lambda ix: list(ix)) is None
        assert mine == list(range(7))
    p = subprocess.run([sys.executable, "-c", _TWO_ENDS], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]


_ORPHAN = """
import os, sys, time
from ssi_symbolic.background import can_fork, two_ends
assert can_fork()  # else the parent would sleep here with no child to report
def back(ix):
    print(os.getpid(), flush=True)  # the child's pid, then it works on
    while True:
        time.sleep(0.05)
two_ends(2, lambda ix: time.sleep(600), back)
"""


def test_a_killed_parent_takes_its_forked_child_along():
    """A parent killed with SIGKILL (a timeout, the OOM killer) cannot stop its two_ends
    child itself: the child must not go on computing, orphaned, on the second core."""
    import signal
    import subprocess
    import sys
    import time
    if not sys.platform.startswith("linux"):
        pytest.skip("forked children are a Linux feature here")
    env = {k: v for k, v in os.environ.items() if k != "SSI_SERIAL"}
    p = subprocess.Popen([sys.executable, "-c", _ORPHAN], stdout=subprocess.PIPE, text=True,
                         env=env)
    try:
        child = int(p.stdout.readline())
    finally:
        p.kill()
        p.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(child, signal.SIGKILL)
    raise AssertionError(f"the child {child} outlived its killed parent by 10 s")


def _erf_gaussian():
    from ssi_symbolic.model.spec import spec_from_dict
    from ssi_symbolic.symbolic.derive import ETA, statistics
    from ssi_symbolic.symbolic.gaussian import TokenGaussian
    spec = spec_from_dict({"name": "erf_pe", "L": 1, "teacher": {"link": "erf(z1)"},
                           "student": {"positional": [[1.0]]}})
    gauss = TokenGaussian.of(spec)
    st = statistics(spec, gauss)
    return gauss, st, ETA


def test_expect_many_merges_a_childs_share_and_computes_what_is_missing(monkeypatch):
    """Expectation.expect_many with two_ends replaced by fakes (no fork): a share computed
    first and sent through transfer (as a forked child's) gives the same values, conditions
    and kinds as one engine doing everything in order; a child that failed leaves its share
    to this process."""
    from ssi_symbolic import background
    from ssi_symbolic.symbolic.expectation import Expectation
    gauss, st, ETA = _erf_gaussian()
    items = [st.loss] + list(st.base) + [st.base[0] * st.base[-1], st.base[-1] ** 2]

    def engine():
        return Expectation(gauss, [st.loss] + st.base, extra_symbols=(ETA,))
    serial = engine()
    want = [serial.expect(t) for t in items]

    def child_first(n, front, back):  # the "child's" share (the last two) sent, then ours
        data = back(iter([n - 1, n - 2]))
        front(iter(range(n - 2)))
        return data
    monkeypatch.setattr(background, "two_ends", child_first)
    E = engine()
    got = E.expect_many(items)
    assert [sp.srepr(g) for g in got] == [sp.srepr(w) for w in want]
    assert E.kinds == serial.kinds
    assert {c for c, _ in E.conditions} == {c for c, _ in serial.conditions}
    monkeypatch.setattr(background, "two_ends", lambda n, front, back: (
        front(iter(range(n - 3))), None)[1])  # the child died with three items
    E = engine()
    assert [sp.srepr(g) for g in E.expect_many(items)] == [sp.srepr(w) for w in want]


_TWO_PROCESS_DERIVE = """
import os, sys
from pathlib import Path
from ssi_symbolic.model.spec import load_spec
from ssi_symbolic.symbolic.derive import derive
from ssi_symbolic import background
from ssi_symbolic.backends import exact
assert background.can_fork()
shares, children = [], []
two_ends = background.two_ends
def spy(n, front, back):
    got = two_ends(n, front, back)
    if isinstance(got, tuple):  # expect_many's share (the node functions' is a dict)
        shares.append(len(got[0]))
    elif got is None:
        shares.append(None)
    return got
background.two_ends = spy
Background = exact.Background
def counted(work):
    children.append(work)
    return Background(work)
exact.Background = counted
spec = load_spec(Path(sys.argv[1]))
parallel = exact.module_source(derive(spec))
assert shares and shares[0], f'the child computed no expectation: {shares}'
assert len(children) == 2, 'the node work and the forward Jacobian each in a child'
assert "JACOBIAN = 'symbolic'" in parallel
os.environ['SSI_SERIAL'] = '1'
serial = exact.module_source(derive(spec))
assert parallel == serial, 'the two paths differ'
"""


def test_derivation_on_two_cores_gives_the_same_module(tmp_path):
    """A closed-form derivation (erf with a positional encoding, quadrature for Cov(G)) with
    its expectations shared by two processes, the node work and the forward-mode Jacobian
    each in a forked child, gives the same module text as everything in one process
    (SSI_SERIAL=1), in a fresh single-threaded process."""
    import subprocess
    import sys
    spec = tmp_path / "erf_pe.toml"
    spec.write_text('name = "erf_pe"\nL = 1\n[teacher]\nlink = "erf(z1)"\n'
                    '[student]\npositional = [[1.0]]\n')
    p = subprocess.run([sys.executable, "-c", _TWO_PROCESS_DERIVE, str(spec)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]


def _distribute_by_products(expr):
    """The top-level distribution written plainly: each term a SymPy Mul of its factors."""
    if expr.is_Add:
        return sp.Add(*[_distribute_by_products(a) for a in expr.args])
    if expr.is_Mul:
        terms = [()]
        for a in expr.args:
            terms = [t + (p,) for t in terms
                     for p in sp.Add.make_args(_distribute_by_products(a))]
        return sp.Add(*[sp.Mul(*t) for t in terms])
    if expr.is_Pow and expr.exp.is_Integer and expr.exp > 1 and expr.base.is_Add:
        return _distribute_by_products(sp.Mul(*([expr.base] * int(expr.exp)), evaluate=False))
    return expr


@pytest.mark.parametrize("seed", range(10))
def test_distribute_is_the_product_by_product_distribution(seed):
    """distribute (dictionaries of factors, each distinct product built once) gives the same
    expression as building every term's Mul, on random products of sums with functions of
    sums (left alone), radicals that merge (sqrt 2 sqrt 6), pi and a negative power of a sum;
    and its value is the expression's."""
    from ssi_symbolic.symbolic.gaussian import distribute
    rng = random.Random(100 + seed)
    atoms = [sp.tanh(x + y), sp.sqrt(2) * x, sp.sqrt(6) * y, sp.pi * m, 1 / (1 + x ** 2),
             x, y - 1, sp.exp(-x * y), sp.Rational(3, 7), sp.sqrt(3)]
    expr = _random_product(rng, atoms, depth=4)
    got = distribute(expr)
    assert got == _distribute_by_products(expr)
    f, g = sp.lambdify((x, y, m), expr), sp.lambdify((x, y, m), got)
    for v in [(0.3, -0.2, 0.7), (1.1, 0.4, -0.5)]:
        assert abs(f(*v) - g(*v)) <= 1e-12 * max(1.0, abs(f(*v)))
    assert not any(a.is_Add for t in sp.Add.make_args(got) for a in sp.Mul.make_args(t))


@pytest.mark.parametrize("seed", range(6))
def test_poly_terms_are_the_polynomial_in_the_variables(seed):
    """_poly_terms: {alpha: coefficient} whose sum of coefficient * x^a y^b is the expression
    and whose coefficients are free of x and y (functions of m, radicals); None as soon as
    x or y occurs inside a function or a negative power."""
    from ssi_symbolic.symbolic.expectation import _poly_terms
    rng = random.Random(200 + seed)
    atoms = [x, y, x - 2 * y, sp.tanh(m) * x, sp.erf(q) + y, sp.sqrt(2) * m, sp.pi,
             sp.exp(m) * x * y, sp.Rational(-1, 3)]
    expr = _random_product(rng, atoms, depth=4)
    terms = _poly_terms(expr, (x, y))
    assert terms is not None
    assert all(not (c.free_symbols & {x, y}) for c in terms.values())
    total = sp.Add(*[c * x ** a * y ** b for (a, b), c in terms.items()])
    assert sp.expand(total - expr) == 0
    assert _poly_terms(expr * sp.tanh(x) + y, (x, y)) is None
    assert _poly_terms(expr / (1 + y ** 2), (x, y)) is None


def test_complex_inside_function_is_what_real_part_refuses():
    """complex_inside_function: I inside a function other than exp (an erf of a complex
    argument) is what real_part refuses (None), as is I inside a fractional power; exp(i y)
    and I outside functions are not."""
    from ssi_symbolic.symbolic.real_parts import complex_inside_function, real_part
    assert complex_inside_function(sp.exp(x) * sp.erf(x + sp.I * y) + 1)
    assert complex_inside_function(m * sp.erfc(sp.I * x / 2))
    assert not complex_inside_function(sp.exp(sp.I * x) * sp.erf(x) + sp.I * y)
    for total in (sp.erf(x + sp.I * y) * m, sp.sqrt(1 + sp.I * x) + y):
        assert real_part(total) is None


def test_real_part_is_the_real_part_of_the_value():
    """real_part (the real part of a closed form built from e^{i y}: one walk splitting
    sums, products, integer powers and exp(a + i b)) against the real part of the complex
    number the expression evaluates to, at two points, to 40 digits: nested products, a
    complex reciprocal, radicals and erf free of I, complex numeric factors."""
    e1 = sp.exp(-x ** 2 / 2 + sp.I * sp.sqrt(2) * x * m) * (1 + sp.I * m) / (q + 1)
    e2 = (sp.exp(sp.I * (x + y) / 3) * (x - 2 * sp.I * y) ** 3
          + sp.erf(x) * sp.sqrt(q) * sp.exp(-sp.I * y) / (2 * sp.I))
    e3 = (x + sp.I * sp.exp(sp.I * m)) ** -2 * sp.exp(x * y - sp.I * q / 5) + (3 + 4 * sp.I) * y
    from ssi_symbolic.symbolic.real_parts import real_part
    for expr in (e1, e2, e3, e1 * e2 - e3):
        re = real_part(expr)
        assert not re.has(sp.I)
        for point in ({x: sp.Rational(1, 3), y: -2, m: sp.Rational(7, 5), q: 2},
                      {x: -1, y: sp.Rational(3, 4), m: sp.Rational(-1, 2), q: 3}):
            want = sp.re(sp.N(expr.xreplace(point), 60))
            assert abs(sp.N(re.xreplace(point), 60) - want) < 1e-40 * (1 + abs(want))


def test_node_functions_do_not_depend_on_how_they_were_shared(monkeypatch):
    """_Module.quadrature_functions shares its items (group and node functions) between this
    process and a forked child (background.two_ends). With two_ends replaced by fakes (no
    fork): the back half printed first, then the front, and a "child" that died leaving its
    share to this process give the same sources as everything in order, and the same flag
    for unsplit kinks. tanh(z1) tanh(z2) against erf(z1 + z2) has groups and single nodes of
    one, two and three dimensions."""
    from ssi_symbolic import background
    from ssi_symbolic.model.spec import make_spec
    from ssi_symbolic.symbolic.derive import derive
    D = derive(make_spec("shared_nodes", 2, "tanh(z1)*tanh(z2)", "erf(z1 + z2)"))

    def functions(two_ends):
        monkeypatch.setattr(background, "two_ends", two_ends)
        mod = exact._Module(D)
        mod._sympy_outputs()
        return mod.quadrature_functions(), mod.unsplit_kinks, len(mod.group_list)

    def in_order(n, front, back):
        front(iter(range(n)))

    def back_first(n, front, back):  # the child's share (odd indices, from the end) first
        data = back(iter(range(n - 1 - n % 2, -1, -2)))
        front(iter(range(0, n, 2)))
        return data

    def died(n, front, back):  # the child took the last third and sent nothing
        front(iter(range(2 * n // 3)))

    want, kinks, groups = functions(in_order)
    assert groups >= 2 and len(want) > 3 * groups
    for fake in (back_first, died):
        got, got_kinks, _ = functions(fake)
        assert got == want and got_kinks == kinks


@pytest.mark.parametrize("seed", range(6))
def test_dag_map_with_a_shared_memo_is_xreplace(seed):
    """gaussian.dag_map, its memo shared by several expressions with the same rule (as
    Expectation shares it between the factors of one projection), gives xreplace's result
    for each (structurally: the same srepr): random expressions of
    Max, Min, erf, Heaviside and exp of the forms the rule replaces, and of other forms."""
    from ssi_symbolic.symbolic.gaussian import dag_map
    rng = random.Random(seed)
    y1, y2 = sp.symbols("y1 y2", real=True)
    forms = [x - y, x + 2 * y, x]
    atoms = ([sp.Max(-1, sp.Min(1, f)) for f in forms] + [sp.erf(f) for f in forms]
             + [sp.Heaviside(x - y), sp.exp(-(x + 2 * y) ** 2 / 2), sp.tanh(y), x, m,
                sp.Rational(2, 3)])
    rule = {forms[0]: y1, forms[1]: y2 - y1, forms[2]: sp.sqrt(2) * y1}
    memo, memo_unevaluated = {}, {}
    for _ in range(8):
        e = _random_product(rng, atoms, depth=3)
        want = e.xreplace(rule)
        assert sp.srepr(dag_map(e, rule, memo=memo)) == sp.srepr(want), e
        # evaluate=False (hoist_constant_parts): the same value, rebuilt without evaluation
        got = dag_map(e, rule, memo=memo_unevaluated, evaluate=False)
        v = {x: 0.3, y: -0.7, y1: 0.45, y2: -1.2, m: 0.8}
        assert abs(complex(got.subs(v).evalf()) - complex(want.subs(v).evalf())) <= 1e-12
    assert memo
