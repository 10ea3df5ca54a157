"""Information exponents per teacher direction and the leap structure of a multi-index target
(`ssi sie` of a spec with several directions, MATH.md sections 5 and 8).

Oracles from the mathematics: for orthonormal teacher directions the fields z{k}_{l} are
independent standard Gaussians, so E[He_a(z) He_b(z)] = a! [a = b] gives the Hermite
coefficients of products of Hermite polynomials by hand; the information exponent of direction k
is the lowest order of a non-zero coefficient whose multi-index involves direction k only; the
leaps follow the greedy rule (from U = {}, the alpha with support outside U of minimal cost
sum_{k not in U} d_k(alpha) set the leap and the directions learnt)."""
import json
import math
import subprocess
import sys

from scipy.integrate import quad

from ssi_symbolic.analysis.hermite import leap_structure, static_analysis
from ssi_symbolic.cli import main
from ssi_symbolic.model.spec import load_spec, make_spec

from .conftest import DERIVATIONS, ROOT

KEYS = {"name", "directions", "information_exponents", "leaps", "leap_complexity",
        "unreachable", "method", "kmax", "tolerance", "coefficients", "note", "seconds"}

# probabilists' Hermite polynomials, written out
HE2 = "({z}**2 - 1)"
HE3 = "({z}**3 - 3*{z})"


def _spec(link, Ks, L=1, **kw):
    return make_spec("leap_case", L, link, student=link, teacher_directions=Ks,
                     student_directions=Ks, **kw)


def _steps(res):
    return [(s["step"], s["leap"], s["directions"]) for s in res["leaps"]]


# ------------------------------------------------------------------ the greedy rule itself

def test_leap_structure_from_degrees():
    # degrees (d_1, d_2, d_3) with a pure term of direction 2 of order 4. From U = {}: costs
    # 2, 3, 4, 5 -> {1} (2); U = {1}: costs 2, 4, 4 -> {2} (2); U = {1, 2}: cost 3 -> {3} (3)
    res = leap_structure([(2, 0, 0), (1, 2, 0), (0, 4, 0), (1, 1, 3)], 3)
    assert res["information_exponents"] == {"1": 2, "2": 4, "3": None}
    assert [(s["leap"], s["directions"]) for s in res["leaps"]] == [(2, [1]), (2, [2]),
                                                                  (3, [3])]
    assert res["leap_complexity"] == 3 and res["unreachable"] == []
    # nothing but the constant: no leap, every direction unreachable
    empty = leap_structure([(0, 0)], 2)
    assert empty["leaps"] == [] and empty["leap_complexity"] is None
    assert empty["unreachable"] == [1, 2]


# ------------------------------------------------------------------ exact (polynomial links)

def test_staircase_exact():
    """He1(z1) + He1(z1) He1(z2): E[y He1(z1)] = 1, E[y He1(z1) He1(z2)] = 1."""
    res = static_analysis(_spec("z1_1 + z1_1 * z2_1", 2))
    assert KEYS <= set(res) and "coefficient_errors" not in res
    assert res["method"] == "exact" and res["tolerance"] is None
    assert res["directions"] == [2, 2]
    assert res["information_exponents"] == {"1": 1, "2": None}
    assert _steps(res) == [(1, 1, [1]), (2, 1, [2])]
    assert res["leap_complexity"] == 1 and res["unreachable"] == []
    assert res["coefficients"] == {"z1_1^1": "1", "z1_1^1 z2_1^1": "1"}


def test_shipped_staircase_spec():
    res = static_analysis(load_spec(DERIVATIONS / "staircase_K2.toml"))
    assert res["information_exponents"] == {"1": 1, "2": None}
    assert _steps(res) == [(1, 1, [1]), (2, 1, [2])] and res["leap_complexity"] == 1


