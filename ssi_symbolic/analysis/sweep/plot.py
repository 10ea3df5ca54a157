"""The figure of a sweep (matplotlib, the `plot` extra): one panel per quantity, lines against
the grid variable for a one-dimensional grid, a heat map over the first two variables
otherwise (for three or more, the slice at the first value of every further variable, said in
the title). Points without a value are gaps (lines) or grey cells (heat maps)."""
from __future__ import annotations

import numpy as np

from ...plots import _pyplot, check_png


def _log_axis(values) -> bool:
    v = np.asarray(values, dtype=float)
    return bool(len(v) > 2 and np.all(v > 0) and v.max() / v.min() >= 50)


def _label(v) -> str:
    return f"{v:.3g}"


def sweep_figure(result: dict, path) -> tuple:
    """Draw the sweep `result` (the dict of `sweep`) into the PNG `path`; returns (path, note)
    with note None or the sentence saying which slice of a grid of three or more variables is
    drawn."""
    plt = _pyplot()
    path = check_png(path)
    grid = result["grid"]
    names = list(grid)
    quantities = result["quantities"]
    rows = result["rows"]
    note = None
    fixed = {}
    if len(names) > 2:
        fixed = {n: grid[n][0] for n in names[2:]}
        note = ("the grid has {} variables: the figure shows {} and {} at ".format(
            len(names), names[0], names[1])
            + ", ".join(f"{k} = {v:g}" for k, v in fixed.items())
            + " (the first value of each further variable)")
    index = {n: {float(v): i for i, v in enumerate(grid[n])} for n in names[:2]}
    shape = tuple(len(grid[n]) for n in names[:2])
    data = {q: np.full(shape, np.nan) for q in quantities}
    for r in rows:
        if any(float(r[n]) != float(v) for n, v in fixed.items()) or r["quantity"] not in data:
            continue
        if r["value"] is None:
            continue
        idx = tuple(index[n][float(r[n])] for n in names[:2])
        data[r["quantity"]][idx] = r["value"]
    nq = len(quantities)
    title = f"{result['spec']}: method {result['method']}"
    if len(names) == 1:
        fig, axes = plt.subplots(nq, 1, figsize=(6.5, 2.6 * nq + 0.6), sharex=True,
                                 squeeze=False)
        x = np.asarray(grid[names[0]], dtype=float)
        for ax, q in zip(axes[:, 0], quantities):
            ax.plot(x, data[q], "o-", ms=3)
            ax.set_ylabel(q)
            if _log_axis(x):
                ax.set_xscale("log")
        axes[-1, 0].set_xlabel(names[0])
    else:
        ncol = min(nq, 3)
        nrow = -(-nq // ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 4.4 * nrow), squeeze=False)
        for ax in axes.flat[nq:]:
            ax.set_visible(False)
        xs, ys = grid[names[0]], grid[names[1]]
        for ax, q in zip(axes.flat, quantities):
            z = np.ma.masked_invalid(data[q].T)          # rows: names[1], columns: names[0]
            cmap = plt.get_cmap("viridis").with_extremes(bad="#cccccc")
            im = ax.imshow(z, origin="lower", aspect="auto", cmap=cmap,
                           interpolation="nearest")
            fig.colorbar(im, ax=ax, label=q)
            for setter, vals, most in ((ax.set_xticks, xs, 6), (ax.set_yticks, ys, 8)):
                step = max(1, int(np.ceil(len(vals) / most)))
                ticks = list(range(0, len(vals), step))
                setter(ticks, [_label(vals[i]) for i in ticks])
            ax.set_xlabel(names[0])
            ax.set_ylabel(names[1])
            ax.set_title(q, fontsize=9)
    if note:
        title += f"\n{names[0]} x {names[1]} at " + ", ".join(f"{k} = {v:g}"
                                                             for k, v in fixed.items())
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path, note


__all__ = ["sweep_figure"]
