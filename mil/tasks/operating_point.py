"""Binary classification's operating point: a decision threshold on P(positive) chosen on each
fold's validation predictions and applied unchanged to its test bags (``pred_op``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from mil.metrics.classification import operating_threshold


class OperatingPoint:
    """``rule`` (``"youden"``: the largest sensitivity + specificity - 1, or a target
    sensitivity in (0, 1)) for the positive (last) of two ``classes``; :attr:`threshold` once
    fitted (None before, and where the validation bags lack a class)."""

    def __init__(self, rule: str | float, classes: list[str]) -> None:
        self.rule, self.classes = rule, list(classes)
        self.threshold: float | None = None

    @property
    def applies(self) -> bool:
        """Only a binary task has a threshold."""
        return len(self.classes) == 2

    @property
    def column(self) -> str:
        return f"prob_{self.classes[-1]}"

    def fit(self, val_pred: pd.DataFrame) -> None:
        """The threshold of :attr:`rule` on the validation predictions."""
        target = None if self.rule == "youden" else float(self.rule)
        self.threshold = operating_threshold(val_pred["label_index"], val_pred[self.column], target)

    def from_folds(self, fold_metrics: list[dict[str, Any]]) -> None:
        """The median of the folds' thresholds (each chosen on its validation predictions):
        a fold ensemble's operating point."""
        found = [float(m["threshold"]) for m in fold_metrics if m.get("threshold") is not None]
        self.threshold = float(np.median(found)) if found else None

    def apply(self, out: pd.DataFrame) -> pd.DataFrame:
        """``out`` with ``pred_op``, the class at the threshold (binary, once fitted)."""
        if self.threshold is not None and self.applies:
            positive = out[self.column].to_numpy(float) >= self.threshold
            out["pred_op"] = np.where(positive, self.classes[1], self.classes[0])
        return out

    def decisions(self, pred: pd.DataFrame) -> np.ndarray | None:
        """Whether each row's ``pred_op`` is the positive class; None without decisions."""
        if "pred_op" not in pred or not self.applies:
            return None
        return (pred["pred_op"].astype(str) == str(self.classes[1])).to_numpy()

    def words(self) -> str:
        """The rule, for the report's methods."""
        if self.rule == "youden":
            return "the largest Youden's J, sensitivity + specificity - 1"
        return f"the highest threshold reaching a sensitivity of {float(self.rule):g}"