def test_he3_plus_mixed_term_joint_leap():
    """He3(z1) + He1(z1) He2(z2): coefficients 3! = 6 at (3, 0) and 1! 2! = 2 at (1, 2). From
    U = {} both cost 3, so the greedy rule learns {1, 2} in one leap of 3 (the sequential
    ordering {1} (3) then {2} (2) has the same leap complexity 3)."""
    link = HE3.format(z="z1_1") + " + z1_1 * " + HE2.format(z="z2_1")
    res = static_analysis(_spec(link, 2))
    assert res["information_exponents"] == {"1": 3, "2": None}
    assert res["coefficients"] == {"z1_1^3": "6", "z1_1^1 z2_1^2": "2"}
    assert _steps(res) == [(1, 3, [1, 2])]
    assert res["leap_complexity"] == 3


def test_he3_then_leap_of_two():
    """He3(z1) + He2(z1) He2(z2): (3, 0) costs 3 < 4 = cost of (2, 2), so {1} with a leap of 3,
    then (2, 2) costs d_2 = 2: {2} with a leap of 2. Complexity 3."""
    link = HE3.format(z="z1_1") + " + " + HE2.format(z="z1_1") + " * " + HE2.format(z="z2_1")
    res = static_analysis(_spec(link, 2))
    assert res["information_exponents"] == {"1": 3, "2": None}
    assert res["coefficients"] == {"z1_1^3": "6", "z1_1^2 z2_1^2": "4"}
    assert _steps(res) == [(1, 3, [1]), (2, 2, [2])]
    assert res["leap_complexity"] == 3


def test_three_way_product_one_leap_of_three():
    res = static_analysis(_spec("z1_1 * z2_1 * z3_1", 3))
    assert res["information_exponents"] == {"1": None, "2": None, "3": None}
    assert _steps(res) == [(1, 3, [1, 2, 3])] and res["leap_complexity"] == 3
    assert res["directions"] == [3, 3]


def test_ignored_direction_is_unreachable():
    res = static_analysis(_spec("z1_1**2 - 1", 2))
    assert res["information_exponents"] == {"1": 2, "2": None}
    assert _steps(res) == [(1, 2, [1])]
    assert res["unreachable"] == [2] and res["leap_complexity"] == 2


def test_sequence_fields_sum_degrees_over_tokens():
    """L = 2: z1_1 z1_2 is of degree 2 in direction 1 (He1 He1 over its two tokens)."""
    res = static_analysis(_spec("z1_1 * z1_2 + z2_1", 2, L=2))
    assert res["information_exponents"] == {"1": 2, "2": 1}
    assert _steps(res) == [(1, 1, [2]), (2, 2, [1])] and res["leap_complexity"] == 2
    assert res["coefficients"] == {"z2_1^1": "1", "z1_1^1 z1_2^1": "1"}


def test_vector_link_unions_entries():
    res = static_analysis(_spec("[z2_1**2 - 1, z1_1 * z2_1]", 2))
    assert res["information_exponents"] == {"1": None, "2": 2}
    # from U = {}: (0, 2) and (1, 1) both cost 2 -> {1, 2} at once
    assert _steps(res) == [(1, 2, [1, 2])]
    assert set(res["coefficients"]) == {"[0] z2_1^2", "[1] z1_1^1 z2_1^1"}


def test_parameters_at_their_defaults():
    # a = 0 by default: the linear term vanishes and direction 1 has no information exponent
    res = static_analysis(_spec("a * z1_1 + z1_1 * z2_1", 2, parameters={"a": 0}))
    assert res["information_exponents"] == {"1": None, "2": None}
    assert _steps(res) == [(1, 2, [1, 2])]
    res = static_analysis(_spec("a * z1_1 + z1_1 * z2_1", 2, parameters={"a": 0.5}))
    assert res["information_exponents"] == {"1": 1, "2": None}
    assert res["coefficients"]["z1_1^1"] == "1/2"


