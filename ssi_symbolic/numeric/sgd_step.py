"""One online-SGD step of MATH.md section 4, one function per convention.

Every finite-d simulation of the package (``numeric.simulate.simulate`` for tied, untied and
attention specs, and ``analysis.attention.simulate_escape`` on top of it) takes its step from
here; nothing else writes the SGD increment.

Per step, with a fresh sample (tokens x_l = g_l / sqrt(d), g_l standard normal), teacher fields
z*_l = g_l . w* / sqrt(d) and student fields z_l:

    residual        r_k  = y_k - y_hat_k,  y_k = g*_k(z*) + sqrt(Delta) xi_k  (label noise)
    loss gradient   dl_l = dl/dz_l                                             (the loss)
        square  l = 1/2 ||y - y_hat||^2   dl_l = -sum_k r_k dg_k/dz_l
        norm    l = ||y - y_hat||          dl_l = -sum_k r_k dg_k/dz_l / ||r||   (0 where r = 0)
    update                                                         (tied or untied student)
        tied    w   <- w - eta sum_l dl_l (x_l + p_l / sqrt(d)),  p_l = sum_a C[l,a] u_a
        untied  w_l <- w_l - eta dl_l x_l
    mini-batch of b sequences i = 1..b (MATH.md 9): the gradient is averaged,
        tied    w   <- w - (eta / b) sum_i sum_l dl_il (x_il + p_l / sqrt(d))
        untied  w_l <- w_l - (eta / b) sum_i dl_il x_il
    normalisation                                                  (spherical or plain)
        spherical tied: |w|^2 = d;  untied: sum_l |w_l|^2 = L d;  plain: none

:func:`loss_gradient` and :func:`check_conventions` refuse, with one SpecError line naming the
spec key, any convention not implemented here, so a spec is never simulated under another
convention than the one it states.

Field layout of a mini-batch: the links are evaluated once per step on N = b S columns, column
i S + s being sequence i of seed s (b = 1: the column is the seed); -dl is then (N, L).
`set_eta` changes the learning rate of the next updates (a learning-rate schedule).
"""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np

from ..errors import SpecError, StateError

__all__ = ["LOSS_GRADIENTS", "square_loss_gradient", "norm_loss_gradient", "loss_gradient",
           "check_conventions", "residual", "TiedStudent", "UntiedStudent", "make_frame",
           "initial_weights", "spec_with_loss", "MultiStudent", "multi_start",
           "teacher_cholesky", "multi_min_d"]


# ----------------------------------------------------------------------------------------------
# the loss: -dl/dz_l from the residual and the link gradient
# ----------------------------------------------------------------------------------------------

def square_loss_gradient(res, dg):
    """-dl_l for l = 1/2 ||y - y_hat||^2: sum_k r_k dg_k/dz_l.

    res: (K, S) residuals r_k = y_k - y_hat_k; dg: (K, L, S) link gradient dg_k/dz_l (either
    may have a trailing axis of length 1 for a constant). Returns a new (S, L) array."""
    K, S = res.shape[0], max(res.shape[1], dg.shape[2])
    if res.shape[1] != S:
        res = np.broadcast_to(res, (K, S))
    if dg.shape[2] != S:
        dg = np.broadcast_to(dg, (K, dg.shape[1], S))
    return np.einsum("ks,kls->sl", res, dg)


def norm_loss_gradient(res, dg):
    """-dl_l for l = ||y - y_hat|| (Frobenius norm, not squared): sum_k r_k dg_k/dz_l / ||r||,
    with ||r|| = sqrt(sum_k r_k^2). Where r = 0 the norm is not differentiable and the
    subgradient 0 is used. Shapes as :func:`square_loss_gradient`; returns (S, L)."""
    out = square_loss_gradient(res, dg)
    norm = np.sqrt(np.einsum("ks,ks->s", res, res))
    if norm.shape[0] != out.shape[0]:
        norm = np.broadcast_to(norm, out.shape[:1])
    inv = np.divide(1.0, norm, out=np.zeros(out.shape[0]), where=norm > 0)
    out *= inv[:, None]
    return out


