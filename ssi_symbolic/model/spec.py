"""Model specs: the sequence single-index model of MATH.md section 1, from TOML or Python.

A spec fixes the sequence length L, the teacher link g*, the student link g (SymPy expressions in
the token projections z1..zL and the parameters), the positional coefficients C (L x r), the loss
and the training (spherical or plain SGD). Every validation error is raised here, as a
:class:`~ssi_symbolic.errors.SpecError` whose one-line message names the file, the key and the
offending symbol or value.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sympy as sp
from sympy.core.function import AppliedUndef
from sympy.parsing.sympy_parser import parse_expr, rationalize, standard_transformations

from ..errors import SpecError
from .links import VOCABULARY

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TOKEN = re.compile(r"^z(\d+)$")
#: a field of direction k at token l (MATH.md section 8): z{k}_{l}
_FIELD = re.compile(r"^z(\d+)_(\d+)$")
#: names of overlaps with several directions (m1_2, e1_1, q1_2), not allowed as parameters
_MULTI_OVERLAP = re.compile(r"^[zmeq]\d+_\d+$")
#: the largest number of teacher or student directions a spec may have
MAX_DIRECTIONS = 8
#: Names a parameter may not take: overlaps, projections, learning rate, dimension.
RESERVED = {"m", "q", "e", "z", "eta", "d", "t", "Delta", "L"} | set(VOCABULARY)
#: "square": 1/2 ||y - y_hat||^2 (MATH.md 3); "norm": ||y - y_hat|| (Frobenius norm, not squared)
LOSS_KINDS = ("square", "norm")
_TRANSFORMS = standard_transformations + (rationalize,)
#: Keys of the [training] table.
TRAINING_KEYS = {"spherical", "batch", "schedule"}
#: The time variable of a learning-rate schedule (t = steps / d).
T_SYM = sp.Symbol("t", nonnegative=True)


def token_symbols(L: int) -> tuple[sp.Symbol, ...]:
    """The student token projections z1..zL (the variables of a link expression)."""
    return tuple(sp.Symbol(f"z{l + 1}", real=True) for l in range(L))


def field_symbols(L: int, K: int) -> tuple[tuple[sp.Symbol, ...], ...]:
    """The fields z{k}_{l} of K directions at L tokens (MATH.md section 8), as fields[k][l]."""
    return tuple(tuple(sp.Symbol(f"z{k + 1}_{l + 1}", real=True) for l in range(L))
                 for k in range(K))


def link_variables(L: int, K: int | None) -> tuple[sp.Symbol, ...]:
    """The variables of a link expression, flattened: z1..zL for a single-direction spec
    (K None), else z{k}_{l} direction by direction (z1_1, z1_2, .., z2_1, ..)."""
    if K is None:
        return token_symbols(L)
    return tuple(v for row in field_symbols(L, K) for v in row)


def to_rational(x, where: str) -> sp.Rational:
    """An exact rational from a TOML number (0.1 -> 1/10), or a SpecError naming `where`."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise SpecError(f"{where}: expected a number, got {x!r}")
    if not math.isfinite(x):
        raise SpecError(f"{where}: expected a finite number, got {x!r}")
    return sp.Rational(repr(x)) if isinstance(x, float) else sp.Integer(x)


def _nice_list(names):
    return ", ".join(sorted(names))


