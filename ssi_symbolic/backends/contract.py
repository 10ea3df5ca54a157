"""The contract of a generated module: what every module provides, in one place.

Every backend writes a plain Python file that imports only numpy and scipy. This module says
what such a file must define, and :func:`check_module` validates a loaded module against it.
Consumers ask :func:`provides` / :func:`require` instead of probing a module's attributes.

Constants (all required):

    NAME, L, R              spec name, sequence length, number of positional directions r
    OVERLAPS                state names in order (MATH.md sections 2 and 8)
    DIRECTIONS              (K*, K): teacher and student directions (MATH.md section 8); with
                            more than one the link functions take the fields z{k}_{l}
    TEACHER_OVERLAPS        P[j][j'] = w*_j . w*_j' / d (K* x K* floats, ((1.0,),) for one)
    PARAMETERS, DEFAULTS    spec parameters (keyword arguments of every function) and defaults
    SPHERICAL, LOSS, NOISE  training, loss kind ("square", "norm"), label-noise variance Delta
    METHOD                  "exact" (closed forms) or "quadrature" (see quadrature_error)
    SPEC_HASH               sha256 of the spec and of what generated the module
    QUADRATURE_NODES        nodes per dimension of its quadratures (quadrature_error doubles it);
                            where rules of several dimensions need different counts, an exact
                            module lists QUADRATURE_NODE_FACTORS {k: f}: its k-dimensional
                            rules have round(f QUADRATURE_NODES) (an extra)
    BACKEND                 the backend that wrote it (backends.registry)
    UNAVAILABLE             {piece: reason} for the pieces below this module does not provide

Pieces (functions, all broadcasting over arrays of states and parameter values; `state` is the
overlaps in the order of OVERLAPS, `params` the parameters as keywords with DEFAULTS):

    population_loss(*state, **params)            R
    drift_eta1(*state, **params)                 tuple E[G1_i]: the O(eta) drift is eta times it
    drift_eta2(*state, **params)                 tuple E[G2_i]: the O(eta^2) drift is eta^2 times it
    drift(*state, eta, **params)                 tuple eta E[G1] + eta^2 E[G2]
    drift_jacobian(*state, eta, **params)        nested tuple d drift_i / d x_j
    covariance(*state, eta, **params)            nested tuple Cov(G)_ij
    diffusion(*state, eta, d, **params)          array (n, n, ...): D = Cov(G) / d
    ito_correction(*state, eta, **params)        d x the O(1/d) drift of the spherical rescaling
    finite_d_correction(*state, eta, **params)   d x the whole O(1/d) drift (SDE: drift + this / d);
                                                 FINITE_D_CORRECTION says whether it is complete
    teacher_link(*z, **params)                   tuple of the output entries of g*(z*)
    student_link(*z, **params)                   tuple of the output entries of g(z)
    student_link_gradient(*z, **params)          one tuple per output entry of dg / dz_l (L
                                                 entries; K L entries dg / dz{k}_{l}, direction
                                                 by direction, with several directions)
    quadrature_error(function, *args, **kwargs)  (value, error estimate) of a function above

Extras some backends add (EXTRAS; a consumer that needs one asks :func:`provides`): the
attention backend's landscape tables (LANDSCAPE_TABLES: R(m, e; theta) as a few array
operations per parameter value) and exact derivatives of R at the origin.

A module may leave out a piece only by naming it in UNAVAILABLE with the reason, e.g. a
drift-only module (no Cov(G) derived) or a backend that has no such formula.
"""
from __future__ import annotations

import inspect

from ..errors import SSIError

#: constant -> (type(s), meaning)
CONSTANTS = {
    "NAME": (str, "spec name"),
    "L": (int, "sequence length"),
    "R": (int, "number of positional directions"),
    "OVERLAPS": (tuple, "state names in order"),
    "DIRECTIONS": (tuple, "(K*, K) teacher and student directions"),
    "TEACHER_OVERLAPS": (tuple, "teacher overlaps P (K* x K*)"),
    "PARAMETERS": (tuple, "parameter names"),
    "DEFAULTS": (dict, "parameter defaults"),
    "SPHERICAL": (bool, "spherical (True) or plain (False) SGD"),
    "LOSS": (str, "loss kind"),
    "NOISE": (float, "label-noise variance"),
    "METHOD": (str, "'exact', 'closed form' or 'quadrature' (the least exact output)"),
    "OUTPUT_METHODS": (dict, "{piece: 'exact' | 'closed form' | 'quadrature'} per output"),
    "SPEC_HASH": (str, "hash of the spec and the generator"),
    "QUADRATURE_NODES": (int, "nodes per dimension of the module's quadratures"),
    "BACKEND": (str, "the backend that wrote the module"),
    "UNAVAILABLE": (dict, "{piece: reason} for the pieces not provided"),
}

