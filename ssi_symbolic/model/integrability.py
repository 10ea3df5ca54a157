"""Refusals of links whose needed expectations do not exist (issue 11, item 5).

The derivation needs E[g^4 ...]-type moments of the links over Gaussian tokens (Cov(G) holds
dl^4 terms) and the per-sample gradient of the student. A link is refused, with one SpecError
naming it and the reason, when

* it divides by, or takes a root or a logarithm of, an expression of the tokens that is not
  positive for every real value of the tokens (1/z1, sqrt(z1), log(z1), z1**(-2)): the link is
  singular or not real on a set of positive probability, or its moments are infinite;
* it holds exp(P) with P a polynomial in the tokens of degree > 2, or of degree 2 whose
  quadratic form has a largest eigenvalue >= 1/8 at the parameter defaults (exp(z1**2)):
  E[exp(4 P)] over unit-variance tokens, which Cov(G) needs, is then infinite;
* it is polynomial of degree D so high that the Gaussian moment E[z^(4(2D-1))] that Cov(G)
  needs, (4(2D-1) - 1)!!, exceeds double precision (D >= 40 or so);
* (student only) its derivative has a Dirac delta (sign, Heaviside): the per-sample gradient
  vanishes almost everywhere, so SGD does not move; such a link may only be a teacher.

Softmax normalisations 1 / sum_k exp(s_k) are positive and bounded and pass.
"""
from __future__ import annotations

import sympy as sp

from ..errors import SpecError

#: largest value a Gaussian moment may have in double precision, with room for coefficients
MOMENT_LIMIT = 10 ** 300


def _positive(x) -> bool:
    return bool(sp.sympify(x).is_positive)


def _double_factorial(k: int) -> int:
    out = 1
    while k > 1:
        out *= k
        k -= 2
    return out


def check_link(expr, tokens, parameters: dict, where: str, text: str, student: bool) -> None:
    """Raise SpecError when the link `expr` (one entry) has no usable expectations."""
    expr = sp.sympify(expr)
    toks = set(tokens)
    if not (expr.free_symbols & toks):
        return
    values = {sp.Symbol(k, real=True): v for k, v in parameters.items()}
    for p in expr.atoms(sp.Pow):
        if not (p.base.free_symbols & toks) or p.base is sp.E:
            continue
        if (not p.exp.is_Integer or p.exp < 0) and not _positive(p.base):
            why = (f"is singular where {p.base} = 0" if p.exp.is_negative else
                   f"is not real where {p.base} < 0")
            raise SpecError(f"{where}: '{text}': {p} {why}, which the Gaussian tokens reach "
                            f"(or approach) with positive probability: its expectations do "
                            f"not exist")
    for f in expr.atoms(sp.log):
        if f.args[0].free_symbols & toks and not _positive(f.args[0]):
            raise SpecError(f"{where}: '{text}': {f} is not defined where {f.args[0]} <= 0, which "
                            f"the Gaussian tokens reach with positive probability: its "
                            f"expectations do not exist")
    for e in expr.atoms(sp.exp):
        arg = e.args[0]
        if not (arg.free_symbols & toks) or _inside_normalisation(expr, e):
            continue
        try:
            P = sp.Poly(arg, *tokens)
        except sp.PolynomialError:
            continue  # exp of a bounded function (exp(tanh z)) or of a non-polynomial: quadrature
        deg = P.total_degree()
        if deg > 2:
            raise SpecError(f"{where}: '{text}': {e} grows like exp(z^{deg}): its Gaussian "
                            f"expectations are infinite")
        if deg == 2:
            A = sp.Matrix(len(tokens), len(tokens), lambda i, j: (
                P.coeff_monomial(tokens[i] ** 2) if i == j else
                P.coeff_monomial(tokens[i] * tokens[j]) / 2)).subs(values)
            try:
                top = max(float(sp.re(v)) for v in A.evalf().eigenvals())
            except (TypeError, ValueError):
                continue  # symbolic in a parameter without default
            if top >= 1 / 8:
                raise SpecError(
                    f"{where}: '{text}': {e} has a quadratic form of largest eigenvalue {top:g} "
                    f">= 1/8, so E[exp(4 P)] over unit-variance tokens (needed by Cov(G), which "
                    f"holds the fourth power of the link) is infinite")
    try:
        deg = sp.Poly(expr, *tokens).total_degree()
    except sp.PolynomialError:
        deg = None
    if deg is not None and deg >= 2:
        k = 4 * (2 * deg - 1)
        if _double_factorial(k - 1) > MOMENT_LIMIT:
            raise SpecError(f"{where}: '{text}': degree {deg} is too high: Cov(G) needs the "
                            f"Gaussian moment E[z^{k}] = {k - 1}!!, beyond double precision "
                            f"(keep the degree <= {MAX_DEGREE})")
    if student:
        for z in tokens:
            if sp.diff(expr, z).has(sp.DiracDelta):
                raise SpecError(f"{where}: '{text}' jumps (its derivative in {z} has a Dirac "
                                f"delta): the per-sample gradient vanishes almost everywhere, so "
                                f"SGD does not move; use such a link as a teacher only")


MAX_DEGREE = max(D for D in range(2, 200)
                 if _double_factorial(4 * (2 * D - 1) - 1) <= MOMENT_LIMIT)


def _inside_normalisation(expr, e) -> bool:
    """Whether exp e occurs only inside 1 / (positive sum) or inside a bounded ratio (a softmax
    entry exp(s_i) / sum_k exp(s_k))."""
    for p in expr.atoms(sp.Pow):
        if p.exp.is_negative and p.base.has(e) and _positive(p.base):
            return True
    return False


__all__ = ["check_link", "MOMENT_LIMIT"]