def parse_link(text, L: int, parameters, where: str, directions: int | None = None):
    """Parse a link string into a SymPy scalar or Matrix in z1..zL and the parameters; with
    `directions` = K (a spec with several directions, MATH.md section 8) in the fields
    z{k}_{l}, k <= K, l <= L, where `z` is the K x L matrix of them.

    Raises SpecError for syntax errors, unknown names or functions, token or direction indices
    beyond L or K, and free symbols that are neither fields nor parameters.
    """
    if isinstance(text, (sp.Basic, sp.MatrixBase)):
        expr = text
    else:
        if not isinstance(text, str) or not text.strip():
            raise SpecError(f"{where}: expected a link expression string, got {text!r}")
        if "__" in text or "lambda" in text:
            raise SpecError(f"{where}: '{text}' is not a link expression")
        zs = link_variables(L, directions)
        local = dict(VOCABULARY)
        local.update({str(s): s for s in zs})
        local["z"] = (sp.Matrix(zs) if directions is None
                      else sp.Matrix(field_symbols(L, directions)))
        local["L"] = sp.Integer(L)
        local.update({p: sp.Symbol(p, real=True) for p in parameters})
        glob = {"Symbol": sp.Symbol, "Integer": sp.Integer, "Float": sp.Float,
                "Rational": sp.Rational, "Function": sp.Function, "__builtins__": {}}
        try:
            expr = parse_expr(text, local_dict=local, global_dict=glob,
                              transformations=_TRANSFORMS, evaluate=True)
        except SpecError:
            raise
        except Exception as exc:  # SymPy raises many kinds on bad syntax
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise SpecError(f"{where}: cannot parse '{text}': {msg}") from None
    if isinstance(expr, (list, tuple)):
        expr = sp.Matrix(expr)
    if not isinstance(expr, (sp.Basic, sp.MatrixBase)):
        raise SpecError(f"{where}: '{text}' does not evaluate to an expression")
    items = list(expr) if isinstance(expr, sp.MatrixBase) else [expr]
    allowed = {str(s) for s in link_variables(L, directions)} | set(parameters)
    for item in items:
        undef = sorted({type(f).__name__ for f in item.atoms(AppliedUndef)})
        if undef:
            raise SpecError(f"{where}: unknown function '{undef[0]}' in '{text}' "
                            f"(known: {_nice_list(VOCABULARY)})")
        for s in sorted(item.free_symbols, key=str):
            name = str(s)
            if name in allowed:
                continue
            mt, mf = _TOKEN.match(name), _FIELD.match(name)
            if directions is None:
                if mt:
                    raise SpecError(f"{where}: '{name}' refers to token {mt.group(1)} but "
                                    f"L = {L}")
                if mf:
                    raise SpecError(f"{where}: '{name}' names a direction, but the spec has "
                                    f"one teacher and one student direction (tokens z1..z{L}; "
                                    f"set [teacher] or [student] directions for z{{k}}_{{l}})")
                vars_ = f"tokens z1..z{L}, z"
            else:
                if mt:
                    raise SpecError(f"{where}: '{name}': with several directions the fields "
                                    f"are z{{direction}}_{{token}} (z1_1 .. z{directions}_{L})")
                if mf and not 1 <= int(mf.group(1)) <= directions:
                    raise SpecError(f"{where}: '{name}' refers to direction {mf.group(1)} but "
                                    f"this link has {directions} direction(s)")
                if mf:
                    raise SpecError(f"{where}: '{name}' refers to token {mf.group(2)} but "
                                    f"L = {L}")
                vars_ = f"fields z1_1..z{directions}_{L}, z"
            raise SpecError(f"{where}: unknown name '{name}' in '{text}' "
                            f"({vars_}; parameters: {_nice_list(parameters) or 'none'})")
    if isinstance(expr, sp.MatrixBase) and expr.shape == (1, 1):
        expr = expr[0, 0]
    return expr


