"""Model specs: the sequence single-index model of MATH.md section 1, from TOML or Python.

A spec fixes the sequence length L, the teacher link g*, the student link g (SymPy expressions in
the token projections z1..zL and the parameters), the positional coefficients C (L x r), the loss
and the training (spherical or plain SGD). Every validation error is raised here, as a
:class:`~ssi_symbolic.errors.SpecError` whose one-line message names the file, the key and the
offending symbol or value.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import sympy as sp
from sympy.core.function import AppliedUndef
from sympy.parsing.sympy_parser import parse_expr, rationalize, standard_transformations

from .errors import SpecError
from .links import VOCABULARY

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TOKEN = re.compile(r"^z(\d+)$")
#: Names a parameter may not take: overlaps, projections, learning rate, dimension.
RESERVED = {"m", "q", "e", "z", "eta", "d", "t", "Delta"} | set(VOCABULARY)
LOSS_KINDS = ("square",)
_TRANSFORMS = standard_transformations + (rationalize,)


def token_symbols(L: int) -> tuple[sp.Symbol, ...]:
    """The student token projections z1..zL (the variables of a link expression)."""
    return tuple(sp.Symbol(f"z{l + 1}", real=True) for l in range(L))


def to_rational(x, where: str) -> sp.Rational:
    """An exact rational from a TOML number (0.1 -> 1/10), or a SpecError naming `where`."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise SpecError(f"{where}: expected a number, got {x!r}")
    if not math.isfinite(x):
        raise SpecError(f"{where}: expected a finite number, got {x!r}")
    return sp.Rational(repr(x)) if isinstance(x, float) else sp.Integer(x)


def _nice_list(names):
    return ", ".join(sorted(names))


def parse_link(text, L: int, parameters, where: str):
    """Parse a link string into a SymPy scalar or Matrix in z1..zL and the parameters.

    Raises SpecError for syntax errors, unknown names or functions, token indices beyond L,
    and free symbols that are neither tokens nor parameters.
    """
    if isinstance(text, (sp.Basic, sp.MatrixBase)):
        expr = text
    else:
        if not isinstance(text, str) or not text.strip():
            raise SpecError(f"{where}: expected a link expression string, got {text!r}")
        if "__" in text or "lambda" in text:
            raise SpecError(f"{where}: '{text}' is not a link expression")
        zs = token_symbols(L)
        local = dict(VOCABULARY)
        local.update({str(s): s for s in zs})
        local["z"] = sp.Matrix(zs)
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
    allowed = {str(s) for s in token_symbols(L)} | set(parameters)
    for item in items:
        undef = sorted({type(f).__name__ for f in item.atoms(AppliedUndef)})
        if undef:
            raise SpecError(f"{where}: unknown function '{undef[0]}' in '{text}' "
                            f"(known: {_nice_list(VOCABULARY)})")
        for s in sorted(item.free_symbols, key=str):
            name = str(s)
            if name in allowed:
                continue
            mt = _TOKEN.match(name)
            if mt:
                raise SpecError(f"{where}: '{name}' refers to token {mt.group(1)} but L = {L}")
            raise SpecError(f"{where}: unknown name '{name}' in '{text}' "
                            f"(tokens z1..z{L}, z; parameters: {_nice_list(parameters) or 'none'})")
    if isinstance(expr, sp.MatrixBase) and expr.shape == (1, 1):
        expr = expr[0, 0]
    return expr


def link_shape(expr) -> tuple[int, ...]:
    """() for a scalar link, (rows, cols) for a matrix or vector."""
    return tuple(expr.shape) if isinstance(expr, sp.MatrixBase) else ()


def link_entries(expr) -> list:
    """The entries of a link, flattened row by row (one entry for a scalar link)."""
    return list(expr) if isinstance(expr, sp.MatrixBase) else [expr]


@dataclass(frozen=True)
class ModelSpec:
    """A sequence single-index model (MATH.md section 1).

    teacher, student: SymPy scalar or Matrix in z1..zL and the parameters (the teacher's are
    evaluated at the teacher projections z*_l, the student's at z_l). C: L x r positional
    coefficients (r = 0 for no encoding). noise: label-noise variance Delta. spherical: spherical
    (True) or plain (False) online SGD.
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
        """State variables in order: m, then e (r = 1) or e1..er, then q for plain SGD."""
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
        }

    def hash(self, salt: str = "") -> str:
        """sha256 of the canonical description plus `salt` (the tool version)."""
        text = json.dumps(self.canonical(), sort_keys=True) + "\n" + salt
        return hashlib.sha256(text.encode()).hexdigest()

    def where(self, key: str) -> str:
        return f"{self.source}: {key}" if self.source else key


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
        if not _NAME.match(k) or k in RESERVED or _TOKEN.match(k) or re.match(r"^e\d+$", k):
            raise SpecError(f"{src}parameters.{k}: '{k}' is not allowed as a parameter name "
                            f"(reserved: {_nice_list(RESERVED)}, z1.., e1..)")
        parameters[k] = to_rational(v, f"{src}parameters.{k}")

    teacher_t = data.get("teacher")
    if not isinstance(teacher_t, dict) or "link" not in teacher_t:
        raise SpecError(f"{src}teacher.link: missing (every spec needs [teacher] link = \"...\")")
    teacher = parse_link(teacher_t["link"], L, parameters, f"{src}teacher.link")
    student_t = _table(data, "student", src + "student")
    if "link" in student_t:
        student = parse_link(student_t["link"], L, parameters, f"{src}student.link")
    else:
        student = teacher
    if link_shape(teacher) != link_shape(student):
        raise SpecError(f"{src}student.link: shape {link_shape(student) or 'scalar'} does not "
                        f"match the teacher's {link_shape(teacher) or 'scalar'}")

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

    loss_t = _table(data, "loss", src + "loss")
    kind = loss_t.get("kind", "square")
    if kind not in LOSS_KINDS:
        raise SpecError(f"{src}loss.kind: unknown loss '{kind}' (known: {', '.join(LOSS_KINDS)})")
    noise = to_rational(loss_t.get("noise", 0.0), f"{src}loss.noise")
    if noise < 0:
        raise SpecError(f"{src}loss.noise: the label-noise variance must be >= 0, got {noise}")

    training = _table(data, "training", src + "training")
    spherical = training.get("spherical", True)
    if not isinstance(spherical, bool):
        raise SpecError(f"{src}training.spherical: expected true or false, got {spherical!r}")

    return ModelSpec(name=name, L=L, teacher=teacher, student=student, C=C,
                     parameters=parameters, loss=kind, noise=noise, spherical=spherical,
                     source=source)


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
              noise: float = 0.0, spherical: bool = True) -> ModelSpec:
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
    return spec_from_dict(data)
