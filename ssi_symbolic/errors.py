"""Errors raised by ssi-symbolic; each names the file, key, symbol or value at fault."""


class SSIError(Exception):
    """Base class: a one-line, user-facing error message."""


class SpecError(SSIError, ValueError):
    """A model spec is malformed: bad TOML, unknown name, wrong shape, bad value."""


class StateError(SSIError, ValueError):
    """A numerical argument is out of range: a state outside the unit ball, eta <= 0, d < 1."""


class QuadratureWarning(UserWarning):
    """A generated module's quadrature rules have node counts that no probe showed to meet
    its QUADRATURE_TOLERANCE (Model.derive; `ssi derive` prints the same as an `ssi: note:`)."""
