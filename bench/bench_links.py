"""Cold derivation and SIE times of a zoo of links (issue 11).

Each row runs two fresh processes on a spec written to a temporary folder:
`python -m ssi_symbolic derive SPEC --out DIR` (derivation and code generation, nothing cached)
and `python -m ssi_symbolic sie SPEC --out DIR` (SIE of the links and flatness of R, the module
being current by then). Prints wall times, the module's METHOD and OUTPUT_METHODS, and its
quadrature nodes. Nothing is written outside the temporary folder, except the package's own
bytecode cache: the package is byte-compiled once first, as an installation does (`pip install`
compiles it; an editable install caches it on first import). This machine's environment sets
PYTHONDONTWRITEBYTECODE=1, under which every fresh process would otherwise compile the package
again (0.1-0.3 s of each row, a cost no user's repeated runs pay).

    python3 bench/bench_links.py                 # the whole table (a few minutes)
    python3 bench/bench_links.py relu erf        # rows whose name contains one of the words
    python3 bench/bench_links.py --repeat 3      # each row 3 times: min-max of the times
    python3 bench/bench_links.py --test-zoo      # the 38 cases of tests/test_link_zoo.py
    python3 bench/bench_links.py --timeout 60    # a derivation stopped after 60 s (default 300)

With --repeat N every row is derived N times, each in a fresh process and a fresh output
folder (cold every time), the runs of one row back to back; the table gives the fastest and
slowest time, and the last line lists the rows whose slowest `ssi derive` or `ssi sie` took
5 s or more, or failed (issue 11's targets: every link derived cold in under 5 s, `ssi sie`
under 5 s). --test-zoo times the link zoo of the tests instead of the table below: each case
(teacher, student, positional encoding, parameters, noise, plain or spherical) written as a
spec and derived with its full module, Cov(G) included, whether or not the tests derive it
drift-only.
"""
from __future__ import annotations

import compileall
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (name, L, teacher, student or None, positional or None)
LINKS = [
    ("hermite_radicals_L2", 2, "He(2, z1)/sqrt(2) + He(3, z2)/sqrt(6)", None, None),
    ("floats_pi_L1", 1, "0.3*z1 + pi*He(2, z1)/10", None, None),
    ("erf_L1", 1, "erf(z1/sqrt(2))", None, None),
    ("erf_lincomb_L2", 2, "erf((z1 + z2)/sqrt(2))", None, None),
    ("Phi_pe_L1", 1, "Phi(z1)", None, [[0.5]]),
    ("relu_L1", 1, "relu(z1)", None, None),
    ("relu_pe_L1", 1, "relu(z1)", None, [[1.0]]),
    ("relu_erf_pe_L2", 2, "relu(z1) + erf(z2)", None, [[1.0], [-1.0]]),
    ("leaky_relu_L1", 1, "leaky_relu(z1, 0.2)", None, None),
    ("abs_L1", 1, "Abs(z1)", None, None),
    ("sign_teacher_L1", 1, "sign(z1)", "erf(z1)", None),
    ("max_affine_L2", 2, "Max(z1, z2, 0)", "relu(z1) + relu(z2)", None),
    ("hardtanh_L1", 1, "hardtanh(z1)", None, None),
    ("gelu_L1", 1, "gelu(z1)", None, None),
    ("exp_affine_L1", 1, "exp(0.3*z1)", None, None),
    ("bump_L1", 1, "exp(-z1**2/2)", "z1**2", None),
    ("cos_L1", 1, "cos(z1)", "z1**2", None),
    ("tanh_L1", 1, "tanh(z1)", None, None),
    ("tanh_product_L2", 2, "tanh(z1)*tanh(z2)", None, None),
    ("tanh_lincomb_L2", 2, "tanh(z1 + z2)", None, None),
    ("sigmoid_softplus_L2", 2, "sigmoid(z1) + softplus(z2)", None, None),
    ("silu_L1", 1, "silu(z1)", None, None),
    ("tanh_relu_L1", 1, "tanh(z1)", "relu(z1)", None),
]


def spec_text(name, L, teacher, student, positional) -> str:
    lines = [f'name = "{name}"', f"L = {L}", "[teacher]", f'link = "{teacher}"']
    if student or positional:
        lines.append("[student]")
    if student:
        lines.append(f'link = "{student}"')
    if positional:
        lines.append(f"positional = {positional}")
    return "\n".join(lines) + "\n"


def run(cmd, timeout=None) -> tuple[float, int, str]:
    """(wall seconds, exit code, last stderr line) of a command; exit code None on timeout."""
    t0 = time.perf_counter()
    # its own process group, so that a timeout stops the derivation's forked child too
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        return time.perf_counter() - t0, None, [f"stopped after {timeout} s"]
    return time.perf_counter() - t0, p.returncode, err.strip().splitlines()[-1:] or [""]


