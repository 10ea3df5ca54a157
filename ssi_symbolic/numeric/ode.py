"""The overlap ODE: integration with escape events, phases, fixed points, maximal learning rate.

Numeric only: everything here uses a generated module (never SymPy). Conventions: MATH.md
sections 4-5. The ODE is dX/dt = drift(X) = eta E[G1] + eta^2 E[G2] over the state X = (m, e...)
(spherical SGD) or (m, e..., q) (plain SGD).

Phases of a trajectory (theta = escape threshold, default 0.5):
    plateau    [0, t(|(m, e)| >= theta / 4))       the search phase near the initial overlap
    escape     [t(theta / 4), t(|(m, e)| >= theta)) the fast growth; its end is the escape time
    alignment  [escape time, alignment time)        the approach to the fixed point
    converged  [alignment time, end]                within `tol` of the stable fixed point
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
from scipy.integrate import solve_ivp
from scipy.optimize import brentq, root

from ..errors import SSIError, StateError
from ..model.spec import overlap_index

DEFAULT_THETA = 0.5
ALIGN_TOL = 1e-2


class DynamicsError(SSIError, RuntimeError):
    """The dynamics left the unit ball or blew up (typically: the learning rate is too large)."""


@dataclass
class OverlapODE:
    """drift(x) of a generated module at fixed eta and parameter values; x has shape (n,) or
    (n, N) for N states at once."""

    mod: object
    eta: float
    params: dict = field(default_factory=dict)
    #: None, or f(t) (vectorised): the learning rate at time t is eta f(t) (MATH.md 9)
    schedule: object = None

    def eta_at(self, t=None) -> float:
        """The learning rate at time t: eta f(t) under a schedule, else eta (also for t=None)."""
        if self.schedule is None or t is None:
            return self.eta
        return self.eta * float(self.schedule(float(t)))

    @property
    def names(self) -> tuple:
        return tuple(self.mod.OVERLAPS)

    @property
    def n(self) -> int:
        return len(self.mod.OVERLAPS)

    @property
    def spherical(self) -> bool:
        return bool(self.mod.SPHERICAL)

    @property
    def n_dir(self) -> int:
        """Number of direction overlaps (m, e... or m1..mL): all but the norms q."""
        return len(self.sem_idx) + len(self.pos_idx)

    @property
    def directions(self) -> tuple:
        """(K*, K): teacher and student directions (MATH.md section 8)."""
        return tuple(self.mod.DIRECTIONS)

    @property
    def multi(self) -> bool:
        """Several teacher or student directions: the state is M, E, Q (MATH.md section 8)."""
        return max(self.directions) > 1

    def matrices(self, x):
        """(M, E, Q) of a multi-direction state x (arrays K x K*, K x r, K x K, each entry
        broadcast over the trailing axes of x); Q[k,k] = 1 on the sphere."""
        x = np.asarray(x, dtype=float)
        Ks, K = self.directions
        r = len(self.pos_idx) // K
        tail = x.shape[1:]
        M = x[self.sem_idx].reshape((K, Ks) + tail)
        E = x[self.pos_idx].reshape((K, r) + tail)
        Q = np.zeros((K, K) + tail)
        pos = {name: i for i, name in enumerate(self.names)}
        for k in range(K):
            for h in range(k, K):
                name = f"q{k + 1}_{h + 1}"
                v = x[pos[name]] if name in pos else 1.0
                Q[k, h] = Q[h, k] = v
        return M, E, Q

    def gram(self, x) -> np.ndarray:
        """The covariance [[P, M^T, 0], [M, Q, E], [0, E^T, I]] of a token's fields at a
        multi-direction state x (one state): positive semi-definite exactly for the states
        that vectors realise."""
        M, E, Q = self.matrices(x)
        P = np.array(self.mod.TEACHER_OVERLAPS, dtype=float)
        Ks, r = P.shape[0], E.shape[1]
        Z = np.zeros
        return np.block([[P, M.T, Z((Ks, r))], [M, Q, E], [Z((r, Ks)), E.T, np.eye(r)]])

    def direction_overlaps(self, x) -> np.ndarray:
        """max_j |M[k,j]| for every student direction k (shape (K, ...)): direction k escapes
        when it reaches theta (MATH.md section 8)."""
        M, _, _ = self.matrices(x)
        return np.max(np.abs(M), axis=1)

    def _idx(self, first: str) -> np.ndarray:
        return np.array([i for i, k in enumerate(self.names) if k[0] == first], dtype=int)

    @property
    def sem_idx(self) -> np.ndarray:
        """Indices of the semantic overlaps: m (tied) or m1..mL (untied)."""
        return self._idx("m")

    @property
    def pos_idx(self) -> np.ndarray:
        """Indices of the positional overlaps e..."""
        return self._idx("e")

    @property
    def norm_idx(self) -> np.ndarray:
        """Indices of the squared norms: q (plain tied) or q1..qL (untied)."""
        return self._idx("q")

    @property
    def untied(self) -> bool:
        """One semantic overlap per token (m1..mL, q1..qL) rather than one m."""
        return "m" not in self.names and not self.multi

    def project(self, x):
        """The state on its constraint surface: for a spherical untied student the rescaling
        of the flattened weights to |W|^2 = L d, q_l -> q_l L / sum_k q_k and
        m_l -> m_l sqrt(L / sum_k q_k); other states unchanged. (The derived drift keeps
        sum_l q_l = L only on the surface, where it is exact; off it, the surface can repel, so
        the ODE and SDE evaluate the drift at the projected state and the SDE projects after
        every step, as real spherical SGD does.)"""
        if not (self.untied and self.spherical):
            return x
        x = np.array(x, dtype=float)
        f = len(self.norm_idx) / np.sum(x[self.norm_idx], axis=0)
        x[self.norm_idx] = x[self.norm_idx] * f
        x[self.sem_idx] = x[self.sem_idx] * np.sqrt(f)
        return x

    def drift(self, x, t=None):
        """eta E[G1] + eta^2 E[G2] at x, with eta = eta_at(t)."""
        return np.array(self.mod.drift(*self.project(x), eta=self.eta_at(t), **self.params))

    def eigenvalues(self, J) -> np.ndarray:
        """Eigenvalues of a drift Jacobian J that decide stability. A spherical untied student
        conserves sum_l q_l = L (the drift of the sum vanishes identically), so J maps into the
        tangent space sum_l dq_l = 0 and has a structural zero eigenvalue; the eigenvalues of J
        restricted to that space are returned instead (n - 1 of them)."""
        J = np.asarray(J, dtype=float)
        if not (self.untied and self.spherical):
            return np.linalg.eigvals(J)
        c = np.zeros(self.n)
        c[self.norm_idx] = 1.0
        Q, _ = np.linalg.qr(np.column_stack([c, np.eye(self.n)]))
        T = Q[:, 1:self.n]                      # orthonormal basis of the complement of c
        return np.linalg.eigvals(T.T @ J @ T)

    def jacobian(self, x, t=None):
        return np.array(self.mod.drift_jacobian(*self.project(x), eta=self.eta_at(t),
                                                **self.params), dtype=float)

    def loss(self, x):
        """R at the state(s) x, broadcast to the states' shape (R may not depend on them)."""
        x = np.asarray(x, dtype=float)
        R = np.asarray(self.mod.population_loss(*x, **self.params), dtype=float)
        return np.broadcast_to(R, x.shape[1:]).copy()

    def semantic(self, x):
        """|m| (tied), or sqrt(sum_l m_l^2 / L) = |W . W*| / (L d) for the flattened untied
        weights W and the tied teacher (w*, ..., w*) normalised alike (README: untied); with
        several directions max_kj |M[k,j]| (the first direction's escape, MATH.md 8)."""
        x = np.asarray(x)
        if self.multi:
            return np.max(self.direction_overlaps(x), axis=0)
        return np.sqrt(np.mean(x[self.sem_idx] ** 2, axis=0))

    def positional(self, x):
        """||e||, 0 without positional encoding; with several directions max_k ||E[k]||."""
        x = np.asarray(x)
        if not len(self.pos_idx):
            return np.zeros(np.shape(x)[1:])
        if self.multi:
            _, E, _ = self.matrices(x)
            return np.max(np.sqrt(np.sum(E ** 2, axis=1)), axis=0)
        return np.sqrt(np.sum(x[self.pos_idx] ** 2, axis=0))

    def radius(self, x):
        """|(m, e)|, with the semantic part as in `semantic`; with several directions the
        escape measure of MATH.md section 8, max_kj |M[k,j]|."""
        if self.multi:
            return self.semantic(x)
        return np.sqrt(self.semantic(x) ** 2 + self.positional(x) ** 2)

    def excess(self, x) -> float:
        """How far the state is outside its domain (> 0 outside): spherical tied m^2 + |e|^2
        <= 1, plain tied <= q, untied m_l^2 <= q_l for every token (Cauchy-Schwarz); several
        directions: minus the smallest eigenvalue of the fields' covariance `gram`."""
        x = np.asarray(x, dtype=float)
        if self.multi:
            G = self.gram(x)
            if not np.all(np.isfinite(G)):
                return math.inf
            return float(-np.min(np.linalg.eigvalsh(G)))
        if self.untied:
            return float(np.max(x[self.sem_idx] ** 2 - x[self.norm_idx]))
        q = 1.0 if self.spherical else x[self.norm_idx[0]]
        return float(np.sum(x[:self.n_dir] ** 2) - q)