#: loss kind (spec.loss, MATH.md 3) -> function (res, dg) -> -dl, (S, L)
LOSS_GRADIENTS = {"square": square_loss_gradient, "norm": norm_loss_gradient}


def loss_gradient(spec):
    """The -dl/dz_l function of the spec's loss kind (LOSS_GRADIENTS); SpecError naming
    loss.kind for a loss the simulator does not implement."""
    try:
        return LOSS_GRADIENTS[spec.loss]
    except (KeyError, TypeError):
        raise SpecError(f"{spec.where('loss.kind')}: the simulator implements the losses "
                        f"{', '.join(LOSS_GRADIENTS)}, not {spec.loss!r}") from None


def check_conventions(spec):
    """SpecError (one line, naming the key) unless every convention the spec states is one the
    simulator implements: the loss kind, spherical or plain training (a bool), label noise
    (a finite variance >= 0) and, for an untied student, no positional encoding."""
    loss_gradient(spec)
    if not isinstance(spec.spherical, bool):
        raise SpecError(f"{spec.where('training.spherical')}: the simulator implements "
                        f"spherical (true) or plain (false) SGD, got {spec.spherical!r}")
    noise = float(spec.noise)
    if not (math.isfinite(noise) and noise >= 0):
        raise SpecError(f"{spec.where('loss.noise')}: expected a label-noise variance >= 0, "
                        f"got {spec.noise}")
    if spec.untied and spec.C:
        raise SpecError(f"{spec.where('student.positional')}: the simulator's untied student "
                        f"takes no positional encoding")


def residual(y, y_hat, K, noise_sd=0.0, xi=None):
    """r = y - y_hat (+ sqrt(Delta) xi: label noise on y), as a (K, S) array (or (K, 1) when
    both links are constant). y, y_hat: the K link entries (arrays); xi: (K, S) standard
    normals, used when noise_sd = sqrt(Delta) > 0."""
    res = y.reshape(K, -1) - y_hat.reshape(K, -1)
    if noise_sd > 0:
        res = res + noise_sd * xi
    return res


# ----------------------------------------------------------------------------------------------
# frame and initial weights
# ----------------------------------------------------------------------------------------------

def make_frame(rng, seeds, d, r):
    """Per seed a teacher w* (|w*|^2 = d) and r orthonormal u_a orthogonal to it.

    Returns (wstar, U) of shapes (seeds, d) and (seeds, r, d), float64: the QR factorisation of a
    Gaussian d x (1 + r) matrix, i.e. a uniformly random orthonormal frame."""
    Q, _ = np.linalg.qr(rng.standard_normal((seeds, d, 1 + r)))      # (S, d, 1 + r)
    Q = Q.transpose(0, 2, 1)
    return math.sqrt(d) * Q[:, 0], np.ascontiguousarray(Q[:, 1:])


def initial_weights(rng, wstar, U, m0, e0):
    """w = m0 w* + sqrt(d) sum_a e0_a u_a + s n with n random, orthogonal to w* and the u_a,
    |n|^2 = d and s = sqrt(1 - m0^2 - |e0|^2): overlaps exactly (m0, e0) and |w|^2 = d."""
    S, d = wstar.shape
    sqrtd = math.sqrt(d)
    e0 = np.asarray(e0, dtype=float).reshape(-1)
    Q = np.concatenate([wstar[:, None, :] / sqrtd, U], axis=1)       # orthonormal rows
    n = rng.standard_normal((S, d))
    for _ in range(2):                                                # twice: exact projection
        n -= np.einsum("skd,sk->sd", Q, np.einsum("skd,sd->sk", Q, n))
    n *= (sqrtd / np.linalg.norm(n, axis=1))[:, None]
    s0 = math.sqrt(max(0.0, 1.0 - m0 * m0 - float(e0 @ e0)))
    return m0 * wstar + sqrtd * np.einsum("a,sad->sd", e0, U) + s0 * n