def parse_schedule(text, parameters, where: str):
    """Parse a learning-rate schedule f(t, parameters) (e.g. "1 / (1 + t / t0)"), the factor of
    the learning rate at time t = steps / d. SpecError unless it is an expression in t and the
    parameters that is finite and > 0 at t = 0, 1, 10, ..., 10^6 at the parameter defaults."""
    if not isinstance(text, str) or not text.strip() or "__" in text or "lambda" in text:
        raise SpecError(f"{where}: expected an expression in t like \"1 / (1 + t / 100)\", "
                        f"got {text!r}")
    local = {k: VOCABULARY[k] for k in ("exp", "log", "sqrt", "Min", "Max", "cos", "sin",
                                        "tanh", "Heaviside") if k in VOCABULARY}
    local["t"] = T_SYM
    local.update({p: sp.Symbol(p, real=True) for p in parameters})
    glob = {"Symbol": sp.Symbol, "Integer": sp.Integer, "Float": sp.Float,
            "Rational": sp.Rational, "Function": sp.Function, "__builtins__": {}}
    try:
        expr = sp.sympify(parse_expr(text, local_dict=local, global_dict=glob,
                                     transformations=_TRANSFORMS, evaluate=True))
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SpecError(f"{where}: cannot parse '{text}': {msg}") from None
    if not isinstance(expr, sp.Expr) or expr.atoms(AppliedUndef):
        raise SpecError(f"{where}: '{text}' is not an expression in t and the parameters")
    extra = sorted(str(s) for s in expr.free_symbols if str(s) != "t" and str(s) not in
                   parameters)
    if extra:
        raise SpecError(f"{where}: unknown name '{extra[0]}' in '{text}' (the time t and the "
                        f"parameters: {_nice_list(parameters) or 'none'})")
    at = expr.subs({sp.Symbol(k, real=True): v for k, v in parameters.items()})
    for t in (0, 1, 10, 100, 10 ** 3, 10 ** 4, 10 ** 5, 10 ** 6):
        try:
            v = complex(at.subs(T_SYM, t).evalf())
        except (TypeError, ValueError):
            v = complex("nan")
        if not (math.isfinite(v.real) and v.imag == 0 and v.real > 0):
            raise SpecError(f"{where}: the schedule '{text}' must be finite and > 0 for t >= 0 "
                            f"(at t = {t} it is {at.subs(T_SYM, t).evalf(6)})")
    return expr


def link_shape(expr) -> tuple[int, ...]:
    """() for a scalar link, (rows, cols) for a matrix or vector."""
    return tuple(expr.shape) if isinstance(expr, sp.MatrixBase) else ()


def link_entries(expr) -> list:
    """The entries of a link, flattened row by row (one entry for a scalar link)."""
    return list(expr) if isinstance(expr, sp.MatrixBase) else [expr]


def overlap_index(name: str) -> tuple[str, int, int]:
    """The kind and 0-based indices of a several-direction overlap name (MATH.md section 8):
    "m2_1" -> ("m", 1, 0) is M[2,1], "e{k}_{a}" -> E[k,a], "q{k}_{h}" -> Q[k,h]."""
    if not _MULTI_OVERLAP.match(name) or name[0] == "z":
        raise ValueError(f"not an overlap name of several directions: {name!r}")
    a, b = name[1:].split("_")
    return name[0], int(a) - 1, int(b) - 1


