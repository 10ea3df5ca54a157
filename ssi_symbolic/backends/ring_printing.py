"""Printing the exact engine's polynomials as vectorised NumPy source without SymPy trees.

A polynomial output of the exact engine (a ring element: a dict from exponent tuples to
rational coefficients, its generators the state, eta, the parameters and constants) is printed
in a nested Horner form chosen greedily, P = A + v B with v the variable found in most terms of
P, A the terms without v and B the others divided by v, recursively. Every sub-polynomial met
while nesting any of the outputs is hash-consed (one common-subexpression elimination over all
outputs: a sub-polynomial that two outputs or two branches share is computed once). Constants
that are numbers (radicals, pi, exp(1/2) ...) are folded into the coefficients, printed as
correctly rounded floats (rationals as p/q); constants that depend on parameters (sqrt(sigma))
are computed once per call, like a variable.

For a polynomial of N terms this costs O(N x its degree) dict and tuple operations, where
building the SymPy expression, its Horner form and SymPy's cse took minutes for the K = 4
committee's Cov(G) (about a million terms).
"""
from __future__ import annotations

from fractions import Fraction
from bisect import bisect_left
from operator import itemgetter

import mpmath
import sympy as sp

from .printing import pycode

#: bits per exponent in a packed monomial
WIDTH = 8
#: an inline expression deeper than this (nested parentheses) gets a name of its own
MAX_DEPTH = 12
#: an inline expression longer than this (characters) gets a name of its own
MAX_CHARS = 400


def _power(name: str, e: int) -> str:
    return "*".join([name] * e) if e <= 4 else f"{name}**{e}"