# ----------------------------------------------------------------------------------------------
# the students: fields, update (with the positional encoding), normalisation, overlaps
# ----------------------------------------------------------------------------------------------

class TiedStudent:
    """One weight vector w per seed, shared by the tokens, with the positional encoding C
    (MATH.md 1, 2, 4), batched over S seeds.

    Start: a random frame (w*, u_a) and w with overlaps exactly (m0, e0), |w|^2 = d.
    G: the (L, S, d) buffer of the draws g_l (standard normal), filled in place by the caller.
    fields(): z*_l = g_l . w* / sqrt(d), z_l = g_l . w / sqrt(d) + sum_a C[l,a] e_a, as (L, S)
    arrays, from one batched matmul of the draw G with the rows (w*, w).
    update(mdl): mdl = -dl, (S, L); w <- w + (eta / sqrt(d)) (sum_l mdl_l g_l + sum_a (mdl C)_a
    u_a), i.e. w - eta sum_l dl_l (x_l + p_l / sqrt(d)), from one batched matmul of the
    coefficients with the rows (g_1..g_L, u_1..u_r); then w <- sqrt(d) w / |w| when spherical.
    state(): (m, e, q) = (w.w*/d, u_a.w/sqrt(d) as (S, r), |w|^2/d), recomputed from the stored w
    (no accumulated round-off); it also sets the positional means sum_a C[l,a] e_a of the next
    fields(). The overlaps used for every record and escape check are these.
    batch = b > 1 (MATH.md 9): G is (b L, S, d), row i L + l the token l of sequence i; the
    fields are (L, b S) (column i S + s), and update(mdl) takes mdl (b S, L) and applies
    w <- w + (eta / (b sqrt(d))) (sum_il mdl_il g_il + sum_a (sum_i mdl_i C)_a u_a)."""

    def __init__(self, spec, rng, seeds, d, m0, e0, eta, dtype, batch=1):
        L, r, S = spec.L, spec.r, seeds
        self.L, self.r, self.d, self.dtype = L, r, d, dtype
        self.b = b = int(batch)
        self.spherical = bool(spec.spherical)
        self.C = np.array([[float(c) for c in row] for row in spec.C],
                          dtype=float).reshape(L, r)
        sqrtd = math.sqrt(d)
        wstar, U = make_frame(rng, S, d, r)
        w0 = initial_weights(rng, wstar, U, m0, e0)
        # W rows: 0 = w*, 1 = w (the trained weights, a view), 2.. = u_a.
        self.W = W = np.empty((S, 2 + r, d), dtype=dtype)
        W[:, 0] = wstar
        W[:, 1] = w0
        W[:, 2:] = U
        self.w = W[:, 1]
        self.W_proj = W[:, :2].transpose(0, 2, 1)                    # (S, d, 2): w*, w
        # X rows 0..bL-1 = g_il (fresh N(0, 1) every step), rows bL.. = u_a (fixed)
        Xbuf = np.empty((b * L + r, S, d), dtype=dtype)
        Xbuf[b * L:] = W[:, 2:].transpose(1, 0, 2)
        self.G = Xbuf[:b * L]                                         # contiguous: filled in place
        self.Xs = Xbuf.transpose(1, 0, 2)                             # (S, bL + r, d) view
        self.Gs = self.Xs[:, :b * L]
        self.proj = np.empty((S, b * L, 2), dtype=dtype)
        self.coef = np.zeros((S, 1, b * L + r), dtype=dtype)
        self.direction = np.empty((S, 1, d), dtype=dtype)
        self.ov = np.empty((S, 2 + r, 1), dtype=dtype)
        self.sqrtd = sqrtd
        self.set_eta(eta)
        self.inv_sqrtd = 1.0 / sqrtd
        self.inv_d = 1.0 / d
        self.mu = None

    def set_eta(self, eta):
        """Use the learning rate eta from the next update on: the factor eta / (b sqrt(d))."""
        self.step_scale = eta / (self.b * self.sqrtd)

    def fields(self):
        """(z*, z): two (L, b S) arrays of the teacher and student fields of the current draw
        (column i S + s: sequence i of seed s)."""
        np.matmul(self.Gs, self.W_proj, out=self.proj)
        zz = self.proj.astype(float, copy=False) * self.inv_sqrtd    # (S, bL, 2)
        if self.b == 1:
            return zz[:, :, 0].T, zz[:, :, 1].T + self.mu
        S, b, L = zz.shape[0], self.b, self.L
        zz = zz.reshape(S, b, L, 2).transpose(3, 2, 1, 0).reshape(2, L, b * S)
        return zz[0], zz[1] + np.tile(self.mu, b)

    def update(self, mdl):
        """w <- w - (eta / b) sum_il dl_il (x_il + p_l / sqrt(d)) for mdl = -dl (b S, L),
        modified in place; then the spherical rescaling |w|^2 = d (spherical SGD)."""
        mdl *= self.step_scale
        L, coef = self.L, self.coef
        if self.b == 1:
            coef[:, 0, :L] = mdl
            if self.r:
                coef[:, 0, L:] = mdl @ self.C
        else:
            S, b = coef.shape[0], self.b
            mdl3 = mdl.reshape(b, S, L).transpose(1, 0, 2)                # (S, b, L)
            coef[:, 0, :b * L] = mdl3.reshape(S, b * L)
            if self.r:
                coef[:, 0, b * L:] = mdl3.sum(axis=1) @ self.C
        np.matmul(coef, self.Xs, out=self.direction)
        w = self.w
        w += self.direction[:, 0]
        if self.spherical:
            nrm2 = np.einsum("sd,sd->s", w, w)
            w *= np.sqrt(self.d / nrm2)[:, None]

    def state(self):
        """(m (S,), e (S, r), q (S,)) of the stored weights; sets the positional means."""
        np.matmul(self.W, self.w[:, :, None], out=self.ov)
        o = self.ov[:, :, 0].astype(float)
        m, e, q = o[:, 0] * self.inv_d, o[:, 2:] * self.inv_sqrtd, o[:, 1] * self.inv_d
        self.mu = self.C @ e.T                                        # (L, S): p_l . w / sqrt(d)
        return m, e, q