@dataclass(frozen=True)
class ModelSpec:
    """A sequence single-index model (MATH.md section 1).

    teacher, student: SymPy scalar or Matrix in z1..zL and the parameters (the teacher's are
    evaluated at the teacher projections z*_l, the student's at z_l). C: L x r positional
    coefficients (r = 0 for no encoding). noise: label-noise variance Delta. spherical: spherical
    (True) or plain (False) online SGD. untied: one weight vector per token (MATH.md section 6,
    spherical constraint on the flattened vector) instead of one shared (tied) vector.
    batch: sequences averaged per step, b (MATH.md section 9). schedule: None or a SymPy
    expression f(t, parameters) > 0; the learning rate at time t is eta f(t) (section 9).
    teacher_directions K*, student_directions K, P: several directions (MATH.md section 8);
    the links are then in the fields z{k}_{l} and P (K* x K*, empty for the identity) holds the
    teacher overlaps w*_j . w*_j' / d. diffusion: False when the spec asks for the drift
    only ([derivation] diffusion = false: its module has no Cov(G) and no O(1/d) drift).
    """

    name: str
    L: int
    teacher: object
    student: object
    C: tuple = ()
    parameters: dict = field(default_factory=dict)
    loss: str = "square"
    noise: sp.Rational = sp.Integer(0)
    spherical: bool = True
    source: str | None = None
    untied: bool = False
    batch: int = 1
    schedule: object = None
    teacher_directions: int = 1
    student_directions: int = 1
    P: tuple = ()
    diffusion: bool = True
    raw: dict | None = field(default=None, compare=False, repr=False)

    @property
    def multi(self) -> bool:
        """Several teacher or student directions (MATH.md section 8): fields z{k}_{l} and the
        overlap matrices M, E, Q instead of m, e, q."""
        return self.teacher_directions > 1 or self.student_directions > 1

    @property
    def teacher_overlaps(self) -> tuple:
        """P[j][j'] = w*_j . w*_j' / d as a K* x K* tuple of rationals (identity by default)."""
        if self.P:
            return self.P
        n = self.teacher_directions
        return tuple(tuple(sp.Integer(int(i == j)) for j in range(n)) for i in range(n))

    def variables(self, role: str) -> tuple:
        """The variables of the teacher's or the student's link, flattened: z1..zL, or with
        several directions z{k}_{l} direction by direction."""
        if not self.multi:
            return token_symbols(self.L)
        K = self.teacher_directions if role == "teacher" else self.student_directions
        return link_variables(self.L, K)

    @property
    def r(self) -> int:
        """Number of positional directions (columns of C)."""
        return len(self.C[0]) if self.C else 0

    @property
    def shape(self) -> tuple[int, ...]:
        """Output shape of the links: () scalar, (K, 1) vector, (L, L) matrix, ..."""
        return link_shape(self.teacher)

    @property
    def overlap_names(self) -> tuple[str, ...]:
        """State variables in order: m, then e (r = 1) or e1..er, then q for plain SGD.
        Untied students: m1..mL, then q1..qL (the per-token norms move even on the sphere,
        where only their sum L is fixed). Several directions (MATH.md section 8): m{k}_{j} row
        by row, e{k}_{a}, then q{k}_{h} for k <= h (plain) or k < h (spherical)."""
        if self.multi:
            K, Ks, r = self.student_directions, self.teacher_directions, self.r
            return (tuple(f"m{k + 1}_{j + 1}" for k in range(K) for j in range(Ks))
                    + tuple(f"e{k + 1}_{a + 1}" for k in range(K) for a in range(r))
                    + tuple(f"q{k + 1}_{h + 1}" for k in range(K) for h in range(k, K)
                            if not (self.spherical and h == k)))
        if self.untied:
            return (tuple(f"m{l + 1}" for l in range(self.L))
                    + tuple(f"q{l + 1}" for l in range(self.L)))
        es = ("e",) if self.r == 1 else tuple(f"e{a + 1}" for a in range(self.r))
        return ("m",) + es + (() if self.spherical else ("q",))

    @property
    def parameter_names(self) -> tuple[str, ...]:
        return tuple(self.parameters)

    def canonical(self) -> dict:
        """A JSON-able description that determines every derived formula (for hashing)."""
        return {
            "name": self.name, "L": self.L,
            "parameters": {k: str(v) for k, v in self.parameters.items()},
            "teacher": sp.srepr(self.teacher), "student": sp.srepr(self.student),
            "C": [[str(c) for c in row] for row in self.C],
            "loss": self.loss, "noise": str(self.noise), "spherical": self.spherical,
        } | ({"weights": "untied"} if self.untied else {}) | (
            {"batch": self.batch} if self.batch != 1 else {}) | (
            {"directions": [self.teacher_directions, self.student_directions],
             "P": [[str(c) for c in row] for row in self.teacher_overlaps]}
            if self.multi else {}) | ({} if self.diffusion else {"diffusion": False})

    def schedule_factor(self, params: dict | None = None):
        """The schedule as a NumPy function t -> f(t) (broadcasting over arrays of t) at the
        parameter values `params` (defaults: the spec's), or None without a schedule. The
        learning rate at time t = steps / d is eta f(t) (MATH.md section 9)."""
        if self.schedule is None:
            return None
        values = {k: float(v) for k, v in self.parameters.items()}
        values.update({k: float(v) for k, v in (params or {}).items() if k in values})
        expr = self.schedule.subs({sp.Symbol(k, real=True): v for k, v in values.items()})
        fn = sp.lambdify(T_SYM, expr, modules="numpy")
        return lambda t: np.broadcast_to(np.asarray(fn(np.asarray(t, dtype=float)),
                                                    dtype=float), np.shape(t))

    def hash(self, salt: str = "") -> str:
        """sha256 of the canonical description plus `salt` (the tool version)."""
        text = json.dumps(self.canonical(), sort_keys=True) + "\n" + salt
        return hashlib.sha256(text.encode()).hexdigest()

    def where(self, key: str) -> str:
        return f"{self.source}: {key}" if self.source else key

    def with_length(self, L: int) -> "ModelSpec":
        """The same model at sequence length L: the link strings are parsed again with L
        tokens (they may use z, tsum and L, e.g. "tsum(He(2, z)) / sqrt(2 * L)"); the name gets
        the suffix _L<L>. SpecError when a link names a token beyond L or C has L rows."""
        if self.raw is None:
            raise SpecError(f"{self.where('L')}: spec '{self.name}' was not built from link "
                            f"strings, so it cannot be re-instantiated at another L")
        if L == self.L:
            return self
        if self.C:
            raise SpecError(f"{self.where('student.positional')}: the positional matrix has "
                            f"L = {self.L} rows; it does not define the model at L = {L}")
        data = json.loads(json.dumps(self.raw))
        data["L"], data["name"] = L, f"{self.name}_L{L}"
        return spec_from_dict(data, source=f"{self.source or self.name} at L = {L}")

    def untied_student(self) -> "ModelSpec":
        """The same teacher and student link with one weight vector per token (MATH.md
        section 6), named <name>_untied; SpecError if the spec has a positional encoding."""
        if self.untied:
            return self
        if self.multi:
            raise SpecError(f"{self.where('student.weights')}: untied students with several "
                            f"directions are not supported yet")
        if self.C:
            raise SpecError(f"{self.where('student.positional')}: an untied student takes no "
                            f"positional encoding")
        raw = None
        if self.raw is not None:
            raw = json.loads(json.dumps(self.raw))
            raw.setdefault("student", {})["weights"] = "untied"
            raw["name"] = f"{self.name}_untied"
        return dataclasses.replace(self, name=f"{self.name}_untied", untied=True, raw=raw)