class RingPrinter:
    """Source lines computing ring elements of an exact engine `ex` as NumPy expressions of
    `variables` (SymPy symbols: the state, eta and the parameters, named in the code by their
    names). Register outputs with :meth:`add` (a handle each), then :meth:`finish`; then
    :meth:`code` gives an output's expression and :meth:`lines` the assignments it needs."""

    def __init__(self, ex, variables, prefix="_p"):
        self.ex = ex
        R = ex.R
        gens = list(R.gens)
        self.prefix = prefix
        self.var_pos, self.var_name = [], []
        for v in variables:
            g = ex.gen.get(v)
            if g is not None:
                self.var_pos.append(gens.index(g))
                self.var_name.append(str(v))
        random = {gens.index(ex.gen[v]) for v in ex.random if v in ex.gen}
        known = set(self.var_pos) | random
        self.atom_lines = []  # (name, code, atoms read) of constants computed from the
        self.num_pos, self.num_value = [], []  # parameters, then the engine's `aux`
        aux = getattr(ex, "aux", None) or {}
        aux_pos = {}
        for i, s in enumerate(R.symbols):
            if i in known:
                continue
            if s in aux:
                aux_pos[s] = i
                continue
            value = ex.back.get(s)
            if value is None:
                raise ValueError(f"ring generator {s} is neither a variable nor a constant")
            if value.free_symbols:  # e.g. sqrt(sigma): a variable of the code
                name = f"_k{len(self.atom_lines)}"
                self.atom_lines.append((name, pycode(value), ()))
                self.var_pos.append(i)
                self.var_name.append(name)
            else:
                self.num_pos.append(i)
                self.num_value.append(mpmath.mpf(sp.N(value, 40)) if not value.is_Rational
                                      else Fraction(int(value.p), int(value.q)))
        # auxiliary generators defined from the state and earlier ones (token sums: summed
        # cumulants K and moments M, symbolic/token_sums.py), in the engine's order
        line_of = {}
        for s, defn in aux.items():
            if s not in aux_pos:
                continue
            name = f"_k{len(self.atom_lines)}"
            reads = sorted(line_of[t] for t in defn.free_symbols if t in line_of)
            code = pycode(defn.xreplace({t: sp.Symbol(self.atom_lines[line_of[t]][0])
                                         for t in defn.free_symbols if t in line_of}))
            line_of[s] = len(self.atom_lines)
            self.atom_lines.append((name, code, tuple(reads)))
            self.var_pos.append(aux_pos[s])
            self.var_name.append(name)
        self.n_atoms = len(self.atom_lines)
        self.n_vars = len(self.var_pos) - self.n_atoms  # atoms come last
        self._numbers = {}
        self._single = {}  # (c, constants' exponents) -> literal
        nv = len(self.var_pos)
        self._shifts = [WIDTH * (nv - 1 - k) for k in range(nv)]
        self._var_of_field = {nv - 1 - k: k for k in range(nv)}
        self.nodes = []    # ("mono", (((v, e), ...), coef)) or ("add", (a, v, b)): A + v B
        self._memo = {}
        self.roots = []    # node id (or None for zero) of each output
        self._finished = False

    # --- terms ------------------------------------------------------------------------------
    def _number(self, parts) -> str:
        """The literal of sum c * prod constants^cmon over parts [(c, cmon)]."""
        key = tuple(sorted(parts))
        lit = self._numbers.get(key)
        if lit is not None:
            return lit
        if not any(any(cm) for _, cm in parts):
            q = sum((Fraction(int(c.numerator), int(c.denominator)) for c, _ in parts),
                    Fraction(0))
            lit = "" if q == 0 else (str(q.numerator) if q.denominator == 1
                                     else f"{q.numerator}/{q.denominator}")
        else:
            with mpmath.workprec(160):
                total = mpmath.mpf(0)
                for c, cmon in parts:
                    t = mpmath.mpf(int(c.numerator)) / int(c.denominator)
                    for e, value in zip(cmon, self.num_value):
                        if e:
                            t *= (mpmath.mpf(value.numerator) / value.denominator
                                  if isinstance(value, Fraction) else value) ** e
                    total += t
                lit = "" if total == 0 else repr(float(total))
        self._numbers[key] = lit
        return lit

    def _terms(self, p):
        """(monomials, coefficient literals) of a ring element, sorted by monomial; a monomial
        is one integer packing the exponents of the variables, WIDTH bits each, the first
        variable (in the printer's order) in the highest bits."""
        p = self.ex._reduce(p)
        vp, npos = self.var_pos, self.num_pos
        get_v = itemgetter(*vp) if len(vp) > 1 else (lambda m: (m[vp[0]],) if vp else ())
        get_c = itemgetter(*npos) if len(npos) > 1 else (lambda m: (m[npos[0]],) if npos else ())
        first, more = {}, {}   # packed monomial -> (c, constants' exponents); the rare others
        try:
            for mon, c in p.items():
                key = int.from_bytes(bytes(get_v(mon)), "big")
                if key in first:
                    more.setdefault(key, []).append((c, get_c(mon)))
                else:
                    first[key] = (c, get_c(mon))
        except ValueError:
            raise ValueError(f"an exponent above {(1 << WIDTH) - 1} cannot be printed") from None
        single, number = self._single, self._number
        mons, lits = [], []
        for key in sorted(first):
            part = first[key]
            if key in more:
                lit = number([part] + more[key])
            else:
                lit = single.get(part)
                if lit is None:
                    lit = single[part] = number([part])
            if lit:
                mons.append(key)
                lits.append(lit)
        return tuple(mons), tuple(lits)

    def _unpack(self, key):
        """((variable, exponent), ...) of a packed monomial."""
        mask = (1 << WIDTH) - 1
        return tuple((k, (key >> sh) & mask) for k, sh in enumerate(self._shifts)
                     if (key >> sh) & mask)

    # --- nesting ----------------------------------------------------------------------------
    def _node(self, mons, lits) -> int:
        """The node (hash-consed) of the polynomial sum lits[i] * mons[i], mons sorted: P =
        A + v B with v the first variable (in the printer's order) that P holds, A the terms
        without v and B the others divided by v. v being in the highest bits of the packed
        monomials, A is a prefix of the sorted terms and B the rest minus one unit of v, still
        sorted: a split is a bisection and one subtraction per term of B."""
        key = (mons, lits)
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        if len(mons) == 1:
            node = ("mono", (self._unpack(mons[0]), lits[0]))
        else:
            field = (mons[-1].bit_length() - 1) // WIDTH
            unit = 1 << (field * WIDTH)
            i = bisect_left(mons, unit)
            a = self._node(mons[:i], lits[:i]) if i else None
            b = self._node(tuple([m - unit for m in mons[i:]]), lits[i:])
            node = ("add", (a, self._var_of_field[field], b))
        self.nodes.append(node)
        self._memo[key] = len(self.nodes) - 1
        return len(self.nodes) - 1

    def add(self, p) -> int:
        """Register the ring element p as an output; returns its handle."""
        if self._finished:
            raise RuntimeError("outputs are added before finish()")
        mons, lits = self._terms(p)
        self.roots.append(self._node(mons, lits) if mons else None)
        return len(self.roots) - 1

    # --- emission ---------------------------------------------------------------------------
    def finish(self) -> None:
        """Decide which nodes get names (outputs, shared nodes, deep or long expressions) and
        write their lines, in an order where every name is assigned before it is read."""
        refs = [0] * len(self.nodes)
        for kind, payload in self.nodes:
            if kind == "add":
                a, _, b = payload
                if a is not None:
                    refs[a] += 1
                refs[b] += 1
        for r in self.roots:
            if r is not None:
                refs[r] += 2
        names = self.var_name
        self._code = [None] * len(self.nodes)   # (code, depth, is_sum, deps)
        self._lines = []                         # (name, code, deps)
        atom_deps = {self.n_vars + k: k for k in range(self.n_atoms)}  # var -> line index
        for name, code, reads in self.atom_lines:
            self._lines.append((name, code, frozenset(reads)))
        for i, (kind, payload) in enumerate(self.nodes):
            if kind == "mono":
                smon, c = payload
                factors = [_power(names[v], e) for v, e in smon]
                deps = frozenset(atom_deps[v] for v, _ in smon if v in atom_deps)
                if not factors:
                    code = c
                elif c == "1":
                    code = "*".join(factors)
                elif c == "-1":
                    code = "-" + "*".join(factors)
                else:
                    code = "*".join([c] + factors)
                # a sign or a fraction in front: parenthesised where it is multiplied
                is_sum = c.startswith("-") or "/" in c
                self._code[i] = (code, 0, is_sum, deps)
            else:
                a, v, b = payload
                bc, bd, bsum, bdeps = self._code[b]
                prod = f"{names[v]}*({bc})" if bsum else f"{names[v]}*{bc}"
                depth = bd + (1 if bsum else 0)
                deps = set(bdeps)
                if v in atom_deps:
                    deps.add(atom_deps[v])
                if a is None:
                    code = prod
                else:
                    ac, ad, _, adeps = self._code[a]
                    code = f"{ac} + {prod}"
                    depth = max(depth, ad)
                    deps |= adeps
                self._code[i] = (code, depth, a is not None or bsum, frozenset(deps))
            code, depth, is_sum, deps = self._code[i]
            if (kind == "add" and refs[i] > 1) or depth > MAX_DEPTH or len(code) > MAX_CHARS:
                name = f"{self.prefix}{len(self._lines)}"
                self._lines.append((name, code, deps))
                self._code[i] = (name, 0, False, frozenset({len(self._lines) - 1}))
        self._finished = True

    def code(self, handle: int) -> str:
        """The expression of an output (a name, a literal or a short expression)."""
        r = self.roots[handle]
        return "0" if r is None else self._code[r][0]

    def lines(self, handles) -> list[str]:
        """The assignments (in order) that the outputs `handles` need."""
        need, stack = set(), []
        for h in handles:
            r = self.roots[h]
            if r is not None:
                stack.extend(self._code[r][3])
        while stack:
            k = stack.pop()
            if k in need:
                continue
            need.add(k)
            stack.extend(self._lines[k][2])
        return [f"{self._lines[k][0]} = {self._lines[k][1]}" for k in sorted(need)]


__all__ = ["RingPrinter"]
