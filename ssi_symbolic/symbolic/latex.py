"""LaTeX export of a Derivation: a standalone document (article class, amsmath only) with the
model, the population loss, the O(eta) and O(eta^2) drift and the diffusion matrix."""
from __future__ import annotations

import sympy as sp

from .closed_forms import NormalOrthant
from .derive import ETA, Derivation

TERMS_PER_LINE = 3
#: a Cov(G) with orthant probabilities whose entries hold more distinct subexpressions in
#: all is printed through a cse (polynomial entries are printed term by term)
CSE_NODES = 20000

_SYMBOL_NAMES = {"eta": r"\eta", "omega": r"\omega"}


def _dag_size(expr) -> int:
    """The number of distinct subexpressions of expr (shared subtrees counted once)."""
    seen, stack = set(), [expr]
    while stack:
        e = stack.pop()
        if e in seen:
            continue
        seen.add(e)
        stack.extend(e.args)
    return len(seen)


#: printed length (str) above which a subexpression gets its own auxiliary quantity
SPLIT_CHARS = 300


def _split_long(expr, fresh, lines: list, top: bool = False):
    """expr with its long arguments (printed longer than SPLIT_CHARS) replaced by new symbols
    from `fresh`, their definitions appended to `lines` first (recursively split too). A top
    sum keeps its terms (broken_lines puts a few on each line), each term split as needed."""
    if expr.is_Atom or len(str(expr)) <= SPLIT_CHARS:
        return expr
    if top and expr.is_Add:
        return sp.Add(*[_split_long(t, fresh, lines) for t in expr.args], evaluate=False)
    args = []
    for a in expr.args:
        if not a.is_Atom and len(str(a)) > SPLIT_CHARS // 4:
            s = next(fresh)
            lines.append((s, _split_long(a, fresh, lines)))
            a = s
        args.append(a)
    return expr.func(*args, evaluate=False) if (expr.is_Add or expr.is_Mul) else expr.func(*args)


def auxiliary_form(exprs: list, orth: dict) -> tuple:
    """exprs (orthant probabilities already replaced by the symbols orth maps them to) and the
    orthant probabilities' arguments through one cse, long values split further
    (_split_long): (repl, reduced, defs) with repl the (symbol, value) definitions in order,
    reduced the expressions in terms of them and defs {orthant symbol: NormalOrthant of the
    reduced arguments}."""
    args = [x for a in orth for x in a.args]
    repl, reduced = sp.cse(list(exprs) + args, symbols=sp.numbered_symbols("_aux_"),
                           order="none")
    # every line of the document has to fit TeX's dimensions
    fresh = sp.numbered_symbols("_aux_split_")
    lines = []
    for a, v in repl:
        lines.append((a, _split_long(v, fresh, lines)))
    reduced = [_split_long(e, fresh, lines, top=True) for e in reduced]
    it = iter(reduced[len(exprs):])
    defs = {o: NormalOrthant(*[next(it) for _ in a.args]) for a, o in orth.items()}
    return lines, reduced[:len(exprs)], defs


def tex(expr, names: dict | None = None) -> str:
    """LaTeX of expr; names: extra {Symbol: LaTeX} (the orthant probabilities' names)."""
    return sp.latex(expr, symbol_names={sp.Symbol(k, real=True): v for k, v in
                                        _SYMBOL_NAMES.items()} | {ETA: r"\eta"} | (names or {}))


def _expand_outside_functions(expr):
    """expr expanded, with the arguments of its functions (the arcsine arguments of the closed
    forms, rational functions of the state; quadrature nodes) and its roots and reciprocals of
    sums (the determinants of completed squares) left as they are: expanding them multiplies
    their size (an erf committee's drift printed to 2.9 MB instead of 30 kB)."""
    expr = sp.sympify(expr)
    funcs = [f for f in expr.atoms(sp.Function) if f.free_symbols]
    funcs += [p for p in expr.atoms(sp.Pow) if p.free_symbols and not p.base.is_Symbol
              and not (p.exp.is_Integer and p.exp > 0)]
    hidden = {f: sp.Dummy(f"f{i}") for i, f in enumerate(funcs)}
    back = {d: f for f, d in hidden.items()}
    return sp.expand(expr.xreplace(hidden)).xreplace(back)


def broken_lines(lhs: str, expr, names: dict | None = None, expand: bool = True) -> str:
    """An align* block `lhs = expr` broken after every few terms, so long sums fit the page
    (expand=False: the terms of expr as it is, not expanded)."""
    if expand:
        expr = _expand_outside_functions(expr)
    terms = list(sp.Add.make_args(expr)) if expr != 0 else [sp.Integer(0)]
    terms = sorted(terms, key=sp.default_sort_key)
    lines = []
    for k in range(0, len(terms), TERMS_PER_LINE):
        chunk = terms[k:k + TERMS_PER_LINE]
        body = " + ".join(tex(t, names) for t in chunk).replace("+ -", "- ")
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
    entries = {(i, j): D.covariance[i, j] for i in range(n) for j in range(i, n)}
    # orthant probabilities (several directions: four erf factors) named once, defined below
    atoms = sorted(set().union(*[sp.sympify(e).atoms(NormalOrthant) for e in entries.values()]),
                   key=sp.default_sort_key)
    orth = {a: sp.Symbol(f"_orthant_{k}") for k, a in enumerate(atoms, 1)}
    orth_tex = {o: rf"\Phi_{a.dimension}^{{({k})}}" for k, (a, o) in enumerate(orth.items(), 1)}
    if orth:
        parts.append(r"The orthant probabilities $\Phi_n^{(k)} = P(Z \le h)$, $Z \sim N(0, R)$, "
                     r"written $\Phi_n(h_1, \ldots, h_n; R_{12}, R_{13}, \ldots, R_{n-1\,n})$, "
                     r"are listed after the entries.")
    entries = {k: sp.sympify(e).xreplace(orth) for k, e in entries.items()}
    defs = {o: a for a, o in orth.items()}
    if orth and sum(_dag_size(e) for e in entries.values()) > CSE_NODES:
        # too large to print expanded (the erf committee's would be 17 MB): the entries and the
        # orthant probabilities' arguments in terms of their common subexpressions a_k
        repl, reduced, defs = auxiliary_form(list(entries.values()), orth)
        aux = {a: rf"a_{{{k}}}" for k, (a, _) in enumerate(repl, 1)}
        symbol_tex = orth_tex | aux
        parts.append(rf"The entries are written with {len(repl)} auxiliary quantities "
                     r"$a_k$ (their common subexpressions), each defined from the overlaps and "
                     r"the ones before it:")
        parts.append("\\begin{align*}\n" + " \\\\\n".join(
            rf"{aux[a]} &= {tex(v, symbol_tex)}" for a, v in repl) + "\n\\end{align*}\n")
        for (i, j), e in zip(entries, reduced):
            parts.append(broken_lines(rf"\mathrm{{Cov}}(G)_{{{names[i]} {names[j]}}}", e,
                                      symbol_tex, expand=False))
    else:
        symbol_tex = orth_tex
        for (i, j), e in entries.items():
            parts.append(broken_lines(rf"\mathrm{{Cov}}(G)_{{{names[i]} {names[j]}}}", e,
                                      symbol_tex))
    for o, a in defs.items():
        parts.append("\\begin{align*}\n" + rf"{orth_tex[o]} &= {tex(a, symbol_tex)}"
                     + "\n\\end{align*}\n")
    parts.append(r"\end{document}")
    return "\n".join(parts) + "\n"


__all__ = ["document", "tex", "auxiliary_form"]
