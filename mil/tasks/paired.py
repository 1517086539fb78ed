"""Two predictors of the same bags, compared on a task's metric: a paired patient bootstrap."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from mil.errors import DataError
from mil.metrics import paired_difference
from mil.tasks.base import Task

#: out-of-fold rows are matched by the fold that made them and the bag
PAIR_KEY = ("fold_dir", "bag_id")


def paired_metric_difference(
    task: Task,
    pred: pd.DataFrame,
    ref: pd.DataFrame,
    metric: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    key: Sequence[str] = PAIR_KEY,
    names: tuple[str, str] = ("the predictions", "the reference's"),
    hint: str = "",
) -> dict[str, Any]:
    """``metric`` (default: the task's headline) of ``pred`` minus that of ``ref``, rows matched
    by ``key``; both resampled together, whole patients at a time
    (:func:`mil.metrics.paired_difference`). Returns ``metric``, ``value``, ``reference_value``,
    ``delta``, ``ci_low``, ``ci_high``, ``p``. Rows of other bags or other outcomes are a
    :class:`DataError` (``names`` name the two sides in it, ``hint`` ends it)."""
    metric = metric or task.headline()
    key = list(key)
    a, b = pred.sort_values(key, ignore_index=True), ref.sort_values(key, ignore_index=True)
    outcome = [c for c in task.outcome_columns if c in b.columns]
    if not a[key].equals(b[key]) or not a[outcome].equals(b[outcome]):
        raise DataError(
            f"{names[0]} are not on the same folds and bags (with the same outcomes) as "
            f"{names[1]}, so the two cannot be compared pairwise{hint}"
        )

    def score(frame: pd.DataFrame) -> float:
        return task.metric_value(frame, metric)

    d = paired_difference(
        lambda r: score(a.iloc[r]) - score(b.iloc[r]),
        len(b),
        n_boot=n_boot,
        seed=seed,
        groups=b["patient_id"].astype(str).to_numpy(),
    )
    return {
        "metric": metric,
        "value": score(a),
        "reference_value": score(b),
        "delta": d["delta"],
        "ci_low": d["ci_low"],
        "ci_high": d["ci_high"],
        "p": d["p"],
    }