#: piece -> (kind of its arguments, meaning)
#: kinds: "state" (*state, **params), "state_eta" (*state, eta, **params),
#: "state_eta_d" (*state, eta, d, **params), "links" (*z, **params), "any"
PIECES = {
    "population_loss": ("state", "population loss R"),
    "drift_eta1": ("state", "O(eta) drift coefficients E[G1]"),
    "drift_eta2": ("state", "O(eta^2) drift coefficients E[G2]"),
    "drift": ("state_eta", "drift eta E[G1] + eta^2 E[G2]"),
    "drift_jacobian": ("state_eta", "Jacobian of the drift"),
    "covariance": ("state_eta", "Cov(G)"),
    "diffusion": ("state_eta_d", "diffusion D = Cov(G) / d"),
    "ito_correction": ("state_eta", "O(1/d) drift of the spherical rescaling"),
    "finite_d_correction": ("state_eta", "the whole O(1/d) drift"),
    "teacher_link": ("links", "teacher link g*"),
    "student_link": ("links", "student link g"),
    "student_link_gradient": ("links", "gradient of the student link"),
    "quadrature_error": ("any", "quadrature error estimate"),
}

#: optional extras (functions or constants) -> meaning
EXTRAS = {
    "QUADRATURE_NODE_FACTORS": "{k: f}: the k-dimensional rules' nodes per dimension are "
                               "round(f QUADRATURE_NODES)",
    "QUADRATURE_UNVERIFIED": "{k: n_k}: the k-dimensional rules whose node count no probe "
                             "showed to meet QUADRATURE_TOLERANCE",
    "gradient_origin": "exact gradient of R at the origin",
    "hessian_origin": "exact Hessian of R at the origin",
    "loss_gradient": "gradient of R from the tables",
    "teacher_coefficients": "teacher coefficients c_p(theta) and constant parts b_i(theta)",
    "teacher_constant": "the teacher-only part of R",
    "student_mean": "Sbar(e) = E S(g + C e)",
    "student_square": "P(e) = E |S(g + C e)|^2",
    "cross_terms": "tabulated cross terms X_p(m, e) of the landscape",
    "PIECE_ENTRY": "the output entry of each teacher piece",
    "LOSS_ERROR_ESTIMATE": "error bound of the tabulated loss",
    "loss_dl_square": "E sum_l dl_l^2, the O(eta^2) drift factor",
}

#: the extras that make R(m, e; theta) a few array operations per parameter value (landscapes)
LANDSCAPE_TABLES = ("teacher_coefficients", "teacher_constant", "student_mean",
                    "student_square", "cross_terms", "PIECE_ENTRY", "LOSS_ERROR_ESTIMATE",
                    "gradient_origin", "hessian_origin")

METHODS = ("exact", "closed form", "quadrature")


class ContractError(SSIError, RuntimeError):
    """A generated module does not provide what the contract asks, or a consumer needs a piece
    the module declares unavailable."""


def _positional_names(fn) -> list[str]:
    sig = inspect.signature(fn)
    return [p.name for p in sig.parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]


def _keyword_names(fn) -> set[str]:
    return {p.name for p in inspect.signature(fn).parameters.values()
            if p.default is not p.empty or p.kind == p.KEYWORD_ONLY}


