"""Metrics per site and subgroup of pooled out-of-fold predictions, and a permutation test
of whether a group column changes the headline metric.

``task`` is any :class:`~mil.tasks.base.Task` (its pooled metrics, CIs,
outcome counts and strata).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd


def subgroup_metrics(task, pred: pd.DataFrame, cols: list[str], n_boot: int = 1000) -> pd.DataFrame:
    """Pooled out-of-fold metrics with bootstrap 95% CIs (patients resampled), for all
    bags (``column = value = "all"``) and for each value of each column in ``cols``.

    One row per group: ``column, value, n_bags, n_patients``, the task's outcome
    counts, then each metric with ``<metric>_ci_low`` / ``<metric>_ci_high``. A
    metric a group cannot define (one class only, no comparable pair) is NaN.
    """
    groups = [("all", "all", pred)]
    for col in cols:
        keys = pred[col].astype(str)
        groups += [(col, value, pred[keys == value]) for value in sorted(keys.unique())]
    rows = []
    for col, value, sub in groups:
        row: dict[str, Any] = {
            "column": col,
            "value": value,
            "n_bags": len(sub),
            "n_patients": int(sub["patient_id"].nunique()),
            **task.counts(sub),
        }
        ci = task.pooled_ci(sub, n_boot=n_boot)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a one-class group warns in scikit-learn
            point = task.pooled_metrics(sub)
        for k, v in point.items():
            lo, hi = ci.get(k, (float("nan"), float("nan")))
            row.update({k: float(v), f"{k}_ci_low": lo, f"{k}_ci_high": hi})
        rows.append(row)
    return pd.DataFrame(rows)


def group_difference_test(
    task, pred: pd.DataFrame, col: str, n_perm: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Permutation test of "the main metric is the same in every group of ``col``".

    Statistic: the range (largest minus smallest) of the pooled out-of-fold
    AUC (classification) or within-fold Harrell's C (survival) over the groups
    that define it. Null distribution: the group labels shuffled among
    patients (among bags if a patient's bags differ in ``col``) within each
    class (classification) or event status (survival), so every group keeps
    its outcome mix. p = (1 + #{permuted >= observed}) / (1 + n_perm).
    Returns ``column, metric, groups, range, p, n_perm`` (``range``/``p``
    None with fewer than two groups that define the metric).
    """
    metric = task.headline()
    keys = pred[col].astype(str).to_numpy()
    values = sorted(set(keys))

    def spread(labels: np.ndarray) -> tuple[float, int]:
        found = []
        for v in values:
            rows = np.flatnonzero(labels == v)
            if len(rows) == 0:
                continue
            x = task.metric_value(pred.iloc[rows], metric)  # NaN for a one-class group
            if np.isfinite(x):
                found.append(x)
        return (max(found) - min(found) if len(found) > 1 else float("nan")), len(found)

    observed, n_defined = spread(keys)
    out: dict[str, Any] = {"column": col, "metric": metric, "groups": n_defined, "n_perm": n_perm}
    if not np.isfinite(observed):
        return {**out, "range": None, "p": None}
    stratum = task.outcome_strata(pred)
    per_patient = pred.groupby("patient_id")[col].nunique().max() == 1
    unit = pred["patient_id"].astype(str).to_numpy() if per_patient else np.arange(len(pred))
    units, first, inverse = np.unique(unit, return_index=True, return_inverse=True)
    unit_group, unit_stratum = keys[first], stratum[first]
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(n_perm):
        shuffled = unit_group.copy()
        for s_ in np.unique(unit_stratum):
            idx = np.flatnonzero(unit_stratum == s_)
            shuffled[idx] = shuffled[rng.permutation(idx)]
        value, _ = spread(shuffled[inverse])
        hits += bool(np.isfinite(value) and value >= observed - 1e-12)
    return {**out, "range": float(observed), "p": (1 + hits) / (1 + n_perm)}