def _table(data, key, where):
    val = data.get(key, {})
    if not isinstance(val, dict):
        raise SpecError(f"{where}: [{key}] must be a table, got {val!r}")
    return val


def spec_from_dict(data: dict, source: str | None = None) -> ModelSpec:
    """Build and validate a ModelSpec from the TOML layout of issue 2 (a parsed dict)."""
    src = f"{source}: " if source else ""
    if not isinstance(data, dict):
        raise SpecError(f"{src}spec must be a table")
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise SpecError(f"{src}name: expected an identifier (letters, digits, _), got {name!r}")
    L = data.get("L")
    if isinstance(L, bool) or not isinstance(L, int) or not 1 <= L <= 64:
        raise SpecError(f"{src}L: expected an integer sequence length 1..64, got {L!r}")

    params_raw = _table(data, "parameters", src + "parameters")
    parameters = {}
    for k, v in params_raw.items():
        if (not _NAME.match(k) or k in RESERVED or _TOKEN.match(k) or re.match(r"^e\d+$", k)
                or _MULTI_OVERLAP.match(k)):
            raise SpecError(f"{src}parameters.{k}: '{k}' is not allowed as a parameter name "
                            f"(reserved: {_nice_list(RESERVED)}, z1.., e1.., z1_1, m1_1, e1_1, "
                            f"q1_2, ..)")
        parameters[k] = to_rational(v, f"{src}parameters.{k}")

    teacher_t = data.get("teacher")
    if not isinstance(teacher_t, dict) or "link" not in teacher_t:
        raise SpecError(f"{src}teacher.link: missing (every spec needs [teacher] link = \"...\")")
    student_t = _table(data, "student", src + "student")
    Ks = _directions(teacher_t, f"{src}teacher.directions")
    K = _directions(student_t, f"{src}student.directions")
    multi = K > 1 or Ks > 1
    P = _teacher_overlaps(teacher_t, Ks, f"{src}teacher.overlaps")
    teacher = parse_link(teacher_t["link"], L, parameters, f"{src}teacher.link",
                         Ks if multi else None)
    if "link" in student_t:
        student = parse_link(student_t["link"], L, parameters, f"{src}student.link",
                             K if multi else None)
    elif Ks > K:
        raise SpecError(f"{src}student.link: missing; the teacher's link has K* = {Ks} "
                        f"directions and the student K = {K}, so the student needs its own link")
    else:
        student = teacher
    if link_shape(teacher) != link_shape(student):
        raise SpecError(f"{src}student.link: shape {link_shape(student) or 'scalar'} does not "
                        f"match the teacher's {link_shape(teacher) or 'scalar'}")

    from .integrability import check_link
    for role, link, table in (("teacher", teacher, teacher_t), ("student", student, student_t)):
        key = f"{src}{role}.link" if role == "teacher" or "link" in student_t else \
            f"{src}teacher.link (the student's link)"
        text = (table.get("link") if "link" in table else teacher_t["link"])
        zs = (link_variables(L, Ks if role == "teacher" else K) if multi
              else token_symbols(L))
        for entry in link_entries(link):
            check_link(entry, zs, parameters, key, str(text), student=role == "student")

    C = ()
    if "positional" in student_t:
        pos = student_t["positional"]
        where = f"{src}student.positional"
        if not isinstance(pos, list) or len(pos) != L:
            raise SpecError(f"{where}: expected an L x r list of lists with L = {L} rows, "
                            f"got {pos!r}")
        if not all(isinstance(row, list) for row in pos):
            raise SpecError(f"{where}: every row must be a list of r numbers, got {pos!r}")
        r = len(pos[0])
        if r == 0 or any(len(row) != r for row in pos):
            raise SpecError(f"{where}: rows must all have the same length r >= 1, got lengths "
                            f"{[len(row) for row in pos]}")
        C = tuple(tuple(to_rational(c, f"{where}[{l}][{a}]") for a, c in enumerate(row))
                  for l, row in enumerate(pos))

    weights = student_t.get("weights", "tied")
    if weights not in ("tied", "untied"):
        raise SpecError(f"{src}student.weights: expected \"tied\" or \"untied\", got {weights!r}")
    if weights == "untied" and multi:
        raise SpecError(f"{src}student.weights: untied students with several directions are not "
                        f"supported yet (directions = {K}, teacher directions = {Ks})")
    if weights == "untied" and C:
        raise SpecError(f"{src}student.positional: an untied student takes no positional "
                        f"encoding (each token has its own weights already)")

    loss_t = _table(data, "loss", src + "loss")
    kind = loss_t.get("kind", "square")
    if kind not in LOSS_KINDS:
        raise SpecError(f"{src}loss.kind: unknown loss '{kind}' (known: {', '.join(LOSS_KINDS)})")
    noise = to_rational(loss_t.get("noise", 0.0), f"{src}loss.noise")
    if noise < 0:
        raise SpecError(f"{src}loss.noise: the label-noise variance must be >= 0, got {noise}")

    training = _table(data, "training", src + "training")
    unknown = sorted(set(training) - TRAINING_KEYS)
    if unknown:
        raise SpecError(f"{src}training.{unknown[0]}: unknown key (known: "
                        f"{', '.join(sorted(TRAINING_KEYS))})")
    spherical = training.get("spherical", True)
    if not isinstance(spherical, bool):
        raise SpecError(f"{src}training.spherical: expected true or false, got {spherical!r}")
    batch = training.get("batch", 1)
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= 10 ** 6:
        raise SpecError(f"{src}training.batch: expected an integer number of sequences per "
                        f"step >= 1, got {batch!r}")
    derivation = _table(data, "derivation", src + "derivation")
    unknown = sorted(set(derivation) - {"diffusion"})
    if unknown:
        raise SpecError(f"{src}derivation.{unknown[0]}: unknown key (known: diffusion)")
    diffusion = derivation.get("diffusion", True)
    if not isinstance(diffusion, bool):
        raise SpecError(f"{src}derivation.diffusion: expected true or false, got {diffusion!r}")
    if batch != 1 and multi:
        raise SpecError(f"{src}training.batch: mini-batches with several directions are not "
                        f"supported yet (their O(1/d) cross terms are not derived); use batch = 1")
    schedule = None
    if "schedule" in training:
        schedule = parse_schedule(training["schedule"], parameters, f"{src}training.schedule")

    return ModelSpec(name=name, L=L, teacher=teacher, student=student, C=C,
                     parameters=parameters, loss=kind, noise=noise, spherical=spherical,
                     source=source, untied=weights == "untied", batch=batch, schedule=schedule,
                     teacher_directions=Ks, student_directions=K, P=P, diffusion=diffusion,
                     raw=_raw_copy(data))


