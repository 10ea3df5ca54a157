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

With --repeat N every row is derived N times, each in a fresh process and a fresh output
folder (cold every time), the runs of one row back to back; the table gives the fastest and
slowest time, and the last line lists the rows whose slowest `ssi derive` or `ssi sie` took
5 s or more, or failed (issue 11's targets: every link derived cold in under 5 s, `ssi sie`
under 5 s).
"""
from __future__ import annotations

import compileall
import re
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


def run(cmd) -> tuple[float, int, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    return time.perf_counter() - t0, p.returncode, p.stderr.strip().splitlines()[-1:] or [""]


def span(times) -> str:
    """'a' for one time, 'a-b' (fastest-slowest) for several."""
    lo, hi = min(times), max(times)
    return f"{lo:.2f}" if len(times) == 1 else f"{lo:.2f}-{hi:.2f}"


def main(argv) -> None:
    repeat = 1
    if "--repeat" in argv:
        k = argv.index("--repeat")
        try:
            repeat = int(argv[k + 1])
        except (IndexError, ValueError):
            raise SystemExit("bench_links: --repeat needs a whole number of runs") from None
        if repeat < 1:
            raise SystemExit("bench_links: --repeat needs at least 1 run")
        argv = argv[:k] + argv[k + 2:]
    rows = [r for r in LINKS if not argv or any(w in r[0] for w in argv)]
    import ssi_symbolic
    compileall.compile_dir(Path(ssi_symbolic.__file__).parent, quiet=1)
    width = 9 if repeat == 1 else 11
    print(f"{'link':24s} {'derive s':>{width}s} {'sie s':>{width}s}  {'METHOD':12s} nodes  "
          "per output")
    slow = []
    for name, L, teacher, student, positional in rows:
        derive_times, sie_times, failed, text = [], [], None, None
        for _ in range(repeat):
            with tempfile.TemporaryDirectory() as tmp:
                spec = Path(tmp) / f"{name}.toml"
                spec.write_text(spec_text(name, L, teacher, student, positional))
                out = Path(tmp) / "gen"
                td, rc, err = run([sys.executable, "-m", "ssi_symbolic", "derive", str(spec),
                                   "--out", str(out)])
                if rc:
                    failed = err[0]
                    break
                derive_times.append(td)
                ts, rc2, _ = run([sys.executable, "-m", "ssi_symbolic", "sie", str(spec),
                                  "--out", str(out)])
                sie_times.append(ts if not rc2 else float("nan"))
                text = (out / f"{name}.py").read_text()
        if failed is not None:
            print(f"{name:24s} failed: {failed}")
            slow.append(name)
            continue
        method = re.search(r"^METHOD = '([^']*)'", text, re.M).group(1)
        nodes = re.search(r"^QUADRATURE_NODES = (\d+)", text, re.M).group(1)
        per = re.search(r"^OUTPUT_METHODS = (.*)$", text, re.M).group(1)
        short = {"exact": "E", "closed form": "C", "quadrature": "Q"}
        per = "".join(short[m] for m in re.findall(r": '([^']*)'", per))
        sie = (span(sie_times) if all(t == t for t in sie_times) else "fail")
        print(f"{name:24s} {span(derive_times):>{width}s} {sie:>{width}s}  {method:12s} "
              f"{nodes:>5s}  {per} (loss, drift1, drift2, cov, ito, finite-d)")
        if max(derive_times) >= 5.0 or not all(t < 5.0 for t in sie_times):
            slow.append(name)
    print(f"rows with a derive or sie of 5 s or more (or failed), {repeat} run(s) each: "
          + (", ".join(slow) if slow else "none"))


if __name__ == "__main__":
    main(sys.argv[1:])