def initial_state(ode: OverlapODE, d: float, m0=None, e0=None, init=None,
                  seed: int = 0) -> np.ndarray:
    """(m0, e0..., q0 = 1) with defaults m0 = 1/sqrt(d), e0 = 0 (MATH.md section 2); an untied
    student starts at m_l = m0 and q_l = 1 for every token. Several directions: see
    `random_start` (init: {overlap name: value} overriding its entries)."""
    if ode.multi:
        if m0 is not None or e0 is not None:
            raise StateError("m0/e0: a model with several directions starts from its overlaps "
                             "M, E, Q: give them as --at NAME=VALUE (init={name: value})")
        return random_start(ode, d, init=init, seed=seed)
    if init:
        raise StateError(f"--at {next(iter(init))}=...: a single-direction model starts from "
                         f"m0 and e0")
    m0 = 1.0 / math.sqrt(d) if m0 is None else float(m0)
    if ode.untied:
        if e0 not in (None, 0, 0.0):
            raise StateError("e0: an untied student has no positional overlaps")
        if abs(m0) > 1:
            raise StateError(f"initial state m0 = {m0} lies outside the unit ball")
        L = len(ode.sem_idx)
        return np.array([m0] * L + [1.0] * L, dtype=float)
    r = len(ode.pos_idx)
    if e0 is None:
        e0 = [0.0] * r
    elif np.isscalar(e0):
        e0 = [float(e0)] * r
    e0 = [float(v) for v in e0]
    if len(e0) != r:
        raise StateError(f"e0 has {len(e0)} values but the spec has r = {r} positional overlaps")
    x = [m0] + e0 + ([] if ode.spherical else [1.0])
    if math.sqrt(sum(v * v for v in x[:ode.n_dir])) > 1 + 1e-12:
        raise StateError(f"initial state m0 = {m0}, e0 = {e0} lies outside the unit ball")
    return np.array(x, dtype=float)