class UntiedStudent:
    """One weight vector w_l per token and seed (MATH.md 6), batched over S seeds.

    Start: w_l = m0 w* + sqrt(1 - m0^2) n_l with n_l random, orthogonal to w*, |n_l|^2 = d,
    independent across tokens (so m_l = m0 and q_l = 1 exactly).
    G: the (L, S, d) buffer of the draws g_l, filled in place by the caller.
    fields(): z*_l = g_l . w* / sqrt(d), z_l = g_l . w_l / sqrt(d), as (L, S) arrays.
    update(mdl): w_l <- w_l + (eta / sqrt(d)) mdl_l g_l (= w_l - eta dl_l x_l), then, when
    spherical, the rescaling of the flattened weights to sum_l |w_l|^2 = L d.
    state(): (m_l, q_l) = (w_l . w* / d, |w_l|^2 / d) as (L, S) arrays.
    batch = b > 1 (MATH.md 9): G is (L, b, S, d), the fields (L, b S) (column i S + s), and
    update(mdl), mdl (b S, L), applies w_l <- w_l + (eta / (b sqrt(d))) sum_i mdl_il g_il."""

    def __init__(self, spec, rng, seeds, d, m0, eta, dtype, batch=1):
        L, S = spec.L, seeds
        self.L, self.d, self.dtype = L, d, dtype
        self.b = b = int(batch)
        self.spherical = bool(spec.spherical)
        self.sqrtd = math.sqrt(d)
        self.eta = eta
        wstar, _ = make_frame(rng, S, d, 0)
        self.W = W = np.empty((S, L + 1, d), dtype=dtype)            # row 0 = w*, 1.. = w_l
        W[:, 0] = wstar
        for l in range(L):
            W[:, 1 + l] = initial_weights(rng, wstar, np.zeros((S, 0, d)), m0, ())
        self.Ws = W[:, 1:]
        # the draws g_l, (L, S, d); g_il as (L, b, S, d) for a mini-batch
        self.G = np.empty((L, S, d) if b == 1 else (L, b, S, d), dtype=dtype)

    def set_eta(self, eta):
        """Use the learning rate eta from the next update on."""
        self.eta = eta

    def fields(self):
        """(z*, z): two (L, b S) arrays (column i S + s: sequence i of seed s)."""
        G, W = self.G, self.W
        if self.b > 1:
            L, N = self.L, self.b * G.shape[2]
            zs = np.einsum("lbsd,sd->lbs", G, W[:, 0]).astype(float) / self.sqrtd
            zw = np.einsum("lbsd,sld->lbs", G, self.Ws).astype(float) / self.sqrtd
            return zs.reshape(L, N), zw.reshape(L, N)
        zs = np.einsum("lsd,sd->ls", G, W[:, 0]).astype(float) / self.sqrtd
        zw = np.einsum("lsd,sld->ls", G, self.Ws).astype(float) / self.sqrtd
        return zs, zw

    def update(self, mdl):
        """w_l <- w_l - (eta / b) sum_i dl_il x_il for mdl = -dl (b S, L); then the spherical
        rescaling of the flattened weights, sum_l |w_l|^2 = L d (spherical SGD)."""
        Ws, L, d = self.Ws, self.L, self.d
        if self.b > 1:
            S = Ws.shape[0]
            mdl3 = mdl.reshape(self.b, S, L).astype(self.dtype)
            Ws += (self.eta / (self.b * self.sqrtd)) * np.einsum("bsl,lbsd->sld", mdl3, self.G)
        else:
            Ws += (self.eta / self.sqrtd) * mdl[:, :, None].astype(self.dtype) \
                * self.G.transpose(1, 0, 2)
        if self.spherical:
            nrm2 = np.einsum("sld,sld->s", Ws, Ws)
            Ws *= np.sqrt(L * d / nrm2)[:, None, None]

    def state(self):
        """(m_l (L, S), q_l (L, S)) of the stored weights."""
        Ws, W, d = self.Ws, self.W, self.d
        ms = np.einsum("sld,sd->ls", Ws, W[:, 0]).astype(float) / d
        qs = np.einsum("sld,sld->ls", Ws, Ws).astype(float) / d
        return ms, qs


