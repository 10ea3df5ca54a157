"""LaTeX export of a Derivation: a standalone document (article class, amsmath only) with the
model, the population loss, the O(eta) and O(eta^2) drift and the diffusion matrix."""
from __future__ import annotations

import sympy as sp

from .derive import ETA, Derivation

TERMS_PER_LINE = 3

_SYMBOL_NAMES = {"eta": r"\eta", "omega": r"\omega"}


def tex(expr) -> str:
    return sp.latex(expr, symbol_names={sp.Symbol(k, real=True): v for k, v in
                                        _SYMBOL_NAMES.items()} | {ETA: r"\eta"})


def _expand_outside_functions(expr):
    """expr expanded, with the arguments of its functions (the arcsine arguments of the closed
    forms, rational functions of the state; quadrature nodes) left as they are: expanding them
    multiplies their size (an erf committee's drift printed to 2.9 MB instead of 30 kB)."""
    expr = sp.sympify(expr)
    funcs = [f for f in expr.atoms(sp.Function) if f.free_symbols]
    hidden = {f: sp.Dummy(f"f{i}") for i, f in enumerate(funcs)}
    back = {d: f for f, d in hidden.items()}
    return sp.expand(expr.xreplace(hidden)).xreplace(back)


def broken_lines(lhs: str, expr) -> str:
    """An align* block `lhs = expr` broken after every few terms, so long sums fit the page."""
    terms = list(sp.Add.make_args(_expand_outside_functions(expr))) if expr != 0 else \
        [sp.Integer(0)]
    terms = sorted(terms, key=sp.default_sort_key)
    lines = []
    for k in range(0, len(terms), TERMS_PER_LINE):
        chunk = terms[k:k + TERMS_PER_LINE]
        body = " + ".join(tex(t) for t in chunk).replace("+ -", "- ")
        lines.append(body)
    out = [rf"{lhs} &= {lines[0]}"]
    out += [rf"&\quad + {ln}" for ln in lines[1:]]
    return "\\begin{align*}\n" + " \\\\\n".join(out).replace("+ -", "- ") + "\n\\end{align*}\n"


def document(D: Derivation) -> str:
    """The LaTeX source of a standalone document for a Derivation."""
    spec = D.spec
    names = [tex(s) for s in D.state]
    C = spec.C
    parts = [
        r"\documentclass[10pt]{article}",
        r"\usepackage{amsmath,amssymb}",
        r"\allowdisplaybreaks",
        r"\begin{document}",
        rf"\section*{{Model \texttt{{{spec.name.replace('_', chr(92) + '_')}}}}}",
        rf"Sequence length $L = {spec.L}$, "
        + (rf"positional coefficients $C = {tex(sp.Matrix(C))}$, " if C else
           "no positional encoding, ")
        + rf"{'spherical' if spec.spherical else 'plain'} online SGD, loss "
        r"$\ell = \frac12 \lVert y - \hat y\rVert^2$"
        + (rf" with label-noise variance $\Delta = {tex(spec.noise)}$" if spec.noise else "")
        + (rf", mini-batches of $b = {spec.batch}$ sequences (every formula below is for this "
           rf"$b$: $F^{{(2)}}$ carries $1/b$ and $\mathrm{{Cov}}(G)$ is that of the batch "
           rf"mean)" if spec.batch != 1 else "")
        + (rf", learning rate $\eta\,({tex(spec.schedule)})$ at time $t$ (the formulas "
           rf"below are at a given $\eta$)" if spec.schedule is not None else "")
        + (rf", $K^* = {spec.teacher_directions}$ teacher directions"
           + (rf" with overlaps $P = {tex(sp.Matrix(spec.teacher_overlaps))}$" if spec.P else "")
           + rf" and $K = {spec.student_directions}$ student directions (fields "
           r"$z_{k l}$ of direction $k$ at token $l$; overlaps $m_{k j} = M_{kj}$, "
           r"$e_{k a} = E_{ka}$, $q_{k h} = Q_{kh}$, MATH.md section 8)" if spec.multi else "")
        + ". Conventions: MATH.md (overlaps $m$, $e$, $q$; time $t$ = steps$/d$; "
        r"per-step learning rate $\eta$).",
        r"\begin{align*}",
        rf"g^*(z) &= {tex(spec.teacher)}, & g(z) &= {tex(spec.student)}.",
        r"\end{align*}",
        "All expectations are " + (
            "exact (Gaussian moments)." if D.method == "exact" else
            r"exact where the integrand is polynomial; closed forms (arcsine, arc-cosine, "
            r"bivariate normal CDF $\Phi_2$) where the link families allow; orthant "
            r"probabilities $\Phi_3$, $\Phi_4$ without a closed form are evaluated by "
            r"Plackett's one-dimensional integral; the others are "
            r"written as Gaussian expectations, evaluated by quadrature."),
        r"\section*{Population loss}",
        broken_lines(r"\mathcal{R}", D.population_loss),
        r"\section*{Drift}",
        r"$\frac{d}{dt} X_i = \eta\, F^{(1)}_i + \eta^2 F^{(2)}_i$ with $F^{(1)} = "
        r"\mathbb{E}[G_1]$ (gradient flow) and $F^{(2)} = \mathbb{E}[G_2]$ (noise-induced).",
    ]
    for name, a, b in zip(names, D.drift_eta1, D.drift_eta2):
        parts.append(broken_lines(rf"F^{{(1)}}_{{{name}}}", a))
        parts.append(broken_lines(rf"F^{{(2)}}_{{{name}}}", b))
    parts.append(r"\section*{Diffusion}")
    if "covariance" not in D.methods:  # a drift-only derivation
        parts.append(r"Not derived: the spec asks for the drift only "
                     r"(\texttt{[derivation] diffusion = false}).")
        parts.append(r"\end{document}")
        return "\n".join(parts) + "\n"
    parts.append(r"$D = \mathrm{Cov}(G)/d$, with $\mathrm{Cov}(G)_{ij}$ below "
                 r"(rows and columns in the order $" + ", ".join(names) + "$).")
    n = len(names)
    for i in range(n):
        for j in range(i, n):
            parts.append(broken_lines(rf"\mathrm{{Cov}}(G)_{{{names[i]} {names[j]}}}",
                                      D.covariance[i, j]))
    parts.append(r"\end{document}")
    return "\n".join(parts) + "\n"


__all__ = ["document", "tex"]