def random_start(ode: OverlapODE, d: float, init=None, seed: int = 0) -> np.ndarray:
    """A random-like start of a model with several directions (MATH.md section 8): the
    overlaps of K independent uniformly random student vectors in dimension d, to leading
    order, drawn with `seed`: M = N L_P^T / sqrt(d) (N a K x K* standard normal matrix, L_P
    the Cholesky factor of the teacher overlaps P), E and the Q[k,h] (k < h) independent
    N(0, 1/d), Q[k,k] = 1. init: {overlap name: value} replaces those entries; the state must
    be realisable (a positive semi-definite covariance of the fields), else StateError."""
    Ks, K = ode.directions
    rng = np.random.default_rng(seed)
    P = np.array(ode.mod.TEACHER_OVERLAPS, dtype=float)
    M = rng.standard_normal((K, Ks)) @ np.linalg.cholesky(P).T / math.sqrt(d)
    r = len(ode.pos_idx) // K
    E = rng.standard_normal((K, r)) / math.sqrt(d)
    Qoff = rng.standard_normal((K, K)) / math.sqrt(d)
    x = []
    for name in ode.names:
        kind, a, b = overlap_index(name)
        x.append({"m": M, "e": E}[kind][a, b] if kind != "q" else
                 (1.0 if a == b else Qoff[a, b]))
    x = np.array(x, dtype=float)
    for name, v in (init or {}).items():
        if name not in ode.names:
            raise StateError(f"--at {name}: not an overlap of this model (overlaps: "
                             f"{', '.join(ode.names)})")
        x[ode.names.index(name)] = float(v)
    if ode.excess(x) > 1e-12:
        raise StateError(f"initial state {_rounded(ode.names, x)} is not realisable by vectors "
                         f"(the covariance of the fields is not positive semi-definite)")
    return x


def _rounded(names, x) -> dict:
    """{name: value rounded to 6 decimals} of a state, for messages."""
    return {k: round(float(v), 6) for k, v in zip(names, x)}


def _check_eta(eta):
    if not (math.isfinite(eta) and eta > 0):
        raise StateError(f"eta = {eta}: the learning rate must be > 0")


def _event(fun, terminal=False, direction=0):
    fun.terminal, fun.direction = terminal, direction
    return fun


def _integrate(ode: OverlapODE, x0, t0, t_max, events, rtol, atol, method="DOP853"):
    jac = {} if method in ("DOP853", "RK45", "RK23") else {"jac": lambda t, x: ode.jacobian(x, t)}
    sol = solve_ivp(lambda t, x: ode.drift(x, t), (t0, t_max), x0, method=method, rtol=rtol,
                    atol=atol, events=events, dense_output=True, **jac)
    if sol.status == -1:
        raise DynamicsError(f"the ODE solver failed at t = {sol.t[-1]:.6g}: {sol.message}")
    return sol


