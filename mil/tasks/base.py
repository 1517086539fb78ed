"""The task interface: what the runner asks of classification and survival alike."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from mil.config import Config


class Task:
    """Turns head outputs into a loss, predictions and metrics.

    Per fold the runner calls :meth:`setup_fold` with the training bags, then
    :meth:`batches`, :meth:`targets` and :meth:`loss` while training, and
    :meth:`predictions` and :meth:`metrics` on the test bags.
    """

    name = "task"
    #: the metric that early stopping and model selection watch (lower is better)
    monitor = "loss"

    def __init__(self, cfg: Config, classes: list[str]) -> None:
        self.cfg = cfg
        self.classes = list(classes)

    @property
    def n_out(self) -> int:
        raise NotImplementedError

    def setup_fold(self, train_bags: pd.DataFrame) -> None:
        """Fit fold-dependent state (class weights, survival bins) on the training bags."""

    def state(self) -> dict[str, Any]:
        """Fold state saved beside the model weights (plain Python types)."""
        return {}

    def batches(
        self, bags: pd.DataFrame, batch_size: int, rng: np.random.Generator
    ) -> list[np.ndarray]:
        """Row positions of ``bags`` for each loss batch of one epoch (shuffled)."""
        order = rng.permutation(len(bags))
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

    def targets(self, bags: pd.DataFrame) -> dict[str, Tensor]:
        raise NotImplementedError

    def model_targets(self, targets: dict[str, Tensor]) -> Tensor | None:
        """Class labels handed to models with instance-level losses (CLAM), else None."""
        return None

    def loss(self, logits: Tensor, targets: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def predictions(self, bags: pd.DataFrame, logits: np.ndarray) -> pd.DataFrame:
        raise NotImplementedError

    def metrics(self, pred: pd.DataFrame, train_pred: pd.DataFrame | None = None) -> dict[str, Any]:
        """Scalar metrics (and extras such as a confusion matrix) of one fold's predictions."""
        raise NotImplementedError

    def pooled_metrics(self, pred: pd.DataFrame) -> dict[str, float]:
        """Metrics of pooled out-of-fold predictions: the statistics :meth:`pooled_ci` bootstraps."""
        return {}

    def pooled_ci(
        self, pred: pd.DataFrame, n_boot: int = 1000, seed: int = 0
    ) -> dict[str, tuple[float, float]]:
        """Bootstrap 95% CIs of the metrics over pooled out-of-fold predictions."""
        return {}

    def counts(self, pred: pd.DataFrame) -> dict[str, int]:
        """Outcome counts of some predictions (bags per class, or events), for subgroup tables."""
        return {}

    def positive_bags(self, pred: pd.DataFrame) -> np.ndarray:
        """Which bags can hold positive instances (for instance-level AUC)."""
        return np.ones(len(pred), dtype=bool)


def as_tensor(values: np.ndarray, dtype: torch.dtype) -> Tensor:
    return torch.as_tensor(np.asarray(values), dtype=dtype)


def first_repeat_folds(fold_dirs: Sequence[Path], name: str) -> dict[str, pd.DataFrame]:
    """Fold name -> the CSV ``name`` of that fold, for the folds of the first repeat
    (``fold_<k>``; later repeats are ``fold_r<r>_<k>``), so that pooled out-of-fold
    results count every bag once. Folds without the file are skipped."""
    dirs = [Path(d) for d in fold_dirs if (Path(d) / name).is_file()]
    first = [d for d in dirs if not d.name.startswith("fold_r")] or dirs
    return {
        d.name[5:]: pd.read_csv(d / name, dtype={"bag_id": str, "patient_id": str}) for d in first
    }
