"""Parameter sweeps (`ssi sweep`): a quantity (escape time, alignment time, max_lr, loss, ...)
at every point of a grid over spec parameters, eta, d, L or the threshold, computed by the ODE,
the SDE or the simulator, locally (a process pool on all cores) or on an existing Dask cluster.

    grid.py        parsing `name=start:stop:count` / `name=a,b,c`, points, per-point seeds
    quantities.py  what a point computes, from the module shipped as source text
    table.py       the tidy CSV table: columns, reading it back, appending, rewriting
    run.py         validation and the modules derived once, the executors, resuming, `sweep`
    plot.py        the figure: lines (one variable) or heat maps (two or more)
"""
from .grid import parse_grid, point_seed
from .quantities import QUANTITIES, METHODS
from .run import SweepInterrupted, sweep

__all__ = ["sweep", "parse_grid", "point_seed", "QUANTITIES", "METHODS", "SweepInterrupted"]
