"""Percentile bootstrap confidence intervals for metrics of paired arrays."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np


def bootstrap_samples(
    metric: Callable[..., dict[str, float]],
    *arrays: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The values of ``metric(*arrays) -> {name: value}`` over ``n_boot`` bootstrap resamples.

    Rows are resampled with replacement; with ``groups`` (e.g. patient ids)
    whole groups are resampled, so that a patient's slides stay together.
    Resamples where a metric is undefined (NaN or ValueError, e.g. a single
    class drawn) are dropped for that metric.
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
    return {k: np.asarray(v, dtype=float) for k, v in stats.items()}


def bootstrap_ci(
    metric: Callable[..., dict[str, float]],
    *arrays: np.ndarray,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap CIs of every value of ``metric(*arrays) -> {name: value}``.

    Resampling as in :func:`bootstrap_samples` (whole ``groups`` when given);
    a metric undefined in every resample is left out.
    """
    alpha = (1.0 - level) / 2.0
    samples = bootstrap_samples(metric, *arrays, n_boot=n_boot, seed=seed, groups=groups)
    return {
        k: tuple(float(q) for q in np.quantile(v, [alpha, 1.0 - alpha])) for k, v in samples.items()
    }


def paired_difference(
    metric: Callable[[np.ndarray], float],
    n: int,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> dict[str, float]:
    """A paired bootstrap of a difference between two predictors scored on the same rows.

    ``metric(rows)`` is the difference (e.g. model A's AUC minus model B's)
    on the rows ``rows`` of ``range(n)``; both predictors are resampled
    together (whole ``groups``, e.g. patients). Returns ``delta`` (on all
    rows), the percentile CI ``ci_low``/``ci_high`` and a two-sided ``p``:
    twice the smaller share of resampled differences on either side of 0
    (counted as ``(1 + k) / (1 + resamples)``, so never 0), about the level
    at which the percentile CI would just touch 0; 1.0 when the two never
    differ. ``n_resamples`` counts the usable resamples.
    """
    delta = float(metric(np.arange(n)))
    d = bootstrap_samples(
        lambda rows: {"d": float(metric(rows))},
        np.arange(n),
        n_boot=n_boot,
        seed=seed,
        groups=groups,
    ).get("d", np.array([]))
    return _difference(delta, d, level)


def _difference(delta: float, d: np.ndarray, level: float) -> dict[str, float]:
    """``delta``, the percentile CI of its resampled values ``d`` and the two-sided ``p`` of
    :func:`paired_difference` (NaN without resamples)."""
    if len(d) == 0:
        nan = float("nan")
        return {"delta": delta, "ci_low": nan, "ci_high": nan, "p": nan, "n_resamples": 0}
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(d, [alpha, 1.0 - alpha])
    m = len(d)
    p = min(1.0, 2.0 * (1 + min(int((d <= 0).sum()), int((d >= 0).sum()))) / (1 + m))
    return {"delta": delta, "ci_low": float(lo), "ci_high": float(hi), "p": p, "n_resamples": m}


def unpaired_difference(
    metric_a: Callable[[np.ndarray], dict[str, float]],
    n_a: int,
    metric_b: Callable[[np.ndarray], dict[str, float]],
    n_b: int,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    groups_a: np.ndarray | None = None,
    groups_b: np.ndarray | None = None,
) -> dict[str, dict[str, float]]:
    """A bootstrap of differences between metrics of two independent samples (A minus B).

    ``metric_a(rows) -> {name: value}`` on rows of ``range(n_a)`` (likewise B),
    e.g. an external cohort's AUC and a run's internal one: different
    patients, so each sample is resampled on its own (whole ``groups_a`` /
    ``groups_b``), with independent streams, and the i-th usable resample of
    A is paired with the i-th of B. Per name both define: ``delta`` (on all
    rows), ``ci_low``/``ci_high`` (percentile) and ``p`` as in
    :func:`paired_difference`, and ``n_resamples``.
    """
    point_a, point_b = metric_a(np.arange(n_a)), metric_b(np.arange(n_b))
    draws_a = bootstrap_samples(metric_a, np.arange(n_a), n_boot=n_boot, seed=seed, groups=groups_a)
    draws_b = bootstrap_samples(
        metric_b, np.arange(n_b), n_boot=n_boot, seed=seed + 1, groups=groups_b
    )
    out: dict[str, dict[str, float]] = {}
    for k in [k for k in point_a if k in point_b]:
        m = min(len(draws_a.get(k, ())), len(draws_b.get(k, ())))
        d = draws_a[k][:m] - draws_b[k][:m] if m else np.array([])
        out[k] = _difference(float(point_a[k]) - float(point_b[k]), d, level)
    return out