# ----------------------------------------------------------------------------------------------
# several teacher and student directions (MATH.md section 8)
# ----------------------------------------------------------------------------------------------

def teacher_cholesky(spec) -> np.ndarray:
    """The lower-triangular Cholesky factor L_P of the teacher overlaps P (K* x K*, float64):
    w*_j = sqrt(d) sum_i L_P[j,i] f_i with f_1..f_K* orthonormal has w*_j . w*_j' / d = P[j,j']."""
    P = np.array([[float(c) for c in row] for row in spec.teacher_overlaps], dtype=float)
    return np.linalg.cholesky(P)


def multi_min_d(spec) -> int:
    """The smallest dimension the simulators of a spec with several directions accept:
    K* + r + K + L (the frame, the K student directions outside it and, for the exact chain,
    a rest of dimension >= L for the Wishart matrix of the tokens; K* = K = 1 gives the
    single-direction minimum L + r + 2)."""
    return spec.teacher_directions + spec.r + spec.student_directions + spec.L


def _overlap_index(name):
    """'m2_1' -> ('m', 1, 0) (0-based), None for a name of another form."""
    if len(name) < 4 or name[0] not in "meq" or "_" not in name:
        return None
    a, _, b = name[1:].partition("_")
    if not (a.isdigit() and b.isdigit()):
        return None
    return name[0], int(a) - 1, int(b) - 1


