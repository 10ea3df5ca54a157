"""Loss landscapes of the positional-semantic attention model (issue 4, MATH.md section 7).

Works on a module written by the attention backend (`ssi_symbolic.attention`), whose population
loss is linear in a few parameter-only coefficients:

    R(m, e; theta) = K(theta) + sum_k W_k(theta) B_k(m, e),
    B = (P(e)/2, X_p(m, e), Sbar_i(e)),  W = (1, -c_p(theta), -b_i(theta)),

so the basis B is evaluated once on a grid of states and every parameter point costs a matrix
product. On the quarter disk {e, m >= 0, e^2 + m^2 <= 1} (R is even in e and in m for the model
of section 7, so the axes are mirror lines), the constrained local minima are found on a polar
grid (r, phi), e = r cos(phi), m = r sin(phi), boundary r = 1 included, mirrored across the axes,
then refined by vectorised grid zooming to |dr|, |dphi| < 1e-6. A minimum is positional when
e > m, semantic otherwise. The initial direction is that of the eigenvector of the lowest
eigenvalue of the Hessian at the origin (exact, `hessian_origin` of the module): positional when
it lies closer to the e axis, which for a 2 x 2 Hessian happens exactly when R_ee < R_mm.

Regions (the six names of MATH.md section 7; n the number of local minima, 'global' the kind of
the lowest one, 'dynamics' the initial direction):

    n = 1, semantic,   semantic dynamics     Unique Semantic Minimum
    n = 1, semantic,   positional dynamics   Unique Semantic Minimum, Misaligned Dynamics
    n >= 2, global semantic, semantic dyn.   Global Semantic Minimum
    n >= 2, global semantic, positional dyn. Global Semantic Minimum, Positional Dynamics
    n >= 2, global positional                Global Positional Minimum
    n = 1, positional                        Unique Positional Minimum
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..backends.contract import LANDSCAPE_TABLES, provides, require, why_not
from ..errors import SpecError, SSIError
from ..model.checks import as_spec, check_params, refuse_schedule

REGIONS = ("Unique Semantic Minimum",
           "Unique Semantic Minimum, Misaligned Dynamics",
           "Global Semantic Minimum",
           "Global Semantic Minimum, Positional Dynamics",
           "Global Positional Minimum",
           "Unique Positional Minimum")
REGION_COLOURS = ("#1f4e9c", "#7fa7e0", "#3a9a5b", "#a6d9a0", "#f0a040", "#c0392b")
GRID_R, GRID_PHI = 48, 48
ZOOM_STEPS = 22
MERGE_DISTANCE = 2e-2


# ----------------------------------------------------------------------------- input
def parse_grid(text: str) -> tuple[str, np.ndarray]:
    """'name=start:stop:count' -> (name, linspace(start, stop, count)), both ends included."""
    if "=" not in text:
        raise SpecError(f"--grid '{text}': expected name=start:stop:count")
    name, rng = text.split("=", 1)
    parts = rng.split(":")
    if len(parts) != 3:
        raise SpecError(f"--grid '{text}': expected name=start:stop:count")
    try:
        a, b = float(parts[0]), float(parts[1])
        n = int(parts[2])
    except ValueError:
        raise SpecError(f"--grid '{text}': start and stop must be numbers, count an "
                        f"integer") from None
    if not (math.isfinite(a) and math.isfinite(b)):
        raise SpecError(f"--grid '{text}': start and stop must be finite")
    if n < 1 or (n == 1 and a != b):
        raise SpecError(f"--grid '{text}': count must be >= 1 (1 only when start = stop)")
    return name.strip(), np.linspace(a, b, n)


def load(spec_or_path, out_dir="generated"):
    """(spec, module) of an attention spec with the squared loss (tables and Hessian)."""
    from ..backends.registry import ensure_module
    spec = as_spec(spec_or_path)
    mod = ensure_module(spec, Path(out_dir))
    missing = [x for x in LANDSCAPE_TABLES if not provides(mod, x)]
    if missing:
        raise SpecError(f"{spec.source or spec.name}: landscape analysis needs a softmax "
                        f"attention spec with the squared loss (the attention backend's tables); "
                        f"this module has loss {mod.LOSS!r} and method {mod.METHOD!r}: "
                        f"{why_not(mod, missing[0])}")
    return spec, mod


def _param_arrays(spec, fixed: dict, varying: dict | None = None):
    """Parameter values broadcast: fixed values checked against the spec, varying arrays."""
    pv = check_params(spec, fixed)
    varying = varying or {}
    for k in varying:
        if k not in pv:
            raise SpecError(f"unknown parameter '{k}' (this spec's parameters: "
                            f"{', '.join(pv) or 'none'})")
    shape = np.broadcast_shapes(*[np.shape(v) for v in varying.values()]) if varying else ()
    return {k: np.broadcast_to(np.asarray(varying.get(k, v), dtype=float), shape)
            for k, v in pv.items()}, shape


# ----------------------------------------------------------------------------- basis
class Landscape:
    """R on the quarter disk for many parameter points at once (see the module docstring)."""

    def __init__(self, mod):
        self.mod = mod

    def basis(self, m, e):
        """B_k(m, e) stacked on a new first axis: P/2, X_p, Sbar_i."""
        mod = self.mod
        X = mod.cross_terms(m, e)
        sb = mod.student_mean(e)
        P = 0.5 * mod.student_square(e)
        shape = np.broadcast(np.asarray(m), np.asarray(e)).shape
        return np.stack([np.broadcast_to(P, shape)] + [np.broadcast_to(x, shape) for x in X]
                        + [np.broadcast_to(s, shape) for s in sb])

    def weights(self, params: dict):
        """(K(theta), W(theta)) with W of shape (n_theta, n_basis), parameters flattened."""
        mod = self.mod
        c, b = mod.teacher_coefficients(**params)
        K = np.asarray(mod.teacher_constant(**params), dtype=float)
        shape = np.broadcast_shapes(K.shape, *[np.shape(x) for x in c + b])
        n = int(np.prod(shape)) if shape else 1
        cols = [np.ones(n)] + [-np.broadcast_to(x, shape).reshape(n) for x in c] \
            + [-np.broadcast_to(x, shape).reshape(n) for x in b]
        return np.broadcast_to(K, shape).reshape(n), np.stack(cols, axis=1)

    def loss(self, params: dict, m, e):
        """R at states (m, e) for each flattened parameter point: shape (n_theta,) + state."""
        K, W = self.weights(params)
        B = self.basis(m, e)
        return K.reshape((-1,) + (1,) * B[0].ndim) + np.tensordot(W, B, axes=(1, 0))

    def loss_pointwise(self, K, W, m, e):
        """R for candidate k at its own states m[k], e[k] (arrays (n, ...))."""
        B = self.basis(m, e)
        return K.reshape((-1,) + (1,) * (B.ndim - 2)) + np.einsum("nk,kn...->n...", W, B)

    # -- minima
    def minima(self, params: dict, nr=GRID_R, nphi=GRID_PHI, zoom=ZOOM_STEPS):
        """Constrained local minima on the quarter disk for every parameter point: a list
        (one per flattened parameter point) of lists of (e, m, loss), lowest first."""
        K, W = self.weights(params)
        n = len(K)
        r = np.linspace(0, 1, nr + 1)[1:]
        phi = np.linspace(0, np.pi / 2, nphi)
        RR, PP = np.meshgrid(r, phi, indexing="ij")
        B = self.basis(RR * np.sin(PP), RR * np.cos(PP))        # (nb, nr, nphi)
        B0 = self.basis(np.zeros(1), np.zeros(1))[:, 0]
        dr, dphi = r[1] - r[0], phi[1] - phi[0]
        out = [[] for _ in range(n)]
        chunk = max(1, 2_000_000 // (nr * nphi))
        for s in range(0, n, chunk):
            Kc, Wc = K[s:s + chunk], W[s:s + chunk]
            R = Kc[:, None, None] + np.tensordot(Wc, B, axes=(1, 0))
            R0 = Kc + Wc @ B0
            pad = np.empty((len(Kc), nr + 2, nphi + 2))
            pad[:, 1:-1, 1:-1] = R
            pad[:, 0, :] = R0[:, None]                          # inner neighbour: the origin
            pad[:, -1, :] = np.inf                              # beyond the boundary r = 1
            pad[:, 1:-1, 0] = R[:, :, 1]                        # mirror across phi = 0
            pad[:, 1:-1, -1] = R[:, :, -2]                      # mirror across phi = pi/2
            pad[:, 0, 0] = pad[:, 0, -1] = R0
            pad[:, -1, 0] = pad[:, -1, -1] = np.inf
            ismin = np.ones(R.shape, dtype=bool)
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    if di or dj:
                        ismin &= R <= pad[:, 1 + di:nr + 1 + di, 1 + dj:nphi + 1 + dj]
            k, i, j = np.nonzero(ismin)
            cand_r, cand_p = r[i], phi[j]
            kk = k + s
            # zoom: 5 x 5 local grid, half-width one cell, halved each step
            hr, hp = dr, dphi
            off = np.linspace(-1, 1, 5)
            for _ in range(zoom):
                rr = np.clip(cand_r[:, None, None] + hr * off[None, :, None], 0, 1)
                pp = np.clip(cand_p[:, None, None] + hp * off[None, None, :], 0, np.pi / 2)
                rr, pp = np.broadcast_arrays(rr, pp)
                vals = self.loss_pointwise(K[kk], W[kk], rr * np.sin(pp), rr * np.cos(pp))
                best = vals.reshape(len(kk), -1).argmin(axis=1)
                cand_r = rr.reshape(len(kk), -1)[np.arange(len(kk)), best]
                cand_p = pp.reshape(len(kk), -1)[np.arange(len(kk)), best]
                hr, hp = hr / 2, hp / 2
            e_c, m_c = cand_r * np.cos(cand_p), cand_r * np.sin(cand_p)
            l_c = self.loss_pointwise(K[kk], W[kk], m_c, e_c) if len(kk) else np.zeros(0)
            for a in range(len(kk)):
                out[kk[a]].append((float(e_c[a]), float(m_c[a]), float(l_c[a])))
            # the origin itself, when it beats its first ring
            ring = R[:, 0, :].min(axis=1)
            for a in np.nonzero(R0 < ring)[0]:
                out[s + a].append((0.0, 0.0, float(R0[a])))
        # a teacher without z-dependence (all c_p = 0, e.g. omega = 1) makes R independent of
        # m: the minima are segments along m; each is reported once, at m = 0
        npc = len(self.mod.PIECE_ENTRY)
        flat = np.all(W[:, 1:1 + npc] == 0, axis=1)
        merged = []
        for k_, lst in enumerate(out):
            if flat[k_]:
                lst = [(t[0], 0.0, t[2]) for t in lst]
            lst = sorted(lst, key=lambda t: t[2])
            keep = []
            for t in lst:
                if all(math.hypot(t[0] - u[0], t[1] - u[1]) > MERGE_DISTANCE for u in keep):
                    keep.append(t)
            merged.append(keep)
        return merged


def _kind(e, m) -> str:
    return "positional" if e > m else "semantic"


def classify(minima, direction: str) -> str:
    """The region name from the minima [(e, m, loss), lowest first] and the initial direction."""
    if not minima:
        raise SSIError("no local minimum found on the quarter disk")
    glob = _kind(minima[0][0], minima[0][1])
    if len(minima) == 1:
        if glob == "positional":
            return REGIONS[5]
        return REGIONS[0] if direction == "semantic" else REGIONS[1]
    if glob == "positional":
        return REGIONS[4]
    return REGIONS[2] if direction == "semantic" else REGIONS[3]


def _hessians(mod, params):
    """Hessians at the origin, shape (n, 2, 2) over the flattened parameter points, order
    (m, e)."""
    H = mod.hessian_origin(**params)
    a = np.array([[np.ravel(H[i][j]) for j in range(2)] for i in range(2)])
    return np.moveaxis(a, 2, 0)


def initial_direction(H) -> str:
    """'positional' when the lowest-eigenvalue eigenvector of H (order m, e) lies closer to
    the e axis, else 'semantic'."""
    w, v = np.linalg.eigh(np.asarray(H, dtype=float))
    vec = v[:, 0]
    return "positional" if abs(vec[1]) > abs(vec[0]) else "semantic"


# ----------------------------------------------------------------------------- one call each
def analyse(spec_or_path, params=None, out_dir="generated") -> dict:
    """Landscape of one parameter point: the JSON object of `ssi landscape --json`.

    Keys: minima [{e, m, loss, kind}] (lowest first), global_minimum, hessian (2 x 2, order
    m, e, at the origin), hessian_eigenvalues, initial_direction, region, gradient_origin."""
    spec, mod = load(spec_or_path, out_dir)
    pv, _ = _param_arrays(spec, params or {})
    land = Landscape(mod)
    mins = land.minima(pv)[0]
    H = _hessians(mod, pv)[0]
    g = [float(np.ravel(x)[0]) for x in mod.gradient_origin(**pv)]
    direction = initial_direction(H)
    w, v = np.linalg.eigh(H)
    minima = [{"e": e, "m": m, "loss": l, "kind": _kind(e, m)} for e, m, l in mins]
    return {
        "spec": spec.name, "parameters": {k: float(x) for k, x in pv.items()},
        "loss_kind": spec.loss, "overlaps": ["m", "e"],
        "minima": minima, "global_minimum": minima[0],
        "hessian": H.tolist(), "hessian_eigenvalues": w.tolist(),
        "lowest_eigenvector": {"m": float(v[0, 0]), "e": float(v[1, 0])},
        "gradient_origin": {"m": g[0], "e": g[1]},
        "initial_direction": direction, "region": classify(mins, direction),
        "loss_error_estimate": float(mod.LOSS_ERROR_ESTIMATE),
    }


def surface(spec_or_path, grids, params=None, out_dir="generated") -> dict:
    """The loss on a grid of states: grids = [(name, values), (name, values)] with names m and
    e (either order); loss[i, j] at (first grid)[i], (second grid)[j], NaN outside the unit
    disk m^2 + e^2 <= 1. Returns {"axes": [n1, n2], n1: values, n2: values, "loss": 2-D array,
    "parameters": ...}."""
    spec, mod = load(spec_or_path, out_dir)
    names = [g[0] for g in grids]
    if sorted(names) != ["e", "m"]:
        raise SpecError(f"surface: expected one --grid for m and one for e, got "
                        f"{', '.join(names) or 'none'}")
    pv, _ = _param_arrays(spec, params or {})
    g = dict(grids)
    A, Bv = np.meshgrid(grids[0][1], grids[1][1], indexing="ij")
    m, e = (A, Bv) if names[0] == "m" else (Bv, A)
    loss = np.asarray(mod.population_loss(m, e, **pv), dtype=float)
    loss = np.where(m * m + e * e <= 1 + 1e-12, loss, np.nan)
    return {"axes": names, names[0]: g[names[0]], names[1]: g[names[1]], "loss": loss,
            "parameters": pv, "spec": spec.name, "loss_kind": spec.loss}


def transition(spec_or_path, along: str, fixed: dict, lo=None, hi=None, out_dir="generated",
               _cache=None):
    """The value of parameter `along` at which the initial direction switches between semantic
    and positional (R_ee - R_mm changes sign; for a 2 x 2 Hessian the lowest eigenvector
    switches axis exactly there), by Brent's method on [lo, hi] (default [0, 1]); None when
    there is no sign change. Returns (value, bracket residual)."""
    from scipy.optimize import brentq
    spec, mod = _cache or load(spec_or_path, out_dir)
    lo = 0.0 if lo is None else lo
    hi = 1.0 if hi is None else hi

    def f(x):
        pv, _ = _param_arrays(spec, fixed, {along: np.array([x])})
        H = _hessians(mod, pv)[0]
        return float(H[1, 1] - H[0, 0])

    flo, fhi = f(lo), f(hi)
    if flo == 0:
        return lo
    if np.sign(flo) == np.sign(fhi):
        xs = np.linspace(lo, hi, 65)
        fs = [f(x) for x in xs]
        idx = [i for i in range(64) if np.sign(fs[i]) != np.sign(fs[i + 1])]
        if not idx:
            return None
        lo, hi = xs[idx[0]], xs[idx[0] + 1]
    return float(brentq(f, lo, hi, xtol=1e-14, rtol=1e-14, maxiter=200))


def phase_diagram(spec_or_path, grids, transition_along=None, params=None,
                  out_dir="generated") -> dict:
    """Regions on a parameter grid and/or the transition curve: the JSON object of
    `ssi phase-diagram --json`.

    grids: [(name, values)] (one or two parameter names). With two grids, "region_index"[i][j]
    indexes "regions" at (grid 1)[i], (grid 2)[j], and "initial_direction" likewise. With
    transition_along = a parameter name, "transition" lists, for each value of the other grid,
    {other: value, along: root or None} (root finding, not read from the grid)."""
    spec, mod = load(spec_or_path, out_dir)
    names = [g[0] for g in grids]
    for nme in names:
        if nme not in spec.parameters:
            raise SpecError(f"--grid {nme}: not a parameter of {spec.name} (parameters: "
                            f"{', '.join(spec.parameters) or 'none'})")
    if len(set(names)) != len(names):
        raise SpecError("--grid: the same parameter is given twice")
    out = {"spec": spec.name, "loss_kind": spec.loss, "grids": {n: v.tolist() for n, v in grids},
           "fixed_parameters": {k: v for k, v in check_params(spec, params).items()
                                if k not in names and k != transition_along}}
    fixed = {k: v for k, v in (params or {}).items() if k not in names}
    if transition_along is not None:
        if transition_along not in spec.parameters:
            raise SpecError(f"--transition {transition_along}: not a parameter of {spec.name}")
        others = [g for g in grids if g[0] != transition_along]
        if len(others) != 1:
            raise SpecError(f"--transition {transition_along}: needs one --grid over another "
                            f"parameter (e.g. --grid a=0.5:1:51)")
        oname, ovals = others[0]
        along_vals = dict(grids).get(transition_along)
        lo = float(np.min(along_vals)) if along_vals is not None else 0.0
        hi = float(np.max(along_vals)) if along_vals is not None else 1.0
        if lo == hi:
            lo, hi = 0.0, 1.0
        rows = []
        for v in ovals:
            root = transition(spec, transition_along, {**fixed, oname: float(v)}, lo, hi,
                              _cache=(spec, mod))
            rows.append({oname: float(v), transition_along: root})
        out["transition"] = rows
        out["transition_method"] = ("Brent root of R_ee - R_mm (exact Hessian at the origin) "
                                    f"in {transition_along} on [{lo}, {hi}]")
    if len(grids) == 2:
        (n1, v1), (n2, v2) = grids
        A, Bv = np.meshgrid(v1, v2, indexing="ij")
        pv, shape = _param_arrays(spec, fixed, {n1: A, n2: Bv})
        land = Landscape(mod)
        mins = land.minima(pv)
        H = _hessians(mod, pv)
        dirs = ["positional" if h[1, 1] < h[0, 0] else "semantic" for h in H]
        idx = [REGIONS.index(classify(mn, d)) for mn, d in zip(mins, dirs)]
        out["regions"] = list(REGIONS)
        out["region_index"] = np.array(idx).reshape(shape).tolist()
        out["initial_direction"] = np.array(dirs).reshape(shape).tolist()
        out["n_minima"] = np.array([len(mn) for mn in mins]).reshape(shape).tolist()
    elif transition_along is None:
        raise SpecError("phase-diagram: give two --grid parameters, or one with --transition")
    return out


# ----------------------------------------------------------------------------- figures
def _pyplot():
    from ..plots import _pyplot as p
    return p()


def phase_diagram_figure(result: dict, path) -> Path:
    """Draw the regions of a phase_diagram result (first grid on x, second on y) with a legend,
    and the transition curve when present."""
    from matplotlib.patches import Patch
    from ..plots import check_png
    plt = _pyplot()
    path = check_png(path)
    if "region_index" not in result:
        raise SSIError("--plot: the region plot needs two --grid parameters")
    (n1, v1), (n2, v2) = list(result["grids"].items())
    idx = np.array(result["region_index"], dtype=float)
    from matplotlib.colors import ListedColormap
    fig, ax = plt.subplots(figsize=(7.5, 5))
    ax.pcolormesh(v1, v2, idx.T, cmap=ListedColormap(REGION_COLOURS), vmin=-0.5, vmax=5.5,
                  shading="nearest")
    tr = [t for t in result.get("transition") or []
          if t.get(n1) is not None and t.get(n2) is not None]
    if tr:
        ax.plot([t[n1] for t in tr], [t[n2] for t in tr], "k-", lw=1.5)
    ax.set_xlabel(n1)
    ax.set_ylabel(n2)
    present = sorted(set(int(i) for i in idx.ravel()))
    handles = [Patch(color=REGION_COLOURS[i], label=REGIONS[i]) for i in present]
    if tr:
        handles.append(plt.Line2D([], [], color="k", label="semantic/positional transition"))
    ax.legend(handles=handles, fontsize=7, loc="best", framealpha=0.85)
    ax.set_title(f"{result.get('spec', '')}: phase diagram ({result.get('loss_kind', 'square')} "
                 f"loss)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def surface_figure(result: dict, path) -> Path:
    """Contour plot of a surface result (e on x, m on y), NaN outside the disk left blank."""
    from ..plots import check_png
    plt = _pyplot()
    path = check_png(path)
    e, m = np.asarray(result["e"]), np.asarray(result["m"])
    loss = np.asarray(result["loss"])
    if result["axes"][0] == "m":
        loss = loss.T                                            # rows e, columns m
    fig, ax = plt.subplots(figsize=(6, 5))
    cs = ax.contourf(e, m, loss.T, levels=40, cmap="viridis")
    fig.colorbar(cs, ax=ax, label=f"population loss ({result.get('loss_kind', 'square')})")
    ax.set_xlabel("e (positional overlap)")
    ax.set_ylabel("m (semantic overlap)")
    ax.set_aspect("equal")
    ax.set_title(f"{result.get('spec', '')}: " + ", ".join(
        f"{k} = {float(v):.4g}" for k, v in result.get("parameters", {}).items()), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- escape statistics
def predict_escape(spec_or_path, params=None, eta=1.0, d=1000, paths=400, theta=0.5,
                   r_lin=0.05, seed=0, out_dir="generated", dt=None, max_steps=20000) -> dict:
    """Predicted fractions of semantic / positional escapes from m = e = 0 (square loss).

    Near the origin the overlaps follow the linear SDE dx = J x dt + sqrt(D) dB, J = -eta H -
    (eta^2 / 2) B(0) I (H the exact Hessian, B = E sum dl^2), D = eta^2 Cov(A)(0) / d
    (`attention.origin_noise`). For the unstable directions x_i(t) ~ xi_i exp(J_ii t) with
    xi_i ~ N(0, D_ii / (2 J_ii)) (stable ones: stationary N(0, D_ii / (2 |J_ii|))); each path
    starts from that random amplitude at the time where the spread reaches r_lin, then follows
    the deterministic drift of the module (both orders, RK4) until |m| or |e| reaches theta."""
    from .attention import origin_noise
    spec, mod = load(spec_or_path, out_dir)
    refuse_schedule(spec, "the escape-fraction prediction")
    require(mod, "drift", "the escape prediction")
    loss_dl_square = require(mod, "loss_dl_square", "the escape prediction")
    pv, _ = _param_arrays(spec, params or {})
    p1 = {k: float(v) for k, v in pv.items()}
    H = _hessians(mod, pv)[0]
    B0 = float(loss_dl_square(0.0, 0.0, **p1))
    J = -eta * H - 0.5 * eta ** 2 * B0 * np.eye(2)
    D = eta ** 2 * origin_noise(spec, p1, out_dir=out_dir) / d
    k = np.diag(J)
    rng = np.random.default_rng(seed)
    var = np.where(k > 0, np.diag(D) / (2 * np.abs(k)), np.diag(D) / (2 * np.abs(k) + 1e-300))
    xi = rng.normal(size=(paths, 2)) * np.sqrt(var)
    kmax = k.max()
    if kmax <= 0:
        return {"semantic": 0.0, "positional": 0.0, "none": 1.0, "eigen_rates": k.tolist()}
    t0 = math.log(r_lin / math.sqrt(var[k.argmax()])) / kmax
    x = xi * np.where(k > 0, np.exp(k * t0), 1.0)
    x = np.clip(x, -0.99 * theta, 0.99 * theta)
    dt = dt or 0.05 / kmax
    kind = np.array([None] * paths, dtype=object)
    tt = np.full(paths, np.nan)
    alive = np.ones(paths, dtype=bool)

    def f(y):
        return np.array(mod.drift(y[:, 0], y[:, 1], eta=eta, **p1)).T

    t = t0
    for _ in range(max_steps):
        idx = np.nonzero(alive)[0]
        if not len(idx):
            break
        y = x[idx]
        k1 = f(y)
        k2 = f(y + 0.5 * dt * k1)
        k3 = f(y + 0.5 * dt * k2)
        k4 = f(y + dt * k3)
        y = y + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        t += dt
        x[idx] = y
        sem, pos = np.abs(y[:, 0]) >= theta, np.abs(y[:, 1]) >= theta
        for j in np.nonzero(sem | pos)[0]:
            kind[idx[j]] = "semantic" if abs(y[j, 0]) >= abs(y[j, 1]) else "positional"
            tt[idx[j]] = t
            alive[idx[j]] = False
    n = paths
    return {"semantic": float(np.sum(kind == "semantic")) / n,
            "positional": float(np.sum(kind == "positional")) / n,
            "none": float(np.sum(alive)) / n,
            "median_escape_time": float(np.nanmedian(tt)) if np.isfinite(tt).any() else None,
            "eigen_rates": k.tolist(), "diffusion_origin": D.tolist(), "paths": paths}


def escape_fractions(spec_or_path, along: str, values, params=None, eta=1.0, d=1000, runs=32,
                     max_steps=None, theta=0.5, seed=0, out_dir="generated",
                     simulate=True) -> dict:
    """Fractions of positional / semantic escapes from (0, 0) as parameter `along` varies:
    the finite-d simulator (`attention.simulate_escape`, d, runs) next to the prediction of
    `predict_escape`. Loss: the spec's (the prediction needs the square loss)."""
    from .attention import simulate_escape
    spec, mod = load(spec_or_path, out_dir)
    rows = []
    for v in values:
        p = {**(params or {}), along: float(v)}
        row = {along: float(v), "prediction": predict_escape(spec, p, eta, d, theta=theta,
                                                             seed=seed, out_dir=out_dir)}
        if simulate:
            steps = max_steps or int(d * 4 * max(1.0, row["prediction"].get(
                "median_escape_time") or 50.0))
            pv = check_params(spec, p)
            kinds, times = simulate_escape(spec, pv, eta, d, runs, steps, theta, seed,
                                           out_dir=out_dir)
            done = sorted(t for t in times if t is not None)
            row["simulation"] = {"semantic": kinds.count("semantic") / runs,
                                 "positional": kinds.count("positional") / runs,
                                 "none": kinds.count(None) / runs,
                                 "median_escape_time": done[len(done) // 2] if done else None,
                                 "runs": runs, "max_steps": steps}
        rows.append(row)
    return {"spec": spec.name, "loss_kind": spec.loss, "eta": eta, "d": d, "theta": theta,
            "rows": rows}
