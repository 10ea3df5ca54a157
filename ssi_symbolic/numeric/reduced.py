"""The exact reduced simulator: the overlaps of online SGD as a low-dimensional Markov chain
(MATH.md section 10), sampled at a cost per step that does not depend on d.

It has the same law as the d-dimensional simulator of :mod:`ssi_symbolic.numeric.simulate`
(``method="full"``): it is not an approximation. It evaluates the same links of the generated
module, the same residual with label noise (:func:`sgd_step.residual`) and the same loss gradient
(:func:`sgd_step.loss_gradient`), and only replaces the d-dimensional vectors by the
coordinates that the law of the next step depends on. No array has a dimension d, so d = 10^6 or
10^9 costs what d = 100 costs per step (the number of steps d t still grows with d).
Several teacher and student directions (MATH.md 8): :class:`ReducedMulti` and
:func:`reduced_multi_loop` at the end of this module, with their derivation.

Derivation, tied student (MATH.md 1, 2, 4). Write the weights as

    w = m w* + sqrt(d) sum_a e_a u_a + sqrt(d) rho v,    rho^2 = q - m^2 - |e|^2 >= 0,

with v a unit vector orthogonal to w* / sqrt(d), u_1..u_r (any such v when rho = 0). A step draws
b L fresh tokens x_il = g_il / sqrt(d), g_il ~ N(0, I_d) (sequence i, token l). In the orthonormal
frame (w* / sqrt(d), u_1..u_r, v, rest) each g_il has the coordinates

    g*_il = g_il . w* / sqrt(d),  zeta_ila = g_il . u_a,  h_il = g_il . v,  and o_il (the rest),

all independent, standard normal, o_il uniform-isotropic in the (d - 2 - r)-dimensional rest.
The student field is z_il = (x_il + p_l / sqrt(d)) . w = m g*_il + sum_a e_a zeta_ila
+ rho h_il + sum_a C[l,a] e_a and the teacher's z*_il = g*_il, so -dl_il = mdl_il, a function of
(g*, zeta, h), the label noise and the state only: it is independent of the o_il. The update
w' = w + (eta / (b sqrt(d))) (sum_il mdl_il g_il + sum_a (sum_il mdl_il C[l,a]) u_a) has, with
c = eta / (b d), the coordinates

    m'     = w'. w* / d      = m   + c sum_il mdl_il g*_il
    e_a'   = u_a . w' / sqrt(d) = e_a + c sum_il mdl_il (zeta_ila + C[l,a])
    rho' v' = (rho + c sum_il mdl_il h_il) v + c sum_il mdl_il o_il.

Given mdl, sum_il mdl_il o_il is an isotropic Gaussian vector of the rest with covariance
|mdl|^2 I_(d - 2 - r), so |sum_il mdl_il o_il|^2 = |mdl|^2 chi^2_(d - 2 - r) with the chi-square
independent of everything else (the Wishart form of MATH.md 10 for a given dl), and

    rho'^2 = (rho + c sum_il mdl_il h_il)^2 + c^2 |mdl|^2 chi^2_(d - 2 - r),

with |mdl|^2 = sum_il mdl_il^2.

Spherical SGD (w <- sqrt(d) w / |w|, as TiedStudent.update) divides m', e', rho' by
sqrt(q') = sqrt(m'^2 + |e'|^2 + rho'^2); plain SGD keeps them and q = m^2 + |e|^2 + rho^2. The new
direction v' lies in span(v, rest) and is orthogonal to w*, u_a; the next step's tokens are fresh
and isotropic, so the law of its coordinates in the frame (w*, u, v', rest') is again the one
above: the conditional law of (m', e', rho') given all the d-dimensional vectors depends on
(m, e, rho) only, which makes (m, e, rho) a Markov chain with exactly this kernel.

Derivation, untied student (MATH.md 6; no positional encoding). Token l has its own weights
w_l = m_l w* + sqrt(d) rho_l v_l, v_l a unit vector orthogonal to w* (the v_l of different tokens
need not be orthogonal to each other). Token l of sequence i has g_il, and its field is
z_il = g_il . w_l / sqrt(d) = m_l g*_il + rho_l h_il with g*_il = g_il . w* / sqrt(d),
h_il = g_il . v_l and the rest o_il orthogonal to w*, v_l ((d - 2)-dimensional). Since the g_il
are independent across i and l, so are all these coordinates, even though the v_l overlap: each
projection is taken of a different vector g_il. The update w_l' = w_l + (eta / (b sqrt(d)))
sum_i mdl_il g_il moves w_l inside span(w*, v_l, o_1l..o_bl) only, so per token

    m_l'     = m_l + c sum_i mdl_il g*_il
    rho_l'^2 = (rho_l + c sum_i mdl_il h_il)^2 + c^2 (sum_i mdl_il^2) chi^2_(d - 2),  one per token,

the L chi-squares independent (built from the disjoint o_il). The tokens interact only through
mdl (the link couples the fields) and the spherical constraint sum_l |w_l|^2 = L d
(UntiedStudent.update), which multiplies every m_l', rho_l' by
sqrt(L / sum_l (m_l'^2 + rho_l'^2)); the cross products w_l . w_k never enter, so the chain is
(m_l, rho_l)_l with q_l = m_l^2 + rho_l^2.

Mini-batches (MATH.md 9) are the b L tokens above with c = eta / (b d). A learning-rate schedule
makes eta the rate eta f(t) of the step (see simulate.simulate). Matrix-valued links (softmax
attention) and the norm loss enter only through mdl, evaluated by the shared functions.

Sampling. The state is X = (m, rho, e_1..e_r) of shape (2 + r, S) (tied) or (m_l; rho_l) of shape
(2, L, S) (untied), float64; S seeds are a batch axis, the last axis of every array, and there is
no Python loop over seeds or tokens. The links are evaluated on N = b S columns, column i S + s
being sequence i of seed s (as in the full simulator). The draws come in chunks of steps from
three generators ``Generator(SFC64(s))`` seeded by ``SeedSequence(seed).spawn(3)``: per step the
normals D of shape (2 + r, L, b, S) (tied: g*, h, zeta_1..zeta_r) or (2, L, b, S) (untied: g*, h),
the chi-squares, (S,) (tied) or (L, S) (untied), and, when Delta > 0, the label noise (K, b S).
Each generator is read in step order, so a trajectory does not depend on the chunk size, on
``steps``, ``record_every``, ``stop_when_escaped`` or ``progress``. The teacher link depends on
the draws only (z* = g*), so it is evaluated once per chunk, and the tied chain stores
zeta_ila + C[l,a] in place of zeta_ila (what both z and e' use); per step the work is the
student link and its gradient, the residual, the loss gradient and about 15 NumPy calls.

Measured cost (CPU time, NumPy 2.4, a 2-core machine shared with other jobs): a fixed ~0.1 ms
per step (the Python and NumPy call overhead; the generated student link and its gradient take
~0.04 ms of it) plus ~85 ns per seed for he2_L1 (~130 ns for L = 2), mostly the random numbers
(2 + r normals per token and one chi-square, which costs ~2.5 normals, per seed and step). With
1000 seeds that is ~0.16 microseconds per seed and step, about 1000 times less than the full
simulator at d = 10^4. A run to escape costs (largest escape time) x d steps: for 1000 seeds of
he2_L1 at d = 10^5 about 10^7 steps. See bench/bench_reduced.py and bench/README.md.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import SpecError
from .sgd_step import loss_gradient, residual, teacher_cholesky

__all__ = ["ReducedTied", "ReducedUntied", "tied_step", "untied_step", "reduced_loop",
           "reduced_chain", "chunk_steps", "ReducedMulti", "reduced_multi_loop", "bartlett"]

#: target number of float64 normals drawn at once (a chunk of steps holds about this many)
CHUNK_NORMALS = 2 ** 16
#: most steps in one chunk
CHUNK_MAX = 512


def chunk_steps(per_step: int) -> int:
    """Steps per chunk of draws: about CHUNK_NORMALS numbers, between 1 and CHUNK_MAX."""
    return int(min(CHUNK_MAX, max(1, CHUNK_NORMALS // max(1, per_step))))


def _add_rest(rho, mc, sqrt_chi):
    """rho <- sqrt(rho^2 + (mc sqrt_chi)^2) in place: the part of the update outside the frame,
    |c mdl|^2 chi^2, added to the squared residual norm (mc = c sqrt(B), B = |mdl|^2; mc is
    overwritten)."""
    mc *= sqrt_chi
    mc *= mc
    rho *= rho
    rho += mc
    np.sqrt(rho, out=rho)


def tied_step(X, D, mdl, sqrt_chi, c, spherical):
    """One step of the tied chain (module docstring), in place on X.

    X: (k, S) state, k = 2 + r, rows (m, rho, e_1..e_r). D: (k, L b, S) draws of the step, rows
    (g*_il, h_il, zeta_il1 + C[l,1], .., zeta_ilr + C[l,r]), column l b + i of sequence i.
    mdl = -dl: (L b, S) in that order. sqrt_chi: (S,) sqrt(chi), chi ~ chi^2_(d - 2 - r).
    c = eta / (b d) (a number or (S,)). With A_k = sum_il mdl_il D_k,il and B = sum_il mdl_il^2:

        m' = m + c A_0,   e_a' = e_a + c A_(2+a) = e_a + c sum_il mdl_il (zeta_ila + C[l,a]),
        rho' = sqrt((rho + c A_1)^2 + c^2 chi B),

    then, for spherical SGD, (m', rho', e') / sqrt(m'^2 + rho'^2 + |e'|^2)."""
    if mdl.shape[0] == 1:                                  # one token, no batch: B = mdl^2
        mc = mdl[0] * c
        X += D[:, 0] * mc
    else:
        X += (D * mdl).sum(axis=1) * c
        mc = np.sqrt((mdl * mdl).sum(axis=0)) * c
    _add_rest(X[1], mc, sqrt_chi)
    if spherical:
        X /= np.sqrt((X * X).sum(axis=0))
    return X


def untied_step(X, D, mdl, sqrt_chi, c, spherical):
    """One step of the untied chain (module docstring), in place on X.

    X: (2, L, S) state (m_l; rho_l). D: (2, L, b, S) draws (g*_il; h_il). mdl = -dl:
    (L, b, S). sqrt_chi: (L, S) sqrt(chi_l), chi_l ~ chi^2_(d - 2), one per token.
    c = eta / (b d) (a number or (S,)). With A_l = sum_i mdl_il (g*_il, h_il) and
    B_l = sum_i mdl_il^2:

        m_l' = m_l + c A_m,l,   rho_l' = sqrt((rho_l + c A_h,l)^2 + c^2 chi_l B_l),

    then, for spherical SGD, every m_l', rho_l' times sqrt(L / sum_l (m_l'^2 + rho_l'^2))."""
    if mdl.shape[1] == 1:                                  # no batch: B_l = mdl_l^2
        mc = mdl[:, 0] * c
        X += D[:, :, 0] * mc
    else:
        X += (D * mdl).sum(axis=2) * c
        mc = np.sqrt((mdl * mdl).sum(axis=1)) * c
    _add_rest(X[1], mc, sqrt_chi)
    if spherical:
        X *= np.sqrt(X.shape[1] / (X * X).sum(axis=(0, 1)))
    return X


class ReducedTied:
    """The tied chain: state X = (m, rho, e_1..e_r), (2 + r, S).

    Start: (m0, sqrt(1 - m0^2 - |e0|^2), e0), i.e. q0 = 1, as the full simulator's initial weights.
    prepare(Dc): adds C[l,a] to the zeta rows of a chunk of draws (n, 2 + r, L, b, S).
    fields(D) -> z (L, b S): z_il = m g*_il + rho h_il + sum_a e_a (zeta_ila + C[l,a]).
    update(mdl (b S, L), D, sqrt_chi, c): tied_step.
    state() -> (m (S,), e (S, r), q (S,)), q = m^2 + |e|^2 + rho^2 (the full simulator's
    |w|^2 / d), for the tied _Book of the simulator."""

    def __init__(self, spec, seeds, d, m0, e0, batch):
        self.L, self.r, self.S, self.b = spec.L, spec.r, seeds, batch
        self.spherical = bool(spec.spherical)
        self.C = np.array([[float(c) for c in row] for row in spec.C],
                          dtype=float).reshape(self.L, self.r)
        e0 = np.asarray(e0, dtype=float).reshape(-1)
        rho0 = math.sqrt(max(0.0, 1.0 - m0 * m0 - float(e0 @ e0)))
        self.X = np.empty((2 + self.r, seeds))
        self.X[0], self.X[1], self.X[2:] = m0, rho0, e0[:, None]
        self.normals_shape = (2 + self.r, self.L, batch, seeds)
        self.chi_shape = (seeds,)
        self.df = d - 2 - self.r

    def prepare(self, Dc):
        if self.r:
            Dc[:, 2:] += self.C.T[None, :, :, None, None]

    def fields(self, D):
        X = self.X
        return (X[:, None, None, :] * D).sum(axis=0).reshape(self.L, -1)

    def update(self, mdl, D, sqrt_chi, c):
        k, L, b, S = D.shape
        # mdl (b S, L) -> (L b, S) rows l b + i; D (k, L, b, S) -> (k, L b, S)
        tied_step(self.X, D.reshape(k, L * b, S), mdl.T.reshape(L * b, S), sqrt_chi, c,
                  self.spherical)

    def state(self):
        X = self.X
        return X[0], X[2:].T, (X * X).sum(axis=0)


class ReducedUntied:
    """The untied chain: state X = (m_l; rho_l), (2, L, S).

    Start: m_l = m0, rho_l = sqrt(1 - m0^2) (q_l = 1), as the full simulator's untied student.
    fields(D) -> z (L, b S): z_il = m_l g*_il + rho_l h_il.
    update(mdl (b S, L), D, sqrt_chi, c): untied_step.
    state() -> (m_l (L, S), q_l (L, S)), q_l = m_l^2 + rho_l^2, for the untied _Book."""

    def __init__(self, spec, seeds, d, m0, batch):
        self.L, self.S, self.b = spec.L, seeds, batch
        self.spherical = bool(spec.spherical)
        self.X = np.empty((2, self.L, seeds))
        self.X[0], self.X[1] = m0, math.sqrt(max(0.0, 1.0 - m0 * m0))
        self.normals_shape = (2, self.L, batch, seeds)
        self.chi_shape = (self.L, seeds)
        self.df = d - 2

    def prepare(self, Dc):
        pass

    def fields(self, D):
        X = self.X
        return (X[:, :, None, :] * D).sum(axis=0).reshape(self.L, -1)

    def update(self, mdl, D, sqrt_chi, c):
        _, L, b, S = D.shape
        untied_step(self.X, D, mdl.T.reshape(L, b, S), sqrt_chi, c, self.spherical)

    def state(self):
        X = self.X
        return X[0], X[0] * X[0] + X[1] * X[1]


def reduced_chain(spec, seeds, d, m0, e0, batch):
    """The chain of a spec: ReducedTied or ReducedUntied. SpecError (one line) for a student
    the chain does not implement: one student direction per token (tied, with or without
    positional encoding, or untied) is what MATH.md 10 reduces here."""
    L, r = spec.L, spec.r
    if spec.untied:
        expected = tuple(f"m{l + 1}" for l in range(L)) + tuple(f"q{l + 1}" for l in range(L))
    else:
        expected = ("m",) + (("e",) if r == 1 else tuple(f"e{a + 1}" for a in range(r))) \
            + (() if spec.spherical else ("q",))
    if tuple(spec.overlap_names) != expected:
        raise SpecError(f"{spec.where('student')}: the reduced simulator implements students "
                        f"with one direction (overlaps {', '.join(expected)}), not the overlaps "
                        f"{', '.join(spec.overlap_names)}; use method='full'")
    if spec.untied:
        return ReducedUntied(spec, seeds, d, m0, batch)
    return ReducedTied(spec, seeds, d, m0, e0, batch)


def reduced_loop(spec, mod, pvals, chain, seed, book, steps, seeds, batch, eta, d, etas):
    """Run the chain for steps 1..steps, booking each one (the reduced twin of
    simulate._sgd_loop; module docstring).

    Per step: the draws of the step from the current chunk, the student fields
    (chain.fields), the student link and its gradient, the residual with label noise
    (sgd_step.residual; the teacher link is evaluated per chunk on the draws g*), -dl of the
    spec's loss kind (sgd_step.loss_gradient) and the chain's update with c = eta_k / (b d);
    then its overlaps. etas: None (constant eta) or a function (k0, n) -> the rates eta_k of
    steps k0..k0+n-1."""
    L = spec.L
    N = seeds * batch
    noise_sd = math.sqrt(float(spec.noise))
    dl_of = loss_gradient(spec)
    teacher, link, gradient = mod.teacher_link, mod.student_link, mod.student_link_gradient
    asarray = np.asarray
    ss = np.random.SeedSequence(seed)
    g_norm, g_chi, g_noise = (np.random.Generator(np.random.SFC64(s)) for s in ss.spawn(3))
    n_shape, c_shape, df = chain.normals_shape, chain.chi_shape, chain.df
    chunk = chunk_steps(int(np.prod(n_shape)))
    book.start(*chain.state())
    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            k = 0
            while k < steps:
                n = min(chunk, steps - k)
                Dc = g_norm.standard_normal((n,) + n_shape)
                chis = g_chi.chisquare(df, (n,) + c_shape)
                # the teacher fields z*_il = g*_il of the whole chunk: y = g*(z*) once per chunk
                ys = asarray(teacher(*(Dc[:, 0, l].reshape(n * N) for l in range(L)),
                                     **pvals), dtype=float)
                K = ys.shape[0]
                if ys.size == K:                                      # a constant teacher
                    Y, ys = None, ys.reshape(K, 1)
                else:
                    Y = np.ascontiguousarray(ys.reshape(K, n, N).transpose(1, 0, 2))
                xis = g_noise.standard_normal((n, K, N)) if noise_sd > 0 else None
                chain.prepare(Dc)
                # c_k = eta_k / (b d) per step of the chunk, and sqrt(chi)
                cs = np.full(n, eta / (batch * d)) if etas is None \
                    else etas(k + 1, n) / (batch * d)
                np.sqrt(chis, out=chis)
                for j in range(n):
                    k += 1
                    D = Dc[j]
                    zw = chain.fields(D)
                    y_hat = asarray(link(*zw, **pvals), dtype=float)
                    res = residual(ys if Y is None else Y[j], y_hat, K, noise_sd,
                                   None if xis is None else xis[j])
                    dg = asarray(gradient(*zw, **pvals), dtype=float).reshape(K, L, -1)
                    chain.update(dl_of(res, dg), D, chis[j], cs[j])
                    if book.step(k, *chain.state()):
                        return
    finally:
        book.close()


# ----------------------------------------------------------------------------------------------
# several teacher and student directions (MATH.md 8 and the last paragraph of 10)
# ----------------------------------------------------------------------------------------------
#
# Derivation. Per seed take the orthonormal frame f_1..f_K* of the teacher span
# (w*_j = sqrt(d) sum_i L_P[j,i] f_i, L_P the Cholesky factor of P), u_1..u_r, and an orthonormal
# basis v_1..v_K of a K-dimensional space holding the student parts outside span(f, u) (padded
# arbitrarily when those parts span less). The students are w_k = sqrt(d) X[k,:] . (f, u, v):
# X = [A | E | R], (K, K* + r + K), with M = A L_P^T, E the positional overlaps and
# Q = X X^T. A step draws L tokens g_l ~ N(0, I_d); their coordinates g*_{i,l} = g_l . f_i,
# zeta_{a,l} = g_l . u_a, h_{i,l} = g_l . v_i are independent standard normals and the rest
# o_l (in the (d - K* - r - K)-dimensional complement) is independent of them. The fields are
# z*_{j,l} = sum_i L_P[j,i] g*_{i,l} and z_{k,l} = X[k,:] . D_l with D_l = (g*_{.,l},
# zeta_{.,l} + C[l,.], h_{.,l}), so -dl = mdl is a function of D, the label noise and X. With
# c = eta / d the update w_k += (eta / sqrt(d)) (sum_l mdl_{k,l} g_l + sum_a (mdl C)_{k,a} u_a)
# gives
#
#     X[k,:] += c sum_l mdl_{k,l} D_l          (the A, E and R blocks)
#     outside part of w_k / sqrt(d) += c sum_l mdl_{k,l} o_l,
#
# and the o_l enter only through their Gram matrix W = (o_l . o_l')_{ll'} ~ Wishart_L(n, I),
# n = d - K* - r - K, independent of everything else. Writing W = T T^T (Bartlett: T lower
# triangular, T_ll^2 ~ chi^2(n - l + 1), T_ll' ~ N(0, 1) below the diagonal), the outside
# parts have in an orthonormal basis of span(v, rest) the coordinates [R + c mdl H^T, c mdl T]
# (K x (K + L)); their Gram matrix is all the law of the next step depends on, so R is
# replaced by the K x K factor R' of [R, c mdl T] [R, c mdl T]^T from a QR factorisation (a
# rotation to a new basis v' that depends on the past only). Spherical SGD divides every row
# X[k,:] by its norm sqrt(Q[k,k]). The next tokens are fresh and isotropic, so (M, E, Q) is a
# Markov chain with exactly this kernel; the per-step cost is O(L (K* + r + K) K + L^2 K) per
# seed, whatever d.
#
# Random start (the full simulator's w_k = sqrt(d) n_k / |n_k|, n_k ~ N(0, I_d)): the frame
# coordinates of the n_k are K (K* + r) standard normals and the Gram matrix of their outside
# parts is Wishart_K(d - K* - r, I), factor T0 by Bartlett; X0 = [coordinates | T0] with every
# row divided by its norm.
#
# Random numbers: five generators Generator(SFC64(s)) from SeedSequence(seed).spawn(5): the
# normals D of every step, (n, K* + r + K, L, S) per chunk of n steps; the chi-squares of the
# Bartlett factor of W (L per step and seed); its L (L - 1) / 2 normals below the diagonal; the
# label noise (K_out, S); and the random start. Each is read in step order, so a trajectory
# does not depend on the chunk size, `steps`, `record_every`, `stop_when_escaped` or
# `progress`.

def bartlett(rng, size, p, df, rng_normal=None):
    """Lower-triangular T of shape size + (p, p) with T T^T ~ Wishart_p(df, I) (Bartlett):
    T[i,i] = sqrt(chi^2(df - i)) (0-based i), T[i,j] ~ N(0, 1) for i > j. Needs df >= p.
    The chi-squares come from rng, then the normals below the diagonal from rng_normal
    (default rng)."""
    size = tuple(size)
    chi = rng.chisquare(df - np.arange(p, dtype=float), size + (p,))
    low = np.tril_indices(p, -1)
    off = (rng if rng_normal is None else rng_normal).standard_normal(size + (len(low[0]),))
    T = np.zeros(size + (p, p))
    idx = np.arange(p)
    T[..., idx, idx] = np.sqrt(chi)
    T[..., low[0], low[1]] = off
    return T


class ReducedMulti:
    """The chain of a student with several directions: state X = [A | E | R], (S, K, K* + r + K)
    (derivation above), float64.

    Start: X0 (K, K* + r + K) from sgd_step.multi_start (the same for every seed) or None: the
    exact law of the full simulator's random start. fields(D) -> z (K L, S) for the draws
    D (K* + r + K, L, S) of a step (zeta rows with + C[l,a], see prepare); update(mdl (S, K L),
    D, T (S, L, L), c); state() -> (M (S, K, K*), E (S, K, r), Q (S, K, K))."""

    def __init__(self, spec, seeds, d, X0, seed):
        self.L, self.r, self.S = spec.L, spec.r, seeds
        self.Ks, self.K = Ks, K = spec.teacher_directions, spec.student_directions
        self.spherical = bool(spec.spherical)
        self.C = np.array([[float(c) for c in row] for row in spec.C],
                          dtype=float).reshape(self.L, self.r)
        self.Lp = teacher_cholesky(spec)
        self.nc = nc = Ks + self.r + K
        self.df = d - nc                                              # the rest of the tokens
        self.rngs = [np.random.Generator(np.random.SFC64(s))
                     for s in np.random.SeedSequence(seed).spawn(5)]
        if X0 is None:
            g = self.rngs[4]
            frame = g.standard_normal((seeds, K, Ks + self.r))
            T0 = bartlett(g, (seeds,), K, d - Ks - self.r)
            X = np.concatenate([frame, T0], axis=2)
            X /= np.sqrt((X * X).sum(axis=2))[:, :, None]
        else:
            X = np.broadcast_to(np.asarray(X0, dtype=float), (seeds, K, nc)).copy()
        self.X = X
        self.normals_shape = (nc, self.L, seeds)

    def prepare(self, Dc):
        """Add C[l,a] to the zeta rows of a chunk of draws (n, K* + r + K, L, S)."""
        if self.r:
            Dc[:, self.Ks:self.Ks + self.r] += self.C.T[None, :, :, None]

    def teacher_fields(self, Dc):
        """z*_{j,l} = sum_i L_P[j,i] g*_{i,l} of a chunk: (n, K*, L, S)."""
        return np.einsum("ji,nils->njls", self.Lp, Dc[:, :self.Ks])

    def fields(self, D):
        return np.einsum("skc,cls->kls", self.X, D).reshape(self.K * self.L, -1)

    def update(self, mdl, D, T, c):
        """X += c mdl D, the outside block R replaced by the factor of
        [R, c mdl T] [R, c mdl T]^T, then the spherical normalisation of every row."""
        X, K, L = self.X, self.K, self.L
        mdl3 = mdl.reshape(-1, K, L)                                  # (S, K, L)
        X += c * np.einsum("skl,cls->skc", mdl3, D)
        o = self.nc - K
        Z = np.concatenate([X[:, :, o:], c * (mdl3 @ T)], axis=2)    # (S, K, K + L)
        R = np.linalg.qr(Z.transpose(0, 2, 1), mode="r")              # Z Z^T = R^T R
        X[:, :, o:] = R.transpose(0, 2, 1)
        if self.spherical:
            X /= np.sqrt((X * X).sum(axis=2))[:, :, None]

    def state(self):
        X, Ks, r = self.X, self.Ks, self.r
        M = np.einsum("ski,ji->skj", X[:, :, :Ks], self.Lp)
        return M, X[:, :, Ks:Ks + r], X @ X.transpose(0, 2, 1)


def reduced_multi_loop(spec, mod, pvals, chain, seed, book, steps, seeds, eta, d, etas):
    """Run the chain of a student with several directions for steps 1..steps, booking each one
    (the reduced twin of simulate._sgd_loop for sgd_step.MultiStudent): per step the draws D
    of the chunk, the student fields, link and gradient (K L entries per output entry), the
    residual with label noise, -dl of the spec's loss kind and chain.update with c = eta_k / d
    and the Bartlett factor of the step's Wishart matrix. The teacher link is evaluated once
    per chunk. etas: None or (k0, n) -> the rates of steps k0..k0+n-1."""
    L, Ks = spec.L, chain.Ks
    KL = chain.K * L
    noise_sd = math.sqrt(float(spec.noise))
    dl_of = loss_gradient(spec)
    teacher, link, gradient = mod.teacher_link, mod.student_link, mod.student_link_gradient
    asarray = np.asarray
    g_norm, g_chi, g_off, g_noise = chain.rngs[:4]
    n_shape = chain.normals_shape
    chunk = chunk_steps(int(np.prod(n_shape)))
    book.start(*chain.state())
    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            k = 0
            while k < steps:
                n = min(chunk, steps - k)
                Dc = g_norm.standard_normal((n,) + n_shape)
                Ts = bartlett(g_chi, (n, seeds), L, chain.df, g_off)
                Zs = chain.teacher_fields(Dc)                         # (n, K*, L, S)
                ys = asarray(teacher(*(Zs[:, j, l].reshape(n * seeds) for j in range(Ks)
                                       for l in range(L)), **pvals), dtype=float)
                K = ys.shape[0]
                if ys.size == K:                                      # a constant teacher
                    Y, ys = None, ys.reshape(K, 1)
                else:
                    Y = np.ascontiguousarray(ys.reshape(K, n, seeds).transpose(1, 0, 2))
                xis = g_noise.standard_normal((n, K, seeds)) if noise_sd > 0 else None
                chain.prepare(Dc)
                cs = np.full(n, eta / d) if etas is None else etas(k + 1, n) / d
                for j in range(n):
                    k += 1
                    D = Dc[j]
                    zw = chain.fields(D)
                    y_hat = asarray(link(*zw, **pvals), dtype=float)
                    res = residual(ys if Y is None else Y[j], y_hat, K, noise_sd,
                                   None if xis is None else xis[j])
                    dg = asarray(gradient(*zw, **pvals), dtype=float).reshape(K, KL, -1)
                    chain.update(dl_of(res, dg), D, Ts[j], cs[j])
                    if book.step(k, *chain.state()):
                        return
    finally:
        book.close()
