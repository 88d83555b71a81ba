"""matta's own exceptions.

Every error a user can cause is raised here, in the core, before any framework
call. Each one names the bad field and the values it allows, so that a wrong
argument never surfaces as a shape error deep inside PyTorch or Keras.
"""

from __future__ import annotations

import numbers
from typing import Any, Iterable

__all__ = [
    "MattaError",
    "SpecError",
    "GranularityError",
    "NestingError",
    "OptionError",
    "InputError",
    "InputTypeError",
    "BackendError",
    "NonFiniteLossError",
    "FormatError",
    "SaveError",
]


class MattaError(Exception):
    """Base class of every error matta raises on purpose."""


class SpecError(MattaError, ValueError):
    """A model spec field is invalid."""


class GranularityError(MattaError, ValueError):
    """A granularity does not fit the spec (rules G1–G4)."""


class NestingError(GranularityError):
    """Declared training granularities are not nested (spec rule N1)."""


class OptionError(MattaError, ValueError):
    """A loss or training option is invalid."""


class InputError(MattaError, ValueError):
    """An input array (x, y, teacher) has the wrong shape or value range."""


class InputTypeError(MattaError, TypeError):
    """An argument has the wrong type (or an input array the wrong dtype)."""


class BackendError(MattaError, ValueError):
    """An unknown backend name, or a backend that cannot be imported."""


class NonFiniteLossError(MattaError, FloatingPointError):
    """The training loss became NaN or infinite; weights are those of the last good step."""


class FormatError(MattaError, ValueError):
    """A saved folder is missing a file, or holds a damaged, hostile or inconsistent one (rule E6)."""


class SaveError(MattaError, OSError):
    """A save could not be made (a full disk, a target that is not a matta save); the old save is unchanged (rule E6)."""


def describe(values: Iterable[Any]) -> str:
    """Formats allowed values for an error message: ``'a', 'b' or 'c'``."""
    items = [repr(v) for v in values]
    assert items, "describe() needs at least one allowed value"
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " or " + items[-1]


def choice(field: str, value: Any, allowed: Iterable[Any], error: type[MattaError] = OptionError) -> Any:
    """Returns ``value`` if it is one of ``allowed``, else raises ``error`` naming ``field``."""
    allowed = tuple(allowed)
    if isinstance(value, str) and value in allowed:
        return value
    if not isinstance(value, str) and any(value is a or (type(value) is type(a) and value == a) for a in allowed):
        return value
    raise error(f"{field} must be {describe(allowed)}; got {value!r}")


def integer(field: str, value: Any, low: int, error: type[MattaError] = OptionError) -> int:
    """Returns ``value`` if it is an integer (numpy's too, never a bool) ``>= low``, else raises ``error`` naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise error(f"{field} must be an integer >= {low}; got {value!r}")
    return value
