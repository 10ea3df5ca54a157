"""Escape from the plateau three ways: the overlap ODE, the finite-d SDE and real SGD.

For derivations/he2_L1.toml (y = He2(z)/sqrt 2, one token, spherical online SGD, SIE 2) at
learning rate eta and dimension d, the script computes

  - the ODE escape time (m reaches the threshold 0.5, from m0 = 1/sqrt(d)): `Model.solve`,
  - the median and quartiles of the escape time of the SDE (drift + O(1/d) correction, noise
    D = Cov(G)/d) over an ensemble of paths: `Model.sde`,
  - the escape times of real d-dimensional online SGD over several seeds: `Model.simulate`,

prints them and draws them on one figure, <out>/ode_sde_simulation.png: m(t) of the ODE and of
every simulated seed (top), and the three escape-time estimates on one axis (bottom).

    python3 examples/ode_sde_simulation.py [--out DIR] [--quick] [--spec SPEC.toml]
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

import ssi_symbolic as ssi
from _common import command_line, pyplot, save

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = command_line(__doc__, "d = 200, 4 seeds, 200 SDE paths (seconds) instead of "
                      "d = 1000, 16 seeds, 1000 paths")
    ap.add_argument("--spec", default=str(ROOT / "derivations" / "he2_L1.toml"))
    args = ap.parse_args()
    out = args.out
    eta, d, seeds, runs = (0.1, 200, 4, 200) if args.quick else (0.05, 1000, 16, 1000)

    model = ssi.load(args.spec, out_dir=out / "generated")
    ode = model.solve(eta=eta, d=d)
    sde = model.sde(eta=eta, d=d, runs=runs)
    tau = ode["escape_time"]
    sim = model.simulate(eta=eta, d=d, steps=int(6 * tau * d), seeds=seeds,
                         stop_when_escaped=True)
    sim_tau = sim.escape_times["escape"]                   # NaN for a seed that did not escape
    q1, q3 = sde["quartiles"]
    print(f"{model.name}: eta = {eta}, d = {d}")
    print(f"ODE escape time         {tau:.4g}")
    print(f"SDE escape time         median {sde['median']:.4g}, quartiles [{q1:.4g}, {q3:.4g}] "
          f"({runs} paths, escaped fraction {sde['escaped_fraction']:.2f})")
    print(f"simulated escape times  median {np.nanmedian(sim_tau):.4g}, per seed "
          + " ".join(f"{x:.3g}" for x in sim_tau) + f" ({sim.wall_time:.1f} s)")

    fig, (top, bottom) = pyplot().subplots(2, 1, figsize=(7, 5.5), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    for k, m in enumerate(sim.overlaps["m"]):
        top.plot(sim.t, m, color="C1", lw=0.7, alpha=0.6,
                 label="simulated seeds" if k == 0 else None)
    top.plot(ode["t"], ode["overlaps"]["m"], color="C0", lw=2, label="ODE")
    top.axhline(ode["threshold"], color="grey", ls=":", lw=0.8)
    top.set_ylabel("m")
    top.legend(fontsize=8)
    top.set_title(f"{model.name}: eta = {eta}, d = {d}", fontsize=10)
    bottom.axvspan(q1, q3, color="C2", alpha=0.3, label="SDE quartiles")
    bottom.axvline(sde["median"], color="C2", label="SDE median")
    bottom.axvline(tau, color="C0", lw=2, label="ODE")
    bottom.plot(sim_tau, np.zeros_like(sim_tau), "o", color="C1", label="simulated")
    bottom.set_yticks([])
    bottom.set_xlabel("t = steps / d; escape time: m reaches 0.5")
    bottom.set_xlim(0, max(float(np.nanmax(sim_tau)), q3, tau) * 1.3)
    bottom.legend(fontsize=7, ncol=4, loc="upper left")
    save(fig, out / "ode_sde_simulation.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
