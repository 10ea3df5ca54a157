"""Exchangeable directions of a multi-index model (MATH.md section 8): orbits of the products
of base statistics and of the Cov(G) entries under permutations of the directions.

Let sigma permute the student directions and tau the teacher directions, with the student link
invariant under sigma, the teacher link under tau and the teacher overlaps P under tau
(P[tau i, tau j] = P[i, j]). Writing T z for the fields with z_k -> z_{sigma k} and
z*_j -> z*_{tau j}, the per-sample loss is invariant, so dl_k(T z) = dl_{sigma k}(z), and the base
statistics are permuted among themselves: A_M[k, j](T z) = A_M[sigma k, tau j](z),
A_E[k, a] -> A_E[sigma k, a], A_Q[k, h] -> A_Q[sigma k, sigma h], B[k, h] -> B[sigma k, sigma h].
T z has the token Gaussian law with the renamed overlaps M'[k, j] = M[sigma k, tau j],
Q'[k, h] = Q[sigma k, sigma h], E'[k, a] = E[sigma k, a] (the teacher fields have mean zero and
P is invariant), hence

    E[base_{pi a} base_{pi b}](overlaps) = E[base_a base_b](renamed overlaps):

one expectation per orbit of pairs, the others by renaming the generators of its ring element
(likewise Cov(G_i, G_j) for the permuted overlaps i, j). For K = K* = 4 the 666 products of
base statistics fall into 35 orbits and the 351 Cov(G) entries into 15.
"""
from __future__ import annotations

from itertools import permutations

import sympy as sp

from ..model.spec import ModelSpec, link_entries
from .gaussian import TokenGaussian, permutation_generators


def _symmetric_link(spec: ModelSpec, role: str, K: int) -> bool:
    """Whether the role's link is invariant under every permutation of its K directions (the
    direction index of every z{k}_{l} permuted, all tokens at once), checked on the
    transposition and the cycle, which generate the symmetric group."""
    if K < 2:
        return False
    L = spec.L
    zs = spec.variables(role)   # z{k}_{l}: index k L + l
    link = spec.teacher if role == "teacher" else spec.student
    for gen in permutation_generators(list(range(K))):
        sub = {zs[k * L + l]: zs[gen.get(k, k) * L + l] for k in range(K) for l in range(L)}
        for entry in link_entries(link):
            entry = sp.sympify(entry)
            if sp.expand(entry.xreplace(sub) - entry) != 0:
                return False
    return True


def _invariant_overlaps(P, K: int) -> bool:
    """P[g i][g j] = P[i][j] for the generators of the permutations of K teacher directions."""
    return all(sp.simplify(P[g.get(i, i)][g.get(j, j)] - P[i][j]) == 0
               for g in permutation_generators(list(range(K)))
               for i in range(K) for j in range(K))


