"""Random link pairs from the vocabulary: cold derivation time and an importance-sampled Monte
Carlo check of the loss, the drift and Cov(G) (issue 11, "any link").

Each case draws a teacher and a student from the vocabulary (erf, tanh, sigmoid, softplus, gelu,
silu, cos, sin, Phi, erfc, exp, Hermite polynomials, relu, Abs, leaky_relu, hardtanh, Max and,
for teachers, sign and Heaviside) at L = 1 or 2 (sums over tokens, products across tokens,
links of z1 + z2 or z1 - z2), with or without one positional direction, spherical or plain.
It is written as a spec, derived by `python -m ssi_symbolic derive` in a fresh process (the
time printed; stopped after --timeout seconds) and its module evaluated at a random interior
state against the Monte Carlo of tests/test_montecarlo.py (links parsed and differentiated
independently of the package, MATH.md's increments).

The Monte Carlo draws every standard normal coordinate with standard deviation --sd (1.6)
and weights each sample by the density ratio: links growing like exp(a z) put most of the
mass of Cov(G) (eighth powers of the link) several standard deviations out, where plain
sampling sees almost nothing and its estimate and standard error are both far too small.
Standard errors from --batches batches; a value passes within 5 of them plus the module's
quadrature error estimate.

    python3 bench/fuzz_links.py                       # 40 cases from seed 1000
    python3 bench/fuzz_links.py --seed 2000 --count 20 --n 400000 --timeout 60
    python3 bench/fuzz_links.py --keep /tmp/fuzz      # keep the specs and modules there

Prints one line per case (OK / FAIL / TIMEOUT / ERROR, seconds, METHOD, the case) and the
failing entries; the last lines list the cases that failed and those over 5 s.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ssi_symbolic.backends.files import load_module  # noqa: E402
from tests import test_montecarlo as tmc  # noqa: E402
from tests._zoo_reference import ZooLink  # noqa: E402
from tests.test_link_zoo import ZooCase  # noqa: E402

SMOOTH = ["erf({a}*{x})", "tanh({a}*{x})", "sigmoid({a}*{x})", "softplus({a}*{x})",
          "gelu({a}*{x})", "silu({a}*{x})", "cos({a}*{x})", "sin({a}*{x})", "Phi({a}*{x})",
          "exp({a}*{x})", "erfc({a}*{x})", "He(2, {x})", "{x}", "exp(-{x}**2/2)"]
KINKED = ["relu({x})", "Abs({x})", "leaky_relu({x}, 0.1)", "hardtanh({x})", "Max({x}, {a})"]
STEPS = ["sign({x})", "Heaviside({x})"]   # teachers only (a student's derivative is a delta)


def _atom(rng, pool, x):
    a = round(float(rng.uniform(0.5, 1.5)), 1)
    return pool[rng.integers(len(pool))].format(a=a, x=x)


def random_link(rng, L, teacher):
    """A link string from the vocabulary (see the module docstring)."""
    pool = SMOOTH + KINKED + (STEPS if teacher else [])
    if L == 1:
        return _atom(rng, pool, "z1")
    kind = rng.integers(4)
    if kind == 0:
        return f"{_atom(rng, pool, 'z1')} + {_atom(rng, pool, 'z2')}"
    if kind == 1:
        return f"{_atom(rng, SMOOTH, 'z1')}*{_atom(rng, SMOOTH, 'z2')}"
    if kind == 2:
        return _atom(rng, pool, "(z1 + z2)/sqrt(2)")
    return f"{_atom(rng, pool, '(z1 - z2)')} + 0.5*z1"


def random_case(seed):
    rng = np.random.default_rng(seed)
    L = int(rng.integers(1, 3))
    r = int(rng.integers(0, 2))
    C = tmc.random_positional(rng, L, r) if r else None
    teacher, student = random_link(rng, L, True), random_link(rng, L, False)
    return ZooCase(name=f"fuzz{seed}", L=L, teacher=teacher, student=student, C=C,
                   spherical=bool(rng.integers(2)), seed=seed, kind="quad")


def spec_text(case) -> str:
    lines = [f'name = "{case.name}"', f"L = {case.L}", "[teacher]",
             f'link = "{case.teacher}"', "[student]", f'link = "{case.student}"']
    if case.C:
        lines.append(f"positional = {case.C}")
    if not case.spherical:
        lines += ["[training]", "spherical = false"]
    return "\n".join(lines) + "\n"


def weighted_mc(case, m, e, q, n, sd, batches, seed, eta=tmc.ETA):
    """(value, standard error) of the loss, E G and Cov(G) (G = eta G1 + eta^2 G2) by
    importance sampling: every standard normal coordinate drawn with standard deviation sd,
    each sample weighted by prod_i phi(x_i) / (phi(x_i / sd) / sd); batch estimates
    E[w f], their mean and spread."""
    rng = np.random.default_rng(seed)
    L, r = case.L, case.r
    per = n // batches
    rows = []
    for _ in range(batches):
        zs = sd * rng.standard_normal((per, L))
        u = sd * rng.standard_normal((per, L, r))
        w = sd * rng.standard_normal((per, L))
        logw = sum((-0.5 * x ** 2 * (1.0 - 1.0 / sd ** 2) + np.log(sd)).reshape(per, -1)
                   .sum(axis=1) for x in (zs, u, w))
        with np.errstate(all="ignore"):
            with _zoo_links():
                loss, G1, G2 = tmc.increments(case, m, e, q, zs, u, w)
        wt = np.exp(logw)
        G = eta * G1 + eta ** 2 * G2
        EG = (wt[:, None] * G).mean(axis=0)
        EGG = np.einsum("n,ni,nj->ij", wt, G, G) / per
        rows.append((float((wt * loss).mean()), EG, EGG - np.outer(EG, EG)))

    def mean_se(xs):
        xs = np.asarray(xs, dtype=float)
        return xs.mean(axis=0), xs.std(axis=0, ddof=1) / np.sqrt(len(xs))
    return tuple(mean_se([row[k] for row in rows]) for k in range(3))


class _zoo_links:
    """tests.test_montecarlo's Link replaced by the zoo's (the whole vocabulary)."""

    def __enter__(self):
        self.saved, tmc.Link = tmc.Link, ZooLink

    def __exit__(self, *exc):
        tmc.Link = self.saved


def failures(label, gen, mc, extra):
    """Lines for the entries of gen outside K_SIGMA standard errors + the quadrature error
    estimate extra (+ 1e-9 (1 + |value|) for round-off) of the Monte Carlo (value, se)."""
    val, se = (np.atleast_1d(np.asarray(a, dtype=float)) for a in mc)
    gen = np.asarray(gen, dtype=float).reshape(val.shape)
    extra = np.asarray(extra, dtype=float)
    extra = extra.reshape(val.shape) if extra.size == val.size else np.broadcast_to(
        extra, val.shape)
    bad = ~(np.abs(gen - val) <= tmc.K_SIGMA * se + extra + 1e-9 * (1.0 + np.abs(val)))
    return [f"    {label}{list(idx)}: generated {gen[idx]:.6g}, Monte Carlo {val[idx]:.6g} "
            f"+- {se[idx]:.2g}, quadrature error {extra[idx]:.2g}"
            for idx in np.ndindex(val.shape) if bad[idx]]


def run(case, folder, args):
    spec = folder / f"{case.name}.toml"
    spec.write_text(spec_text(case))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "ssi_symbolic", "derive", str(spec),
                               "--out", str(folder)], capture_output=True, text=True,
                              timeout=args.timeout, cwd=folder)
    except subprocess.TimeoutExpired:
        return "TIMEOUT", args.timeout, "", []
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        return "ERROR", seconds, "", [f"    {(proc.stderr.strip().splitlines() or [''])[-1]}"]
    mod = load_module(folder / f"{case.name}.py")
    m, e, q, state = tmc.random_state(case)
    loss, drift, cov = weighted_mc(case, m, e, q, args.n, args.sd, args.batches, case.seed)
    n = len(state)
    bad = (failures("loss", mod.population_loss(*state), loss,
                    tmc.quad_err(mod, mod.population_loss, state))
           + failures("drift", np.atleast_1d(mod.drift(*state, eta=tmc.ETA)), drift,
                      tmc.quad_err(mod, mod.drift, state, eta=tmc.ETA))
           + failures("Cov(G)", np.asarray(mod.covariance(*state, eta=tmc.ETA),
                                           dtype=float).reshape(n, n), cov,
                      tmc.quad_err(mod, mod.covariance, state, eta=tmc.ETA)))
    return ("FAIL" if bad else "OK"), seconds, mod.METHOD, bad


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--count", type=int, default=40)
    p.add_argument("--n", type=int, default=400_000, help="Monte Carlo samples per case")
    p.add_argument("--sd", type=float, default=1.6, help="proposal standard deviation")
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--keep", help="folder for the specs and modules (default: temporary)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        bad, slow = [], []
        for seed in range(args.seed, args.seed + args.count):
            case = random_case(seed)
            status, seconds, method, lines = run(case, folder, args)
            print(f"{status:7s} {seconds:6.1f} s  {method:11s} {case.name}: L = {case.L}, "
                  f"C = {case.C}, {'spherical' if case.spherical else 'plain'}, teacher "
                  f"{case.teacher}, student {case.student}", flush=True)
            for line in lines:
                print(line, flush=True)
            if status != "OK":
                bad.append(case.name)
            if seconds >= 5.0:
                slow.append(f"{case.name} ({seconds:.1f} s)")
        print(f"not OK: {', '.join(bad) or 'none'}")
        print(f"5 s or more: {', '.join(slow) or 'none'}")


if __name__ == "__main__":
    main()
