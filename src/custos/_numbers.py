"""Numbers that come from users: finite, typed, in range.

NaN compares false with everything and infinity passes every "<=", so a NaN
leeway or an infinite max age silently turns a time check off.  Every number a
user can set (a pinned clock, a leeway, a max age, a TTL) goes through
:func:`finite_number` or :func:`seconds`, which refuse them.
"""

from __future__ import annotations

import math
from datetime import timedelta

from custos.errors import CustosError


class InvalidNumberError(CustosError, ValueError):
    """A user-supplied number is not finite, not a number, or out of range."""

    code = "invalid_number"


def finite_number(
    value: object, *, name: str, minimum: float | None = None, maximum: float | None = None
) -> float:
    """Return *value* as a finite float, or raise :class:`InvalidNumberError`.

    ``bool`` is refused (``True`` is an ``int`` in Python, never a duration).
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidNumberError(f"{name} must be a number, not {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        raise InvalidNumberError(f"{name} is out of range") from None
    if not math.isfinite(number):
        raise InvalidNumberError(f"{name} must be finite, not {number!r}")
    if minimum is not None and number < minimum:
        raise InvalidNumberError(f"{name} must be at least {minimum:g}, not {number:g}")
    if maximum is not None and number > maximum:
        raise InvalidNumberError(f"{name} must be at most {maximum:g}, not {number:g}")
    return number


def seconds(
    value: object,
    *,
    name: str,
    minimum: float | None = 0.0,
    maximum: float | None = None,
) -> float:
    """A duration given as seconds (int / float) or a :class:`datetime.timedelta`."""
    if isinstance(value, timedelta):
        value = value.total_seconds()
    return finite_number(value, name=name, minimum=minimum, maximum=maximum)


__all__ = ["InvalidNumberError", "finite_number", "seconds"]
