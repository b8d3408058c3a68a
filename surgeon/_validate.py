"""Argument checks shared by the detectors, the controller and the callback: one message format."""

import math
import numbers
import sys
from typing import Any

_LARGEST = sys.float_info.max


def plain_int(value: Any) -> Any:
    """``value`` as a Python ``int`` when it is another integer type (``numpy.int64``, a
    length computed with numpy), else unchanged: what is stored must save as JSON."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool | int):
        return int(value)
    return value


MAX_COUNT = 2**53
"""The largest count (steps, a window, a patience) taken: every int up to it is exact as a float,
which the plans and detectors compute in; a larger one names its field instead of overflowing."""


def check_positive_int(name: str, value: int, *, allow_zero: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is an int > 0 (or >= 0 with ``allow_zero``), at
    most :data:`MAX_COUNT`."""
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        bound = ">= 0" if allow_zero else ">= 1"
        raise ValueError(f"{name} must be an integer {bound}, got {name}={value!r}")
    if value > MAX_COUNT:
        raise ValueError(f"{name} must be at most 2**53, got {name}={value!r:.80}")


def check_in_range(
    name: str, value: float, low: float, high: float, *, low_open: bool, high_open: bool
) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number inside the interval."""
    ok = (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and abs(value) <= _LARGEST  # also an int too large for a float
        and math.isfinite(value)
        and (value > low if low_open else value >= low)
        and (value < high if high_open else value <= high)
    )
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a finite number in {interval}, got {name}={value!r}")
