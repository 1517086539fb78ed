"""Percentile bootstrap confidence intervals for any metric of paired arrays."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def bootstrap_ci(
    metric: Callable[..., float],
    *arrays: np.ndarray,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``metric(*arrays)``, resampling rows with replacement.

    With ``groups`` (e.g. patient ids) whole groups are resampled, so that a
    patient's slides stay together. Resamples where the metric is undefined
    (NaN, e.g. one class only) are dropped; returns (nan, nan) if all are.
    """
    rng = np.random.default_rng(seed)
    arrays = tuple(np.asarray(a) for a in arrays)
    n = len(arrays[0])
    if groups is None:
        members = [np.array([i]) for i in range(n)]
    else:
        _, inverse = np.unique(np.asarray(groups), return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.flatnonzero(np.diff(inverse[order])) + 1
        members = np.split(order, bounds)
    stats = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(members), len(members))
        idx = np.concatenate([members[i] for i in pick])
        try:
            value = metric(*(a[idx] for a in arrays))
        except ValueError:
            continue
        if np.isfinite(value):
            stats.append(value)
    if not stats:
        return float("nan"), float("nan")
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(lo), float(hi)