def multi_start(spec, init):
    """The explicit start of a student with several directions, as the coordinates of the
    w_k / sqrt(d) in an orthonormal frame (f_1..f_K*, u_1..u_r, v_1..v_K): a (K, K* + r + K)
    array X = [A | E | R], or None for init None (the random start).

    init: {overlap name: value} over spec.overlap_names (missing names 0, Q[k,k] = 1; for
    spherical SGD a q{k}_{k} may be given only as 1). With P = L_P L_P^T the teacher overlaps:
    A = M L_P^-T (so A L_P^T = M), E as given and R any K x K factor of the Gram matrix of the
    parts outside the frame, S = Q - M P^-1 M^T - E E^T (here from its eigendecomposition).
    StateError (one line) for a name that is not an overlap of the spec, a value that is not a
    finite number, or a configuration that is not a Gram matrix (S not positive semidefinite)."""
    if init is None:
        return None
    if not isinstance(init, dict):
        raise StateError(f"init: expected a dict {{overlap name: value}}, got {init!r}")
    K, Ks, r = spec.student_directions, spec.teacher_directions, spec.r
    names = tuple(spec.overlap_names)
    M, E, Q = np.zeros((K, Ks)), np.zeros((K, r)), np.eye(K)
    for name, value in init.items():
        idx = _overlap_index(name) if isinstance(name, str) else None
        diagonal = (idx is not None and idx[0] == "q" and idx[1] == idx[2] and 0 <= idx[1] < K)
        if name not in names and not diagonal:
            raise StateError(f"init: '{name}' is not an overlap of spec '{spec.name}' "
                             f"(overlaps: {', '.join(names)})")
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating,
                                                              np.integer)) \
                or not math.isfinite(float(value)):
            raise StateError(f"init: {name} = {value!r} is not a finite number")
        value = float(value)
        kind, a, b = idx
        if diagonal and spec.spherical and value != 1.0:
            raise StateError(f"init: {name} = {value:g}, but spherical SGD keeps every "
                             f"|w_k|^2 / d = 1")
        if kind == "m":
            M[a, b] = value
        elif kind == "e":
            E[a, b] = value
        else:
            Q[a, b] = Q[b, a] = value
    Lp = teacher_cholesky(spec)
    A = np.linalg.solve(Lp, M.T).T                                    # M L_P^-T
    S = Q - A @ A.T - E @ E.T
    S = (S + S.T) / 2
    lam, V = np.linalg.eigh(S)
    tol = 1e-10 * max(1.0, float(np.abs(Q).max()))
    if lam[0] < -tol:
        raise StateError(f"init: the overlaps {dict((k, float(v)) for k, v in init.items())} "
                         f"are not those of vectors: Q - M P^-1 M^T - E E^T (the Gram matrix "
                         f"of the student parts outside the teacher and positional directions) "
                         f"has the eigenvalue {lam[0]:.4g} < 0")
    R = V * np.sqrt(np.clip(lam, 0.0, None))                          # R R^T = S
    return np.concatenate([A, E, R], axis=1)


def _orthonormal_rows(G):
    """The rows of G (S, p, d), p <= d, made orthonormal by Gram-Schmidt in the form of the
    Cholesky QR, applied twice (the second pass removes the round-off of the first): the
    Q factor with a positive-diagonal R, i.e. for Gaussian G a uniformly random orthonormal
    p-frame per seed (the same law as numpy's QR, at a fraction of its cost for many seeds)."""
    for _ in range(2):
        Lg = np.linalg.cholesky(G @ G.transpose(0, 2, 1))           # G G^T = Lg Lg^T
        G = _small_matmul(np.linalg.inv(Lg), G)                       # Lg^-1 G
    return G


def _small_matmul(A, X):
    """A @ X for a small A, (p, q) or (S, p, q), and X (S, q, d) with a large d: p q
    multiply-adds of (S, d) rows (numpy's batched matmul is several times slower for these
    shapes)."""
    A = np.asarray(A, dtype=float)
    S, q, d = X.shape
    p = A.shape[-2]
    A = np.broadcast_to(A, (S, p, q))
    out = np.empty((S, p, d))
    tmp = np.empty((S, d))
    for i in range(p):
        o = out[:, i]
        np.multiply(X[:, 0], A[:, i, 0, None], out=o)
        for j in range(1, q):
            np.multiply(X[:, j], A[:, i, j, None], out=tmp)
            o += tmp
    return out