#: the explicit method integrates up to EXPLICIT_HORIZON / eta; a run that goes on (a slow,
#: power-law approach to a degenerate fixed point, where the other directions make the ODE
#: stiff) continues with LSODA and the exact Jacobian
EXPLICIT_HORIZON = 1e4


@dataclass
class _Solution:
    """One or two solve_ivp segments seen as one: first event times, dense output, end."""

    parts: list

    @property
    def t_events(self) -> list:
        return [np.concatenate([p.t_events[k] for p in self.parts])
                for k in range(len(self.parts[0].t_events))]

    @property
    def t_end(self) -> float:
        return float(self.parts[-1].t[-1])

    @property
    def y_end(self) -> np.ndarray:
        return self.parts[-1].y[:, -1]

    def __call__(self, t):
        t = np.asarray(t, dtype=float)
        out = self.parts[0].sol(t)
        for p in self.parts[1:]:
            late = t > p.t[0]
            if late.any():
                out[:, late] = p.sol(t[late])
        return out


def _integrate_long(ode: OverlapODE, x0, t_cap, events, rtol, atol, method):
    """solve_ivp with `method` up to min(t_cap, EXPLICIT_HORIZON / eta), then, unless a
    terminal event stopped it, LSODA (with the Jacobian) up to t_cap."""
    t1 = min(t_cap, EXPLICIT_HORIZON / ode.eta)
    first = _integrate(ode, x0, 0.0, t1, events, rtol, atol, method)
    parts = [first]
    if first.status == 0 and t1 < t_cap:  # reached t1 without a terminal event
        parts.append(_integrate(ode, first.y[:, -1], t1, t_cap, events, rtol, atol, "LSODA"))
    return _Solution(parts)


def fixed_point(ode: OverlapODE, x_guess) -> tuple[np.ndarray, np.ndarray, bool]:
    """Refine a fixed point drift(x*) = 0 from a guess; returns (x*, Jacobian eigenvalues,
    stable) with stable = all real parts < 0."""
    x_guess = np.asarray(x_guess, dtype=float)
    scale = max(1.0, float(np.max(np.abs(ode.drift(x_guess)))))
    # Newton may step outside the states vectors realise (arcsin of a value above 1): NaN
    # there, and a root that is not finite or not inside is rejected below
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        sol = root(lambda x: ode.drift(x) / scale, x_guess,
                   jac=lambda x: ode.jacobian(x) / scale, method="hybr", options={"xtol": 1e-13})
    inside = ode.excess(sol.x) <= 1e-9
    x = sol.x if sol.success and inside and np.linalg.norm(sol.x - x_guess) < 0.1 else x_guess
    J = ode.jacobian(x)
    if not np.all(np.isfinite(J)):  # e.g. on the sphere |m| = 1, where sqrt(1 - m^2) = 0
        return x, np.full(ode.n, np.nan), False
    eig = ode.eigenvalues(J)
    return x, eig, bool(np.all(eig.real < 0))


def fixed_points(ode: OverlapODE, starts: int = 64, seed: int = 0) -> list[dict]:
    """Fixed points of the drift inside the unit ball (spherical) or with q in (0, 4] (plain),
    by Newton's method from the origin, the axes and `starts` random points; each with its
    Jacobian eigenvalues and stability, distinct to 1e-6, sorted by |(m, e)|."""
    rng = np.random.default_rng(seed)
    nd = ode.n_dir
    if ode.multi:
        return _report_fixed_points(ode, _solve_guesses(ode, _multi_guesses(ode, starts, rng)))
    guesses = [np.zeros(nd)]
    for i in range(nd):
        for v in (0.5, -0.5, 0.99, -0.99):
            g = np.zeros(nd)
            g[i] = v
            guesses.append(g)
    for _ in range(starts):
        v = rng.normal(size=nd)
        guesses.append(v / np.linalg.norm(v) * rng.uniform(0, 1) ** (1 / nd))
    if ode.untied:  # q_l = 1 to start, m_l from the guesses
        guesses = [np.append(g, np.ones(nd)) for g in guesses]
    elif not ode.spherical:
        guesses = [np.append(g, q) for g in guesses for q in (1.0, 0.5 + np.dot(g, g))]
    return _report_fixed_points(ode, _solve_guesses(ode, guesses))


