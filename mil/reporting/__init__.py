"""How every table and report writes numbers (:mod:`.numbers`: a value with its 95% CI, a
p-value, a missing value) and which metric keys are scores (:mod:`.names`)."""

from __future__ import annotations

from mil.reporting.names import (
    COUNTS,
    HORIZON_SUFFIX,
    P_VALUE_SUFFIX,
    SETTINGS,
    TIMINGS,
    gets_ci,
    is_horizon,
    is_p_value,
    is_timing,
    kind,
    metric_label,
)
from mil.reporting.numbers import (
    MISSING,
    finite,
    interval,
    mean_sd,
    number,
    p_phrase,
    p_value,
    value_ci,
)

__all__ = [
    "COUNTS",
    "HORIZON_SUFFIX",
    "MISSING",
    "P_VALUE_SUFFIX",
    "SETTINGS",
    "TIMINGS",
    "finite",
    "gets_ci",
    "interval",
    "is_horizon",
    "is_p_value",
    "is_timing",
    "kind",
    "metric_label",
    "mean_sd",
    "number",
    "p_phrase",
    "p_value",
    "value_ci",
]
