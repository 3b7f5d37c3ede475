"""One place that checks arguments: every bad count, size, rate or choice becomes the same named
``ArgumentError`` (also a ``ValueError``) with a message that says what was expected."""

from __future__ import annotations

import math
import numbers

from .errors import ArgumentError


def check_int(name: str, value, lo: int | None = None, hi: int | None = None, *, none: bool = False,
              error: type[Exception] = ArgumentError) -> int | None:
    """``value`` as a Python int within [lo, hi] (bools and floats refused; numpy ints accepted)."""
    if value is None and none:
        return None
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise error(f"{name} must be an int{_range(lo, hi)}, got {value!r}")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise error(f"{name} must be an int{_range(lo, hi)}, got {value!r}")
    return value


def check_number(name: str, value, lo: float | None = None, hi: float | None = None, *, none: bool = False,
                 error: type[Exception] = ArgumentError) -> float | None:
    """``value`` as a finite float within [lo, hi] (NaN and infinities refused, bools too)."""
    if value is None and none:
        return None
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise error(f"{name} must be a finite number{_range(lo, hi)}, got {value!r}")
    value = float(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise error(f"{name} must be a finite number{_range(lo, hi)}, got {value!r}")
    return value


def check_choice(name: str, value, choices, *, error: type[Exception] = ArgumentError):
    """``value`` if it is one of ``choices``."""
    if not isinstance(value, (str, int, type(None))) or value not in choices:
        raise error(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def _range(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f" in [{lo}, {hi}]"
    if lo is not None:
        return f" >= {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""
