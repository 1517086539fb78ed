"""Numbers as every table writes them: ``0.812 [0.771, 0.850]`` for a value with its 95% CI,
``+0.021 [+0.002, +0.040]`` for a difference, ``0.034`` or ``< 0.001`` for a p-value, and
:data:`MISSING` for a value that is undefined (None, NaN)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

#: what a table writes where a number is undefined (None, NaN, ±inf)
MISSING = "–"
#: p-values below this are written ``< 0.001``
P_FLOOR = 0.001


def finite(x: Any) -> float | None:
    """``x`` as a float, or None where it is None, NaN, infinite or not a number."""
    if x is None or isinstance(x, (bool, str)):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def number(x: Any, digits: int = 3, signed: bool = False) -> str:
    """``x`` with ``digits`` decimals (``signed``: always with its sign, for a difference);
    never ``-0.000``; :data:`MISSING` where undefined."""
    v = finite(x)
    if v is None:
        return MISSING
    v = round(v, digits) + 0.0  # -0.0 -> 0.0
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def interval(ci: Sequence[Any] | None, digits: int = 3, signed: bool = False) -> str:
    """A 95% CI ``(lo, hi)`` as ``[lo, hi]``; ``""`` where it is absent or a bound undefined."""
    if ci is None or len(ci) < 2 or finite(ci[0]) is None or finite(ci[1]) is None:
        return ""
    return f"[{number(ci[0], digits, signed)}, {number(ci[1], digits, signed)}]"


def value_ci(
    value: Any, ci: Sequence[Any] | None = None, digits: int = 3, signed: bool = False
) -> str:
    """A value with its 95% CI: ``0.812 [0.771, 0.850]`` (``signed``, for a difference:
    ``+0.021 [+0.002, +0.040]``); the value alone where the CI is undefined, :data:`MISSING`
    where the value is."""
    v = number(value, digits, signed)
    ci_s = interval(ci, digits, signed) if v != MISSING else ""
    return f"{v} {ci_s}" if ci_s else v


def mean_sd(mean: Any, sd: Any, digits: int = 3) -> str:
    """``0.812 ± 0.031`` (mean ± sd over folds); the mean alone where the sd is undefined
    (one fold), :data:`MISSING` where the mean is."""
    m = number(mean, digits)
    if m == MISSING or finite(sd) is None:
        return m
    return f"{m} ± {number(sd, digits)}"


def p_value(p: Any) -> str:
    """A p-value for a table cell: two significant digits (``0.034``, ``0.5``), ``< 0.001``
    below that, :data:`MISSING` where undefined."""
    v = finite(p)
    if v is None:
        return MISSING
    return f"< {P_FLOOR:g}" if v < P_FLOOR else f"{v:.2g}"


def p_phrase(p: Any) -> str:
    """A p-value in a sentence: ``p = 0.034``, ``p < 0.001``, ``p = –`` where undefined."""
    s = p_value(p)
    return f"p {s}" if s.startswith("<") else f"p = {s}"