class DirectionPermutations:
    """The group of direction permutations (sigma, tau) that leave a tied multi-index spec's
    links and teacher overlaps invariant, acting on the base statistics, the state and the
    ring elements of the exact engine `ex`. `trivial` when the group has one element."""

    def __init__(self, spec: ModelSpec, gauss: TokenGaussian, ex, state):
        Kd, Ks, r = spec.student_directions, spec.teacher_directions, spec.r
        P, M, E, Q = gauss.overlap_matrices()
        ident_s, ident_t = tuple(range(Kd)), tuple(range(Ks))
        sigmas = (list(permutations(range(Kd))) if _symmetric_link(spec, "student", Kd)
                  else [ident_s])
        taus = (list(permutations(range(Ks)))
                if _symmetric_link(spec, "teacher", Ks) and _invariant_overlaps(P, Ks)
                else [ident_t])
        self.group = [(s, t) for s in sigmas for t in taus if (s, t) != (ident_s, ident_t)]
        self.trivial = not self.group
        self.ex = ex
        self.Kd, self.Ks, self.r = Kd, Ks, r
        gens = list(ex.R.gens)

        def pos(x):
            g = ex.gen.get(x) if isinstance(x, sp.Symbol) else None
            return gens.index(g) if g is not None else None
        self._pairs = [(k, h) for k in range(Kd) for h in range(k, Kd)]
        self._pair_index = {p: i for i, p in enumerate(self._pairs)}
        self._state_index = {s: i for i, s in enumerate(state)}
        self._maps, self._symbols = {}, {}
        for g in self.group:
            s, t = g
            sym = {}
            for k in range(Kd):
                for j in range(Ks):
                    sym[M[k][j]] = M[s[k]][t[j]]
                for a in range(r):
                    sym[E[k][a]] = E[s[k]][a]
                for h in range(Kd):
                    sym[Q[k][h]] = Q[s[k]][s[h]]
            where = {pos(a): pos(b) for a, b in sym.items()
                     if pos(a) is not None and pos(a) != pos(b)}
            state_map = [self._state_index[sym.get(x, x)] for x in state]
            self._maps[g] = (where, self._base_map(s, t), state_map)
            self._symbols[g] = {a: b for a, b in sym.items() if a != b}

    def _base_map(self, s, t) -> list:
        """Images of the base statistics' indices (A_M, A_E, A_Q, B, see derive.statistics)."""
        Kd, Ks, r = self.Kd, self.Ks, self.r
        npair = len(self._pairs)
        out = [s[k] * Ks + t[j] for k in range(Kd) for j in range(Ks)]
        off = Kd * Ks
        out += [off + s[k] * r + a for k in range(Kd) for a in range(r)]
        off += Kd * r
        img = [self._pair_index[(min(s[k], s[h]), max(s[k], s[h]))] for k, h in self._pairs]
        out += [off + i for i in img] + [off + npair + i for i in img]
        return out

    def rename(self, p, g):
        """p with every overlap generator replaced by its image under g."""
        return self.ex.rename(p, self._maps[g][0])

    def rename_sympy(self, expr, g):
        """A SymPy expression (closed forms, orthant probabilities, Gauss-Hermite nodes: all
        functions of the overlap symbols) with every overlap symbol replaced by its image."""
        return expr.xreplace(self._symbols[g])

    def orbit_function(self, compute, which: int, sympy_values: bool = False):
        """f(i, j) for unordered pairs, computing compute(i, j) once per orbit of pairs and
        renaming it for the others; which = 1 permutes base-statistic indices, 2 state indices.
        sympy_values: compute returns SymPy expressions (the closed-form path), not ring
        elements."""
        rename = self.rename_sympy if sympy_values else self.rename
        assign, reps = {}, {}

        def f(i, j):
            rep, g = self._orbit_of(i, j, which, assign)
            if rep not in reps:
                reps[rep] = compute(*rep)
            return reps[rep] if g is None else rename(reps[rep], g)
        f.orbits = reps
        return f

    def _orbit_of(self, i, j, which: int, assign: dict):
        """(representative pair, g with pair = g(representative), or None for the
        representative itself) of the unordered pair (i, j); `assign` keeps the pairs met so
        far, in the order orbit_function meets them."""
        key = (min(i, j), max(i, j))
        if key not in assign:
            assign[key] = (key, None)
            for g in self.group:
                pi = self._maps[g][which]
                a, b = pi[key[0]], pi[key[1]]
                assign.setdefault((min(a, b), max(a, b)), (key, g))
        return assign[key]

    def representatives(self, pairs, which: int) -> list:
        """The pairs whose compute(i, j) an orbit_function asked for `pairs` in this order
        calls (one per orbit), in the order it calls them."""
        assign, out = {}, []
        for i, j in pairs:
            rep = self._orbit_of(i, j, which, assign)[0]
            if rep not in out:
                out.append(rep)
        return out


__all__ = ["DirectionPermutations"]
