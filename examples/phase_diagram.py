"""Phase diagram of the positional-semantic attention model over (omega, a).

derivations/positional_semantic.toml is the single-layer softmax attention model of MATH.md
section 7: the teacher mixes semantic attention softmax(z* z*^T) with weight 1 - omega and a
fixed positional attention of strength a with weight omega; the student softmax(z z^T) has a
semantic overlap m and a positional overlap e. For every (omega, a) on a grid the script
classifies the population loss landscape (which minima exist, and whether gradient flow leaves
the origin along m or along e) with `Model.phase_diagram`, and root-finds the transition
omega_trans(a) where the initial direction switches from semantic to positional (from the
exact Hessian at the origin, not read from the grid). It prints the region counts, the
transition at a few a and the landscape at (omega, a) = (0.67, 1), and draws the regions with
the transition curve to <out>/phase_diagram.png.

    python3 examples/phase_diagram.py [--out DIR] [--quick]
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

import ssi_symbolic as ssi
from _common import command_line, pyplot, save

ROOT = Path(__file__).resolve().parent.parent


def reuse_committed_module(model, committed=ROOT / "generated"):
    """Copy the committed module into the model's folder when it is up to date for this spec:
    deriving the quadrature tables takes about 20 s, reading them none (the model derives its
    own module otherwise)."""
    from ssi_symbolic.backends.files import module_path
    from ssi_symbolic.backends.registry import is_current
    target = module_path(model.spec, model.out_dir)
    if not target.exists() and is_current(model.spec, committed):
        model.out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(module_path(model.spec, committed), target)


def main() -> int:
    args = command_line(__doc__, "a 21 x 11 grid instead of 101 x 51").parse_args()
    out = args.out
    n_omega, n_a = (21, 11) if args.quick else (101, 51)

    model = ssi.load(ROOT / "derivations" / "positional_semantic.toml",
                     out_dir=out / "generated")
    reuse_committed_module(model)
    result = model.phase_diagram([("omega", np.linspace(0, 1, n_omega)),
                                  ("a", np.linspace(0.5, 1, n_a))], transition_along="omega")
    idx = np.array(result["region_index"])
    print(f"{model.name}: {n_omega} x {n_a} grid over omega in [0, 1], a in [0.5, 1]")
    for i, name in enumerate(result["regions"]):
        print(f"  {int(np.sum(idx == i)):5d} points  {name}")
    rows = result["transition"]
    for row in rows[:-1:max(1, n_a // 5)] + rows[-1:]:
        om = "none on [0, 1]" if row["omega"] is None else f"{row['omega']:.6f}"
        print(f"  omega_trans(a = {row['a']:.3f}) = {om}")
    point = model.landscape(params={"omega": 0.67, "a": 1})
    print(f"at omega = 0.67, a = 1: {point['region']}; initial direction "
          f"{point['initial_direction']}; minima " + "; ".join(
              f"(e, m) = ({mn['e']:.3f}, {mn['m']:.3f}) loss {mn['loss']:.5f}"
              for mn in point["minima"]))

    from matplotlib.colors import ListedColormap
    from ssi_symbolic.analysis.landscape import REGION_COLOURS as colours
    omega, a = (np.array(v) for v in result["grids"].values())
    fig, ax = pyplot().subplots(figsize=(7.5, 5))
    ax.pcolormesh(omega, a, idx.T, cmap=ListedColormap(colours), vmin=-0.5, vmax=5.5,
                  shading="nearest")
    tr = [row for row in rows if row["omega"] is not None]
    ax.plot([row["omega"] for row in tr], [row["a"] for row in tr], "k-", lw=2,
            label="transition omega_trans(a)")
    for i, name in enumerate(result["regions"]):
        ax.plot([], [], "s", color=colours[i], label=name)
    ax.set_xlabel("omega (weight of the positional attention in the teacher)")
    ax.set_ylabel("a (strength of the positional attention)")
    ax.set_title(f"{model.name}: regions of the loss landscape (square loss)", fontsize=10)
    ax.legend(fontsize=7, loc="lower left", framealpha=0.9)
    save(fig, out / "phase_diagram.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