def check_module(mod, spec=None) -> list[str]:
    """Every way a loaded module breaks the contract (empty: it complies). With a spec, also
    whether the module belongs to it (name, overlaps, parameters)."""
    problems = []
    for name, (typ, meaning) in CONSTANTS.items():
        if not hasattr(mod, name):
            problems.append(f"constant {name} ({meaning}) is missing")
        elif not isinstance(getattr(mod, name), typ) or (
                typ is int and isinstance(getattr(mod, name), bool)):
            problems.append(f"constant {name} should be a {typ.__name__}, got "
                            f"{type(getattr(mod, name)).__name__}")
    if problems:
        return problems
    if mod.METHOD not in METHODS:
        problems.append(f"METHOD = {mod.METHOD!r}, expected one of {METHODS}")
    if set(mod.DEFAULTS) != set(mod.PARAMETERS):
        problems.append(f"DEFAULTS {sorted(mod.DEFAULTS)} do not match PARAMETERS "
                        f"{list(mod.PARAMETERS)}")
    unknown = sorted(set(mod.UNAVAILABLE) - set(PIECES))
    if unknown:
        problems.append(f"UNAVAILABLE names unknown pieces {unknown}")
    state = list(mod.OVERLAPS)
    for name, (kind, meaning) in PIECES.items():
        reason = mod.UNAVAILABLE.get(name)
        fn = getattr(mod, name, None)
        if reason is not None:
            if not isinstance(reason, str) or not reason.strip():
                problems.append(f"UNAVAILABLE[{name!r}] must give the reason as text")
            if fn is not None:
                problems.append(f"{name} is declared unavailable but defined")
            continue
        if not callable(fn):
            problems.append(f"function {name} ({meaning}) is missing and not declared in "
                            f"UNAVAILABLE")
            continue
        if kind == "any":
            continue
        pos = _positional_names(fn)
        expected = {"state": state, "state_eta": state + ["eta"],
                    "state_eta_d": state + ["eta", "d"]}.get(kind)
        if kind == "links":
            if len(pos) < 1 or not all(p.startswith("z") for p in pos):
                problems.append(f"{name}{inspect.signature(fn)}: expected the token fields as "
                                f"arguments")
        elif pos != expected:
            problems.append(f"{name}{inspect.signature(fn)}: expected positional arguments "
                            f"({', '.join(expected)})")
        missing = set(mod.PARAMETERS) - _keyword_names(fn)
        if missing:
            problems.append(f"{name} does not take the parameters {sorted(missing)} as "
                            f"keywords")
    if spec is not None:
        if mod.NAME != spec.name:
            problems.append(f"NAME = {mod.NAME!r}, the spec is {spec.name!r}")
        if tuple(mod.DIRECTIONS) != (spec.teacher_directions, spec.student_directions):
            problems.append(f"DIRECTIONS = {tuple(mod.DIRECTIONS)}, the spec has "
                            f"{(spec.teacher_directions, spec.student_directions)}")
        if tuple(mod.OVERLAPS) != tuple(spec.overlap_names):
            problems.append(f"OVERLAPS = {tuple(mod.OVERLAPS)}, the spec tracks "
                            f"{tuple(spec.overlap_names)}")
        if set(mod.PARAMETERS) != set(spec.parameters):
            problems.append(f"PARAMETERS = {tuple(mod.PARAMETERS)}, the spec has "
                            f"{tuple(spec.parameters)}")
    return problems


def checked(mod, spec=None):
    """The module itself if it complies with the contract, else a ContractError naming its file
    and the first problem (regenerating it is the cure)."""
    problems = check_module(mod, spec)
    if problems:
        where = getattr(mod, "__file__", None) or getattr(mod, "NAME", "module")
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ContractError(f"generated module {where}: {problems[0]}{more}; regenerate it "
                            f"with `ssi derive --force`")
    return mod


def provides(mod, piece: str) -> bool:
    """Whether a (checked) module provides a piece of the contract or an extra."""
    if piece not in PIECES and piece not in EXTRAS:
        raise KeyError(f"unknown piece {piece!r}")
    if piece in PIECES:
        return piece not in mod.UNAVAILABLE
    return hasattr(mod, piece)


def why_not(mod, piece: str) -> str | None:
    """None when the module provides the piece, else the reason it does not."""
    if provides(mod, piece):
        return None
    if piece in PIECES:
        return mod.UNAVAILABLE[piece]
    return f"the {mod.BACKEND} backend does not write {piece} ({EXTRAS[piece]})"


def require(mod, piece: str, what: str):
    """The function `piece` of a module, or a one-line ContractError saying that `what` needs
    it and why this module does not provide it."""
    reason = why_not(mod, piece)
    if reason is not None:
        meaning = PIECES[piece][1] if piece in PIECES else EXTRAS[piece]
        raise ContractError(f"{what} needs {piece} ({meaning}), which model '{mod.NAME}' "
                            f"does not provide: {reason}")
    return getattr(mod, piece)


__all__ = ["CONSTANTS", "PIECES", "EXTRAS", "LANDSCAPE_TABLES", "ContractError", "check_module", "checked",
           "provides", "why_not", "require"]