def _directions(table: dict, where: str) -> int:
    """The `directions` key of [teacher] or [student] (default 1)."""
    K = table.get("directions", 1)
    if isinstance(K, bool) or not isinstance(K, int) or not 1 <= K <= MAX_DIRECTIONS:
        raise SpecError(f"{where}: expected an integer number of directions 1..{MAX_DIRECTIONS}, "
                        f"got {K!r}")
    return K


def _teacher_overlaps(table: dict, Ks: int, where: str) -> tuple:
    """The [teacher] overlaps matrix P (K* x K*, symmetric, unit diagonal since |w*_j|^2 = d,
    positive definite), or () for the identity."""
    if "overlaps" not in table:
        return ()
    raw = table["overlaps"]
    if (not isinstance(raw, list) or len(raw) != Ks
            or not all(isinstance(row, list) and len(row) == Ks for row in raw)):
        raise SpecError(f"{where}: expected a K* x K* list of lists with K* = {Ks} "
                        f"(teacher directions), got {raw!r}")
    P = tuple(tuple(to_rational(c, f"{where}[{i}][{j}]") for j, c in enumerate(row))
              for i, row in enumerate(raw))
    for i in range(Ks):
        if P[i][i] != 1:
            raise SpecError(f"{where}[{i}][{i}]: the teacher directions have |w*_j|^2 = d, so "
                            f"the diagonal of P is 1, got {P[i][i]}")
        for j in range(i):
            if P[i][j] != P[j][i]:
                raise SpecError(f"{where}: P is not symmetric (P[{i}][{j}] = {P[i][j]}, "
                                f"P[{j}][{i}] = {P[j][i]})")
    if not sp.Matrix(P).is_positive_definite:
        raise SpecError(f"{where}: P = {[[str(c) for c in row] for row in P]} is not positive "
                        f"definite (it must be the Gram matrix of independent directions)")
    if all(P[i][j] == int(i == j) for i in range(Ks) for j in range(Ks)):
        return ()
    return P


