"""Errors raised by ssi-symbolic; each names the file, key, symbol or value at fault."""


class SSIError(Exception):
    """Base class: a one-line, user-facing error message."""


class SpecError(SSIError, ValueError):
    """A model spec is malformed: bad TOML, unknown name, wrong shape, bad value."""


class StateError(SSIError, ValueError):
    """A numerical argument is out of range: a state outside the unit ball, eta <= 0, d < 1."""
