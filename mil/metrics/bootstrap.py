"""Percentile bootstrap confidence intervals for metrics of paired arrays."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np


def bootstrap_ci(
    metric: Callable[..., dict[str, float]],
    *arrays: np.ndarray,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap CIs of every value of ``metric(*arrays) -> {name: value}``.

    Rows are resampled with replacement; with ``groups`` (e.g. patient ids)
    whole groups are resampled, so that a patient's slides stay together.
    Resamples where a metric is undefined (NaN or ValueError, e.g. a single
    class drawn) are dropped for that metric; (nan, nan) if all are.
    """
    rng = np.random.default_rng(seed)
    arrays = tuple(np.asarray(a) for a in arrays)
    n = len(arrays[0])
    if groups is None:
        members = [np.array([i]) for i in range(n)]
    else:
        _, inverse = np.unique(np.asarray(groups), return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        members = np.split(order, np.flatnonzero(np.diff(inverse[order])) + 1)
    stats: dict[str, list[float]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate resamples warn in scikit-learn
        for _ in range(n_boot):
            pick = rng.integers(0, len(members), len(members))
            idx = np.concatenate([members[i] for i in pick])
            try:
                values = metric(*(a[idx] for a in arrays))
            except ValueError:
                continue
            for k, v in values.items():
                if isinstance(v, float) and np.isfinite(v):
                    stats.setdefault(k, []).append(v)
    alpha = (1.0 - level) / 2.0
    return {k: tuple(float(q) for q in np.quantile(v, [alpha, 1.0 - alpha])) for k, v in stats.items()}