def _multi_guesses(ode: OverlapODE, starts: int, rng) -> list:
    """Starting states of a model with several directions: the overlaps of the student at the
    origin (M = E = 0, Q = I), of students equal to permutations of the teacher directions
    (specialised), and of `starts` random configurations of vectors of every length scale."""
    Ks, K = ode.directions
    P = np.array(ode.mod.TEACHER_OVERLAPS, dtype=float)
    r = len(ode.pos_idx) // K
    n = Ks + r + K + 2
    Lp = np.linalg.cholesky(P)
    T = np.zeros((Ks, n))
    T[:, :Ks] = Lp                       # teacher vectors (rows), Gram P
    U = np.zeros((r, n))
    U[:, Ks:Ks + r] = np.eye(r)          # positional directions
    configs = [np.eye(n)[Ks + r:Ks + r + K]]
    for perm in (np.arange(K), np.arange(K)[::-1]):
        W = np.zeros((K, n))
        for k in range(K):
            W[k] = T[perm[k] % Ks] * 0.9
            W[k, Ks + r + k] = math.sqrt(1 - 0.81)
        configs.append(W)
    for _ in range(starts):
        W = rng.standard_normal((K, n))
        W[:, :Ks + r] *= rng.uniform(0, 2)
        configs.append(W)
    out = []
    for W in configs:
        if ode.spherical:
            W = W / np.linalg.norm(W, axis=1, keepdims=True)
        M, E, Q = W @ T.T, W @ U.T, W @ W.T
        x = []
        for name in ode.names:
            kind, a, b = overlap_index(name)
            x.append({"m": M, "e": E, "q": Q}[kind][a, b])
        out.append(np.array(x))
    return out


def _solve_guesses(ode: OverlapODE, guesses) -> list:
    """The distinct roots of the drift reached by Newton's method from the guesses, inside the
    state's domain (norms in (0, 4]; to 1e-6)."""
    found = []
    with np.errstate(all="ignore"):
        for g in guesses:
            sol = root(lambda x: ode.drift(x) / ode.eta, g,
                       jac=lambda x: ode.jacobian(x) / ode.eta, method="hybr")
            x = sol.x
            if not sol.success or not np.all(np.isfinite(x)):
                continue
            qs = (np.diagonal(ode.matrices(x)[2]) if ode.multi else
                  x[ode.norm_idx] if len(ode.norm_idx) else np.ones(1))
            if not np.all((qs > 0) & (qs <= 4 * len(qs))) or ode.excess(x) > 1e-9:
                continue
            if np.max(np.abs(ode.drift(x))) > 1e-9 * ode.eta:
                continue
            if any(np.linalg.norm(x - f) < 1e-6 for f in found):
                continue
            found.append(x)
    return found


def _report_fixed_points(ode: OverlapODE, found) -> list:
    """The fixed points sorted by |(m, e)|, each with its eigenvalues and stability."""
    n = ode.n
    out = []
    for x in sorted(found, key=lambda v: (ode.radius(v), tuple(v))):
        J = ode.jacobian(x)
        eig = ode.eigenvalues(J) if np.all(np.isfinite(J)) else np.full(n, np.nan)
        out.append({"state": {k: float(v) for k, v in zip(ode.names, x)},
                    "eigenvalues": [[float(e.real), float(e.imag)] for e in eig],
                    "stable": bool(np.all(eig.real < 0))})
    return out


@dataclass
class Trajectory:
    """An ODE solution with the predictions of MATH.md section 5."""

    names: tuple
    t: np.ndarray
    x: np.ndarray                 # (n, T)
    loss: np.ndarray              # (T,)
    escape_time: float | None
    semantic_escape_time: float | None
    positional_escape_time: float | None
    alignment_time: float | None
    phases: list
    fixed_point: dict | None
    eigenvalues: list | None
    stable: bool | None
    eta: float
    theta: float
    #: several directions: the escape time of each student direction k (first t at which
    #: max_j |M[k,j]| >= theta, None if never), MATH.md section 8; None for one direction
    direction_escape_times: list | None = None

    def to_json(self) -> dict:
        f = lambda v: None if v is None or not math.isfinite(v) else float(v)
        extra = ({} if self.direction_escape_times is None else
                 {"direction_escape_times": [f(v) for v in self.direction_escape_times]})
        return extra | {
            "t": [float(v) for v in self.t],
            "overlaps": {k: [float(v) for v in row] for k, row in zip(self.names, self.x)},
            "loss": [float(v) for v in self.loss],
            "escape_time": f(self.escape_time),
            "semantic_escape_time": f(self.semantic_escape_time),
            "positional_escape_time": f(self.positional_escape_time),
            "alignment_time": f(self.alignment_time),
            "phases": self.phases,
            "fixed_point": self.fixed_point,
            "eigenvalues": self.eigenvalues,
            "stable": self.stable,
            "eta": self.eta,
            "threshold": self.theta,
        }