def test_zoo_specs() -> list:
    """(name, spec text) of every case of tests/test_link_zoo.py (full module): spec_text's
    lines, then the case's parameters, label noise and plain SGD where it has them."""
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    from tests.test_link_zoo import BY_NAME
    out = []
    for name, c in BY_NAME.items():
        C = [[float(x) for x in row] for row in c.C] if c.C else None
        lines = [spec_text(name, c.L, c.teacher, c.student, C).rstrip("\n")]
        if c.params:
            lines += ["[parameters]"] + [f"{k} = {float(v)!r}" for k, v in c.params.items()]
        if c.noise:
            lines += ["[loss]", f"noise = {float(c.noise)!r}"]
        if not c.spherical:
            lines += ["[training]", "spherical = false"]
        out.append((name, "\n".join(lines) + "\n"))
    return out


def span(times) -> str:
    """'a' for one time, 'a-b' (fastest-slowest) for several."""
    lo, hi = min(times), max(times)
    return f"{lo:.2f}" if len(times) == 1 else f"{lo:.2f}-{hi:.2f}"


def _option(argv, flag, kind, default):
    """The value after `flag` in argv (removed from it), or default."""
    if flag not in argv:
        return default
    k = argv.index(flag)
    try:
        value = kind(argv[k + 1])
    except (IndexError, ValueError):
        raise SystemExit(f"bench_links: {flag} needs a positive number") from None
    if value <= 0:
        raise SystemExit(f"bench_links: {flag} needs a positive number")
    del argv[k:k + 2]
    return value


def main(argv) -> None:
    argv = list(argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return
    repeat = _option(argv, "--repeat", int, 1)
    timeout = _option(argv, "--timeout", float, 300.0)
    zoo = "--test-zoo" in argv
    if zoo:
        argv.remove("--test-zoo")
    specs = (test_zoo_specs() if zoo
             else [(r[0], spec_text(*r)) for r in LINKS])
    rows = [(n, t) for n, t in specs if not argv or any(w in n for w in argv)]
    import ssi_symbolic
    compileall.compile_dir(Path(ssi_symbolic.__file__).parent, quiet=1)
    width = 9 if repeat == 1 else 11
    nw = max([24] + [len(n) for n, _ in rows])
    print(f"{'link':{nw}s} {'derive s':>{width}s} {'sie s':>{width}s}  {'METHOD':12s} nodes  "
          "per output")
    slow = []
    for name, text in rows:
        derive_times, sie_times, failed = [], [], None
        for _ in range(repeat):
            with tempfile.TemporaryDirectory() as tmp:
                spec = Path(tmp) / f"{name}.toml"
                spec.write_text(text)
                out = Path(tmp) / "gen"
                td, rc, err = run([sys.executable, "-m", "ssi_symbolic", "derive", str(spec),
                                   "--out", str(out)], timeout)
                if rc != 0:
                    failed = err[0]
                    break
                derive_times.append(td)
                ts, rc2, _ = run([sys.executable, "-m", "ssi_symbolic", "sie", str(spec),
                                  "--out", str(out)], timeout)
                sie_times.append(ts if rc2 == 0 else float("nan"))
                text_out = (out / f"{name}.py").read_text()
        if failed is not None:
            print(f"{name:{nw}s} failed: {failed}")
            slow.append(name)
            continue
        method = re.search(r"^METHOD = '([^']*)'", text_out, re.M).group(1)
        nodes = re.search(r"^QUADRATURE_NODES = (\d+)", text_out, re.M).group(1)
        per = re.search(r"^OUTPUT_METHODS = (.*)$", text_out, re.M).group(1)
        short = {"exact": "E", "closed form": "C", "quadrature": "Q"}
        per = "".join(short[m] for m in re.findall(r": '([^']*)'", per))
        sie = (span(sie_times) if all(t == t for t in sie_times) else "fail")
        # the counts of the rules whose dimension needs another (QUADRATURE_NODE_FACTORS)
        factors = re.search(r"^QUADRATURE_NODE_FACTORS = \{(.*)\}$", text_out, re.M)
        by_dim = ("" if factors is None or not factors.group(1) else " (by dimension: " + ", ".join(
            f"{k}-d {n}" for k, n in re.findall(r"(\d+): (\d+) /", factors.group(1))) + ")")
        # the rules whose count no probe showed to meet the tolerance (QUADRATURE_UNVERIFIED)
        unverified = re.search(r"^QUADRATURE_UNVERIFIED = \{(.+)\}$", text_out, re.M)
        if unverified:
            by_dim += " (tolerance not shown for " + ", ".join(
                f"{k}-d" for k, _ in re.findall(r"(\d+): (\d+)", unverified.group(1))) + ")"
        print(f"{name:{nw}s} {span(derive_times):>{width}s} {sie:>{width}s}  {method:12s} "
              f"{nodes:>5s}  {per} (loss, drift1, drift2, cov, ito, finite-d){by_dim}")
        if max(derive_times) >= 5.0 or not all(t < 5.0 for t in sie_times):
            slow.append(name)
    print(f"rows with a derive or sie of 5 s or more (or failed), {repeat} run(s) each: "
          + (", ".join(slow) if slow else "none"))


if __name__ == "__main__":
    main(sys.argv[1:])
