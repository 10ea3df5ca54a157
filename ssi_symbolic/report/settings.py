"""The knobs of a report run: Settings, its QUICK and FULL values, and the escape threshold THETA
shared by every section (MATH.md section 4)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: the escape threshold: first t with |(m, e)| >= THETA
THETA = 0.5


@dataclass(frozen=True)
class Settings:
    """The knobs of a report run (times are t = steps / d, MATH.md section 4).

    traj_*: ODE vs SDE vs simulator trajectories (section 'trajectories'): dimension, learning
    rate, simulator seeds, SDE paths; the simulator runs until every seed has escaped (at most
    traj_cap times the ODE escape time) and the plot covers that run, and at least traj_span
    times the ODE escape time. escape_*: escape time versus d (section 'escape_vs_d'):
    learning rate, the d grid of the ODE and SDE, SDE paths per d, simulator d values per spec
    ({} skips the simulator) and seeds; escape_reduced_*: the same with the exact reduced
    simulator (MATH.md section 10, cost per step independent of d: hundreds of seeds up to large
    d, the d-dimensional simulator staying the anchor at small d; the compiled numba engine
    when Numba is installed, which the full report's 500 seeds up to d = 10^6 need: with the
    NumPy engine the d above escape_reduced_numpy_max_d are skipped, and the report says so). lr_*: learning-rate limit (section 'learning_rate'): d
    for the ODE and the number of learning rates on the grid up to the limit. gain_*: tied
    versus untied gain (section 'gain'): sequence lengths, common eta, d of the ODE
    predictions, and the simulator check (L values, d, seeds). phase_*: grid sizes in omega
    and a of the phase diagram. seed: base random seed."""

    traj_d: int = 1000
    traj_eta: float = 0.1
    traj_seeds: int = 4
    traj_runs: int = 400
    traj_span: float = 1.1
    traj_cap: float = 3.0
    escape_eta: float = 0.1
    escape_ds: tuple = (500, 2000, 8000, 32000, 128000)
    escape_runs: int = 400
    escape_sim_ds: dict = field(default_factory=dict)
    escape_sim_seeds: int = 0
    escape_reduced_ds: dict = field(default_factory=lambda: {"he2_L1": (1000,)})
    escape_reduced_seeds: int = 64
    escape_reduced_numpy_max_d: int = 16_000
    lr_d: int = 1000
    lr_points: int = 12
    gain_Ls: tuple = (1, 2, 4)
    gain_eta: float = 0.05
    gain_d: int = 10_000
    gain_sim_Ls: tuple = (2,)
    gain_sim_d: int = 500
    gain_sim_seeds: int = 8
    phase_omega: int = 41
    phase_a: int = 21
    seed: int = 0


QUICK = Settings()
FULL = Settings(traj_d=2000, traj_seeds=8, traj_runs=1000,
                escape_ds=tuple(int(round(v)) for v in np.geomspace(500, 512_000, 11)),
                escape_runs=1000, escape_sim_ds={"linear": (500, 1000, 2000),
                                                 "he2_L1": (500, 1000)},
                escape_sim_seeds=8,
                escape_reduced_ds={"linear": (1000, 10_000, 100_000, 1_000_000),
                                   "he2_L1": (1000, 10_000, 100_000)},
                escape_reduced_seeds=500, lr_points=30, gain_Ls=(1, 2, 4, 8),
                gain_sim_Ls=(2, 4), gain_sim_d=500, phase_omega=101, phase_a=51)

__all__ = ["Settings", "QUICK", "FULL", "THETA"]