def solve(ode: OverlapODE, x0, t_max=None, theta=DEFAULT_THETA, tol=ALIGN_TOL,
          rtol=1e-10, atol=1e-13, n_grid=400, method="DOP853",
          stop_at_escape=False) -> Trajectory:
    """Integrate the ODE from x0 and measure escape, alignment, phases and the fixed point.

    Escape events are non-terminal (all three thresholds are recorded); leaving the unit ball
    (spherical: |(m, e)| > 1; plain: m^2 + |e|^2 > q) or |x| > 1e6 stops with DynamicsError.
    Without t_max the integration runs until the state has converged (drift below 1e-10 eta)
    or t reaches 1e6 / eta; past EXPLICIT_HORIZON / eta it continues with LSODA (a slow
    approach to a degenerate fixed point is stiff for the explicit method). A threshold already
    reached at t = 0 has time 0 and the phases before it are left out. stop_at_escape: stop at
    the escape time (the fixed point is then the refinement of the state there, usually not the
    final one). Under a schedule (ode.schedule) the drift at time t uses eta f(t), and the fixed
    point is that of the drift at the final learning rate.
    """
    _check_eta(ode.eta)
    x0 = np.asarray(x0, dtype=float)
    t_cap = 1e6 / ode.eta if t_max is None else float(t_max)

    def outside(t, x):
        return ode.excess(x) - 1e-9

    def blowup(t, x):
        return float(np.max(np.abs(x)) - 1e6)

    def esc(t, x):
        return float(ode.radius(x) - theta)

    def sem(t, x):
        return float(ode.semantic(x) - theta)

    def pos(t, x):
        return float(ode.positional(x) - theta) if len(ode.pos_idx) else -1.0

    def pre(t, x):
        return float(ode.radius(x) - theta / 4)

    def converged(t, x):
        return float(np.max(np.abs(ode.drift(x, t))) - 1e-10 * ode.eta_at(t))

    events = [_event(outside, True, 1), _event(blowup, True, 1), _event(esc, stop_at_escape, 1),
              _event(sem, False, 1), _event(pos, False, 1), _event(pre, False, 1)]
    K = ode.directions[1] if ode.multi else 0
    for k in range(K):  # direction k escapes when max_j |M[k,j]| reaches theta (MATH.md 8)
        events.append(_event(lambda t, x, k=k: float(ode.direction_overlaps(x)[k] - theta),
                             False, 1))
    if t_max is None:  # stop once converged (escaped or not: a too large eta decays to 0)
        events.append(_event(converged, True, -1))
    sol = _integrate_long(ode, x0, t_cap, events, rtol, atol, method)
    t_events = sol.t_events
    if t_events[0].size or t_events[1].size:
        which = "left the unit ball" if t_events[0].size else "blew up"
        raise DynamicsError(
            f"eta = {ode.eta}: the dynamics {which} at t = {sol.t_end:.6g} "
            f"(state {_rounded(ode.names, sol.y_end)}); the learning rate is "
            f"too large (see `ssi max-lr`)")
    t_end = sol.t_end
    # a threshold already reached at t = 0 (a start beyond theta / 4 or theta) counts from 0:
    # the events only see upward crossings
    t_esc, t_sem, t_pos, t_pre = (0.0 if fn(0.0, x0) >= 0 else
                                  (float(t_events[k][0]) if t_events[k].size else None)
                                  for k, fn in ((2, esc), (3, sem), (4, pos), (5, pre)))
    t_dirs = None
    if K:
        over0 = ode.direction_overlaps(x0)
        t_dirs = [0.0 if over0[k] >= theta else
                  (float(t_events[6 + k][0]) if t_events[6 + k].size else None)
                  for k in range(K)]
    # fixed point and stability from the final state
    x_end = sol.y_end
    # under a schedule: the fixed point of the drift at the final learning rate
    ode_end = ode if ode.schedule is None else replace(ode, eta=ode.eta_at(t_end), schedule=None)
    xf, eig, stable = fixed_point(ode_end, x_end)
    fp = {k: float(v) for k, v in zip(ode.names, xf)}
    # output grid: geometric over the whole run plus linear around the escape
    grid = [np.array([0.0]), np.geomspace(min(1e-3, t_end / 10) if t_end > 0 else 1e-3,
                                         max(t_end, 1e-3), n_grid)]
    if t_pre is not None:
        lo = t_pre
        hi = min(t_end, (t_esc if t_esc is not None else t_pre) * 2 - t_pre + 1e-9)
        grid.append(np.linspace(lo, max(hi, lo), n_grid // 2))
    t = np.unique(np.clip(np.concatenate(grid), 0, t_end))
    x = sol(t)
    # alignment: first t after the escape within tol of the fixed point
    t_align = None
    if t_esc is not None:
        dist = np.linalg.norm(x - xf[:, None], axis=0)
        after = (t >= t_esc) & (dist <= tol)
        if after.any():
            k = int(np.argmax(after))
            if k > 0 and dist[k - 1] > tol:  # refine between grid points
                g = lambda s: float(np.linalg.norm(sol(np.array([s]))[:, 0] - xf) - tol)
                try:
                    t_align = brentq(g, t[k - 1], t[k], xtol=1e-10)
                except ValueError:
                    t_align = float(t[k])
            else:
                t_align = float(t[k])
    phases = []
    bounds = [("plateau", 0.0, t_pre), ("escape", t_pre, t_esc),
              ("alignment", t_esc, t_align), ("converged", t_align, t_end)]
    for name, a, b in bounds:
        if a is None:
            break
        end = b if b is not None else t_end
        if end > a or name == "converged":  # a start past theta / 4 has no plateau, etc.
            phases.append({"name": name, "start": float(a), "end": float(end)})
        if b is None:
            break
    return Trajectory(names=ode.names, t=t, x=x, loss=ode.loss(x), escape_time=t_esc,
                      semantic_escape_time=t_sem, positional_escape_time=t_pos,
                      alignment_time=t_align, phases=phases, fixed_point=fp,
                      eigenvalues=[[float(e.real), float(e.imag)] for e in eig],
                      stable=stable, eta=ode.eta, theta=theta,
                      direction_escape_times=t_dirs)


# ----------------------------------------------------------------------------------------
# maximal learning rate
# ----------------------------------------------------------------------------------------

def leading_drift(mod, params=None, m=None, direction=None):
    """Leading behaviour of dm/dt along the m axis at the origin (e = 0, q = 1):
    eta E[G1_m] ~ eta a1 m^p1 and eta^2 E[G2_m] ~ eta^2 a2 m^p2, the powers read off the values
    at m and m/2. Returns (p1, a1, p2, a2); a power is None when that part vanishes."""
    params = params or {}
    names = tuple(mod.OVERLAPS)
    sem = [i for i, k in enumerate(names) if k[0] == "m"]
    if m is None:  # quadrature values carry an absolute error: stay well above it
        m = 1e-5 if mod.METHOD == "exact" else 1e-2

    v = np.ones(len(sem)) if direction is None else np.asarray(direction, dtype=float)
    v = v / np.sqrt(np.mean(v ** 2))

    def at(mm):  # semantic overlaps m v (v = 1: all tokens alike when untied), q = 1
        x = [0.0 if k[0] == "e" else 1.0 for k in names]
        for i, vi in zip(sem, v):
            x[i] = mm * vi
        d1, d2 = mod.drift_eta1(*x, **params), mod.drift_eta2(*x, **params)
        # the drift's component along v
        return (float(np.mean([d1[i] * vi for i, vi in zip(sem, v)])),
                float(np.mean([d2[i] * vi for i, vi in zip(sem, v)])))

    v1, v2 = at(m), at(m / 2)
    out = []
    for a, b in zip(v1, v2):
        if abs(a) < 1e-300 or abs(b) < 1e-300:
            out += [None, 0.0]
        else:
            p = max(0, round(math.log2(abs(a / b))))
            out += [p, a / m ** p]
    return tuple(out)


#: at most this many Newton continuation steps in eta (each a root solve) in max_learning_rate
MAX_CONTINUATION_STEPS = 400


def max_learning_rate(mod, params=None, d=10_000, eta_hi=None, tol=1e-10,
                      direction=None) -> dict:
    """Largest eta for which the dynamics escape from the origin and reach a stable
    informative fixed point (MATH.md section 5).

    Escape: along the m axis dm/dt ~ (eta a1 + eta^2 a2) m^(k-1) must stay positive, so
    eta < -a1/a2 when a2 < 0. Stability: the informative fixed point reached at small eta is
    followed along eta (Newton continuation); the branch is lost where a Jacobian eigenvalue
    crosses zero or the point collapses to the origin, located by bisection. direction: the
    pattern of the m_l of an untied student (see `leading_drift`). A continuation that does not
    get through in MAX_CONTINUATION_STEPS steps (a fixed point on the boundary of the ball, a
    kink) gives max_lr None with the reason "unresolved: ..." and how far it got.
    """
    params = params or {}
    p1, a1, p2, a2 = leading_drift(mod, params, direction=direction)
    power = p1
    if p1 is None or a1 <= 0:
        return {"max_lr": None, "reason": "the O(eta) drift of m vanishes or is negative at the "
                "origin: no learning rate escapes (zero leading drift)", "leading_power": p1,
                "a1": a1, "a2": a2}
    m0 = 1.0 / math.sqrt(d)
    if p2 is not None and a2 < 0 and p2 <= p1:
        # escape from m0 needs eta a1 m0^p1 + eta^2 a2 m0^p2 > 0
        eta_escape = a1 * m0 ** (p1 - p2) / -a2
    else:
        eta_escape = math.inf

    # the informative fixed point at small eta, then followed along eta (continuation): the
    # maximal learning rate is where that branch loses stability or collapses to the origin
    eta0 = (eta_escape if math.isfinite(eta_escape) else 1.0) * 1e-3
    ode0 = OverlapODE(mod, eta0, params)
    x_start = initial_state(ode0, d, m0=0.6)
    if direction is not None and ode0.untied:  # an untied student along its escape pattern
        v = np.asarray(direction, dtype=float)
        x_start[ode0.sem_idx] = 0.6 * v / np.max(np.abs(v))
    try:
        tr0 = solve(ode0, x_start, t_max=1e3 / eta0, n_grid=20, method="LSODA")
    except DynamicsError:
        tr0 = None
    if tr0 is None or not tr0.stable or ode0.radius(
            np.array(list(tr0.fixed_point.values()))) < 0.1:
        return {"max_lr": None, "reason": "no stable informative fixed point even at small eta",
                "leading_power": power, "a1": a1, "a2": a2}
    x_ref = np.array(list(tr0.fixed_point.values()))

    def follow(x_prev, eta):
        """The branch's fixed point at eta from a nearby one, or None when it is lost."""
        ode = OverlapODE(mod, eta, params)
        sol = root(lambda x: ode.drift(x) / eta, x_prev, jac=lambda x: ode.jacobian(x) / eta,
                   method="hybr", options={"xtol": 1e-13})
        if not sol.success or np.max(np.abs(ode.drift(sol.x))) > 1e-7 * eta:
            return None
        if ode.radius(sol.x) < 1e-3 or ode.excess(sol.x) > 1e-9:
            return None
        if np.any(ode.eigenvalues(ode.jacobian(sol.x)).real >= 0):
            return None
        return sol.x

    top = eta_escape if math.isfinite(eta_escape) else 1e3
    x, eta, step = x_ref, eta0, eta0
    lost = None
    for _ in range(MAX_CONTINUATION_STEPS):
        if eta >= top:
            break
        nxt = min(eta + step, top * (1 - 1e-12))
        xn = follow(x, nxt)
        if xn is None:  # too long a step, or the end of the branch: halve until tiny
            if step <= max(1e-10 * eta, tol):
                lost = nxt
                break
            step /= 2
            continue
        if np.linalg.norm(xn - x) < 0.02:
            step *= 1.5
        x, eta = xn, nxt
        if nxt >= top * (1 - 1e-12):
            break
    else:  # the continuation did not get through: say so, with how far it got
        bound = (f"the escape bound {eta_escape:.6g}" if math.isfinite(eta_escape) else
                 "no escape bound")
        return {"max_lr": None, "reason": (
            f"unresolved: the continuation of the informative fixed point stalled after "
            f"{MAX_CONTINUATION_STEPS} steps at eta = {eta:.6g} (state "
            f"{_rounded(mod.OVERLAPS, x)}, near the boundary of the unit ball or "
            f"a kink of the drift), below {bound}; its stability above that eta is unknown"),
            "eta_checked": eta, "eta_escape": eta_escape if math.isfinite(eta_escape) else None,
            "leading_power": power, "a1": a1, "a2": a2}
    eta_stab, reason = (top, None) if lost is None else (eta, "stability")
    if reason is None and math.isfinite(eta_escape):
        if p1 == p2:
            why = (f"escape: near the origin dm/dt ~ (eta * {a1:.6g} + eta^2 * ({a2:.6g})) "
                   f"m^{p1}, positive only for eta < {eta_escape:.10g}")
        else:
            why = (f"escape: near the origin dm/dt ~ eta * {a1:.6g} m^{p1} + eta^2 * "
                   f"({a2:.6g}) m^{p2}, positive at m0 = 1/sqrt(d) = {m0:.4g} only for eta < "
                   f"{eta_escape:.6g} (this bound scales as d^-{(p1 - p2) / 2:g})")
        return {"max_lr": eta_escape, "reason": why + "; the informative fixed point stays "
                "stable below it", "leading_power": power, "a1": a1, "a2": a2, "d": d}
    return {"max_lr": eta_stab, "reason": (
        f"stability: at eta = {eta_stab:.8g} the informative fixed point "
        f"{_rounded(mod.OVERLAPS, x)} loses stability (an eigenvalue of the "
        f"drift Jacobian crosses zero) or merges with the origin"),
        "leading_power": power, "a1": a1, "a2": a2}