def _raw_copy(data: dict) -> dict | None:
    """A deep copy of the spec's TOML data when it holds only link strings (re-parseable)."""
    try:
        return json.loads(json.dumps(data))
    except TypeError:  # SymPy objects given directly (Python form)
        return None


def load_spec(path) -> ModelSpec:
    """Read and validate a TOML model spec (errors name the file and the key)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"{path}: cannot read spec: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: malformed TOML: {exc}") from None
    return spec_from_dict(data, source=str(path))


def make_spec(name: str, L: int, teacher, student=None, positional=None, parameters=None,
              noise: float = 0.0, spherical: bool = True, weights: str = "tied", batch: int = 1,
              schedule: str | None = None, teacher_directions: int = 1,
              student_directions: int = 1, teacher_overlaps=None) -> ModelSpec:
    """Python form of a spec, with the same validation as the TOML form.

    >>> make_spec("phase_retrieval", 1, "z1**2")  # doctest: +ELLIPSIS
    ModelSpec(name='phase_retrieval', L=1, ...)
    """
    data = {"name": name, "L": L, "parameters": dict(parameters or {}),
            "teacher": {"link": teacher}, "student": {},
            "loss": {"kind": "square", "noise": noise}, "training": {"spherical": spherical}}
    if student is not None:
        data["student"]["link"] = student
    if positional is not None:
        data["student"]["positional"] = positional
    if weights != "tied":
        data["student"]["weights"] = weights
    if batch != 1:
        data["training"]["batch"] = batch
    if schedule is not None:
        data["training"]["schedule"] = schedule
    if teacher_directions != 1:
        data["teacher"]["directions"] = teacher_directions
    if teacher_overlaps is not None:
        data["teacher"]["overlaps"] = teacher_overlaps
    if student_directions != 1:
        data["student"]["directions"] = student_directions
    return spec_from_dict(data)