class MultiStudent:
    """K student vectors w_1..w_K per seed, tied across the tokens, a teacher of K* directions
    with overlaps P and the positional encoding C (MATH.md 8), batched over S seeds.

    Frame, per seed: the QR factorisation of a Gaussian d x (K* + r + K) matrix gives
    orthonormal f_1..f_K*, u_1..u_r, v_1..v_K; w*_j = sqrt(d) sum_i L_P[j,i] f_i.
    Start: X0 = None (random): each w_k = sqrt(d) n_k / |n_k|, n_k ~ N(0, I_d) independent, i.e.
    uniform on its sphere |w_k|^2 = d; X0 a (K, K* + r + K) array [A | E | R] (`multi_start`):
    w_k = sqrt(d) (sum_i A[k,i] f_i + sum_a E[k,a] u_a + sum_i R[k,i] v_i).
    G: the (L, S, d) buffer of the draws g_l (standard normal), filled in place by the caller.
    fields(): z*_{j,l} = g_l . w*_j / sqrt(d) as (K* L, S) and z_{k,l} = g_l . w_k / sqrt(d) +
    sum_a C[l,a] E[k,a] as (K L, S), rows in the order of spec.variables (direction-major).
    update(mdl): mdl = -dl, (S, K L) in that order; w_k <- w_k + (eta / sqrt(d)) (sum_l
    mdl_{k,l} g_l + sum_a (sum_l mdl_{k,l} C[l,a]) u_a), then w_k <- sqrt(d) w_k / |w_k| for
    spherical SGD, every direction on its own sphere.
    state(): (M (S, K, K*), E (S, K, r), Q (S, K, K)) recomputed from the stored vectors:
    M[k,j] = w_k . w*_j / d, E[k,a] = u_a . w_k / sqrt(d), Q[k,h] = w_k . w_h / d; it also sets
    the positional means of the next fields()."""

    def __init__(self, spec, rng, seeds, d, X0, eta, dtype):
        L, r, S = spec.L, spec.r, seeds
        Ks, K = spec.teacher_directions, spec.student_directions
        self.L, self.r, self.d, self.Ks, self.K, self.dtype = L, r, d, Ks, K, dtype
        self.spherical = bool(spec.spherical)
        self.C = np.array([[float(c) for c in row] for row in spec.C],
                          dtype=float).reshape(L, r)
        sqrtd = math.sqrt(d)
        F = _orthonormal_rows(rng.standard_normal((S, Ks + r + K, d)))  # (S, Ks + r + K, d)
        wstar = sqrtd * _small_matmul(teacher_cholesky(spec), F[:, :Ks])
        if X0 is None:
            w0 = rng.standard_normal((S, K, d))
            w0 *= (sqrtd / np.linalg.norm(w0, axis=2))[:, :, None]
        else:
            w0 = sqrtd * _small_matmul(X0, F)
        # W rows: 0..K*-1 = w*_j, K*..K*+K-1 = w_k (the trained weights, a view), then u_a
        self.W = W = np.empty((S, Ks + K + r, d), dtype=dtype)
        W[:, :Ks] = wstar
        W[:, Ks:Ks + K] = w0
        W[:, Ks + K:] = F[:, Ks:Ks + r]
        self.w = W[:, Ks:Ks + K]
        self.W_proj = W[:, :Ks + K].transpose(0, 2, 1)                # (S, d, K* + K)
        # X rows 0..L-1 = g_l (fresh N(0, 1) every step), rows L.. = u_a (fixed)
        Xbuf = np.empty((L + r, S, d), dtype=dtype)
        Xbuf[L:] = W[:, Ks + K:].transpose(1, 0, 2)
        self.G = Xbuf[:L]
        self.Xs = Xbuf.transpose(1, 0, 2)                             # (S, L + r, d) view
        self.Gs = self.Xs[:, :L]
        self.proj = np.empty((S, L, Ks + K), dtype=dtype)
        self.coef = np.zeros((S, K, L + r), dtype=dtype)
        self.direction = np.empty((S, K, d), dtype=dtype)
        self.ov = np.empty((S, Ks + K + r, K), dtype=dtype)
        self.sqrtd, self.inv_sqrtd, self.inv_d = sqrtd, 1.0 / sqrtd, 1.0 / d
        self.set_eta(eta)
        self.mu = None

    def set_eta(self, eta):
        """Use the learning rate eta from the next update on: the factor eta / sqrt(d)."""
        self.step_scale = eta / self.sqrtd

    def fields(self):
        """(z*, z): (K* L, S) and (K L, S) arrays of the fields of the current draw."""
        np.matmul(self.Gs, self.W_proj, out=self.proj)
        zz = self.proj.astype(float, copy=False) * self.inv_sqrtd    # (S, L, K* + K)
        zz = zz.transpose(2, 1, 0)                                    # (K* + K, L, S)
        Ks, L, S = self.Ks, self.L, zz.shape[2]
        zs = zz[:Ks].reshape(Ks * L, S)
        zw = zz[Ks:] + self.mu                                        # (K, L, S)
        return zs, zw.reshape(self.K * L, S)

    def update(self, mdl):
        """w_k <- w_k - eta sum_l dl_{k,l} (x_l + p_l / sqrt(d)) for mdl = -dl (S, K L),
        modified in place; then every |w_k|^2 = d (spherical SGD)."""
        S, K, L = mdl.shape[0], self.K, self.L
        mdl3 = mdl.reshape(S, K, L) * self.step_scale
        coef = self.coef
        coef[:, :, :L] = mdl3
        if self.r:
            coef[:, :, L:] = mdl3 @ self.C
        np.matmul(coef, self.Xs, out=self.direction)
        w = self.w
        w += self.direction
        if self.spherical:
            nrm2 = np.einsum("skd,skd->sk", w, w)
            w *= np.sqrt(self.d / nrm2)[:, :, None]

    def state(self):
        """(M (S, K, K*), E (S, K, r), Q (S, K, K)) of the stored vectors; sets the positional
        means sum_a C[l,a] E[k,a] of the next fields()."""
        np.matmul(self.W, self.w.transpose(0, 2, 1), out=self.ov)
        o = self.ov.astype(float)                                     # (S, K* + K + r, K)
        Ks, K = self.Ks, self.K
        M = o[:, :Ks].transpose(0, 2, 1) * self.inv_d
        Q = o[:, Ks:Ks + K] * self.inv_d
        Q = (Q + Q.transpose(0, 2, 1)) / 2
        E = o[:, Ks + K:].transpose(0, 2, 1) * self.inv_sqrtd
        self.mu = np.einsum("la,ska->kls", self.C, E)                # (K, L, S)
        return M, E, Q


def spec_with_loss(spec, loss: str):
    """The spec with the loss kind `loss` ("square" or "norm", MATH.md 3): the spec itself when
    it already has it, else a copy named <name>_<loss> with that loss (its own generated module
    file and hash: ModelSpec.canonical holds the name and the loss). SpecError for an unknown
    loss kind."""
    from ..model.spec import LOSS_KINDS
    if loss == spec.loss:
        return spec
    if loss not in LOSS_KINDS:
        raise SpecError(f"loss: unknown loss {loss!r} (known: {', '.join(LOSS_KINDS)})")
    name = f"{spec.name}_{loss}"
    raw = None
    if spec.raw is not None:
        raw = json.loads(json.dumps(spec.raw))
        raw["name"] = name
        loss_t = raw.get("loss")
        raw["loss"] = {**(loss_t if isinstance(loss_t, dict) else {}), "kind": loss}
    return dataclasses.replace(spec, name=name, loss=loss, raw=raw)