def test_one_teacher_direction_several_students():
    spec = make_spec("k1", 1, "z1_1**2 - 1", student="z1_1**2 + z2_1**2 - 2",
                     student_directions=2)
    res = static_analysis(spec)
    assert res["directions"] == [1, 2]
    assert res["information_exponents"] == {"1": 2}
    assert _steps(res) == [(1, 2, [1])] and res["unreachable"] == []


# ------------------------------------------------------------------ numerical links

def _phi(x):
    return math.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def test_erf_committee_numerical():
    res = static_analysis(load_spec(DERIVATIONS / "committee_erf_K2.toml"))
    assert KEYS | {"coefficient_errors"} <= set(res)
    assert res["method"] == "numerical" and res["tolerance"] > 0
    assert res["information_exponents"] == {"1": 1, "2": 1}
    assert _steps(res) == [(1, 1, [1, 2])] and res["leap_complexity"] == 1
    assert "kmax" in res["note"] and res["kmax"] == 8
    # E[erf(z / sqrt 2) z]
    ref, _ = quad(lambda x: math.erf(x / math.sqrt(2)) * x * _phi(x), -40, 40,
                  epsabs=1e-13, epsrel=1e-13)
    for key in ("z1_1^1", "z2_1^1"):
        assert abs(res["coefficients"][key] - ref) <= res["coefficient_errors"][key] + 1e-9
    # erf is odd: no even coefficient and no mixed one
    assert all(len(k.split()) == 1 and int(k.split("^")[1]) % 2 == 1
               for k in res["coefficients"])


def test_tanh_times_field_numerical():
    res = static_analysis(_spec("tanh(z1_1) * z2_1", 2))
    assert res["method"] == "numerical"
    assert res["information_exponents"] == {"1": None, "2": None}
    assert _steps(res) == [(1, 2, [1, 2])] and res["leap_complexity"] == 2
    # E[tanh(z1) z1] * E[z2 He1(z2)], E[z2^2] = 1
    ref, _ = quad(lambda x: math.tanh(x) * x * _phi(x), -40, 40, epsabs=1e-13, epsrel=1e-13)
    key = "z1_1^1 z2_1^1"
    assert abs(res["coefficients"][key] - ref) <= res["coefficient_errors"][key] + 1e-9
    # tanh odd, z2 of degree 1: every multi-index is (odd, 1)
    for k in res["coefficients"]:
        a, b = k.split()
        assert b == "z2_1^1" and int(a.split("^")[1]) % 2 == 1


# ------------------------------------------------------------------ command line

def test_cli_json_of_the_staircase(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ssi_symbolic", "sie",
                           str(DERIVATIONS / "staircase_K2.toml"), "--out", str(tmp_path),
                           "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert KEYS <= set(res)
    assert res["name"] == "staircase_K2" and res["directions"] == [2, 2]
    assert res["information_exponents"] == {"1": 1, "2": None}
    assert res["leaps"] == [{"step": 1, "leap": 1, "directions": [1]},
                            {"step": 2, "leap": 1, "directions": [2]}]
    assert res["leap_complexity"] == 1 and res["unreachable"] == []


def test_cli_text_line(tmp_path, capsys):
    code = main(["sie", str(DERIVATIONS / "staircase_K2.toml"), "--out", str(tmp_path)])
    out = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert code == 0 and len(out) == 1
    assert out[0].startswith("information exponents: 1: 1, 2: none; "
                             "leaps: {1} (1) -> {2} (1); leap complexity 1")


def test_cli_refuses_correlated_teacher_directions(tmp_path, capsys):
    path = tmp_path / "correlated.toml"
    path.write_text('name = "correlated"\nL = 1\n\n[teacher]\nlink = "z1_1 + z1_1 * z2_1"\n'
                    'directions = 2\noverlaps = [[1, 0.5], [0.5, 1]]\n\n[student]\n'
                    'directions = 2\n')
    code = main(["sie", str(path), "--out", str(tmp_path)])
    cap = capsys.readouterr()
    err = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1 and cap.out == ""
    assert err[0].startswith("ssi: error:") and "teacher.overlaps" in err[0]
