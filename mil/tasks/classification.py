"""Slide/patient classification: cross-entropy head, probabilities, scikit-learn metrics."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from mil.errors import ConfigError
from mil.metrics import bootstrap_ci, classification_metrics, confusion
from mil.metrics.classification import (
    classification_auc,
    operating_threshold,
    roc_curves,
    threshold_metrics,
)
from mil.plots import calibration_figure, roc_figure
from mil.schema import Config
from mil.tasks.base import Artifacts, FoldTables, Task, as_tensor
from mil.tasks.registry import register


@register("classification")
class ClassificationTask(Task):
    """Cross-entropy over C classes (C >= 2), optional class weights.

    ``task.class_weights``: ``none``, ``balanced`` (inverse class frequency
    in the training fold, as scikit-learn's ``compute_class_weight``) or a
    list of C weights.
    """

    headline_metrics = ("auc", "balanced_accuracy")
    report_metrics = ("auc", "auprc", "balanced_accuracy", "sensitivity", "specificity", "accuracy", "f1", "brier")
    outcome_columns = ("label_index",)
    figure_captions = {
        "roc.png": "Out-of-fold ROC curves (thin: folds; bold: pooled).",
        "calibration.png": "Reliability diagram of the pooled out-of-fold probabilities (bins of equal size).",
    }

    def __init__(self, cfg: Config, classes: list[str]) -> None:
        super().__init__(cfg, classes)
        self.weight: Tensor | None = None
        # binary: the fold's decision threshold on P(positive), from its validation bags
        self.threshold: float | None = None
        cw = cfg.task.class_weights
        if isinstance(cw, list) and len(cw) != len(classes):
            raise ConfigError(
                f"{cfg.source}: task.class_weights has {len(cw)} values for {len(classes)} classes {classes}"
            )

    @property
    def n_out(self) -> int:
        return len(self.classes)

    @property
    def needs_val_predictions(self) -> bool:
        return len(self.classes) == 2

    def fit_operating_point(self, val_pred: pd.DataFrame) -> None:
        """``task.operating_point`` on the validation predictions (binary; None without both
        classes among them, and then no thresholded metrics)."""
        op = self.cfg.task.operating_point
        self.threshold = operating_threshold(
            val_pred["label_index"], val_pred[f"prob_{self.classes[1]}"], None if op == "youden" else op
        )

    def ensemble_operating_point(self, fold_metrics: list[dict[str, Any]]) -> None:
        """The median of the folds' thresholds (each chosen on its validation predictions)."""
        found = [float(m["threshold"]) for m in fold_metrics if m.get("threshold") is not None]
        self.threshold = float(np.median(found)) if found else None

    def with_operating_point(self, out: pd.DataFrame) -> pd.DataFrame:
        """``out`` with ``pred_op``, the class at the fold's threshold (binary, once fitted)."""
        if self.threshold is not None and len(self.classes) == 2:
            positive = out[f"prob_{self.classes[1]}"].to_numpy(float) >= self.threshold
            out["pred_op"] = np.where(positive, self.classes[1], self.classes[0])
        return out

    def fit_fold(self, train_bags: pd.DataFrame) -> None:
        self.threshold = None
        cw = self.cfg.task.class_weights
        if cw == "balanced":
            from sklearn.utils.class_weight import compute_class_weight

            y = train_bags["label"].to_numpy(int)
            present = np.unique(y)
            w = np.ones(self.n_out)
            w[present] = compute_class_weight("balanced", classes=present, y=y)
            self.weight = torch.tensor(w, dtype=torch.float32)
        elif isinstance(cw, list):
            self.weight = torch.tensor(cw, dtype=torch.float32)
        else:
            self.weight = None

    def constant_logits(self, train_bags: pd.DataFrame) -> np.ndarray:
        """Log class frequencies of the training bags (+0.5 each): the class prior."""
        counts = np.bincount(train_bags["label"].to_numpy(int), minlength=self.n_out) + 0.5
        return np.log(counts / counts.sum())

    def constant_predictions(self, pred: pd.DataFrame) -> str | None:
        prob = self._prob(pred)
        present = np.unique(pred["label_index"].to_numpy(int))
        predicted = np.unique(prob.argmax(1))
        if len(present) > 1 and len(predicted) == 1:
            return f"every test bag was predicted {self.classes[int(predicted[0])]!r}"
        spread = float(prob.std(0).max()) if len(prob) > 1 else 0.0
        if len(prob) > 1 and spread < 0.01:
            return f"the predicted probabilities vary by at most {spread:.3g} (sd) across test bags"
        return None

    def state(self) -> dict[str, Any]:
        return {"class_weights": None if self.weight is None else self.weight.tolist(), "threshold": self.threshold}

    def targets(self, bags: pd.DataFrame) -> dict[str, Tensor]:
        return {"label": as_tensor(bags["label"].to_numpy(int), torch.long)}

    def model_targets(self, targets: dict[str, Tensor]) -> Tensor | None:
        return targets["label"]

    def loss(self, logits: Tensor, targets: dict[str, Tensor]) -> Tensor:
        w = None if self.weight is None else self.weight.to(logits.device)
        return F.cross_entropy(logits, targets["label"].to(logits.device), weight=w)

    def outputs(self, logits: np.ndarray) -> pd.DataFrame:
        """``prob_<class>`` (softmax) per class and ``pred``, the most probable class."""
        prob = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), 1).numpy()
        out = pd.DataFrame({f"prob_{c}": prob[:, i] for i, c in enumerate(self.classes)})
        out["pred"] = [self.classes[i] for i in prob.argmax(1)]
        return out

    def predictions(self, bags: pd.DataFrame, logits: np.ndarray) -> pd.DataFrame:
        out = pd.DataFrame(
            {"bag_id": bags["bag_id"].values, "patient_id": bags["patient_id"].values}
        )
        out["label"] = [self.classes[i] for i in bags["label"]]
        out["label_index"] = bags["label"].to_numpy(int)
        values = self.outputs(logits)
        for col in values.columns:
            out[col] = values[col].to_numpy()
        return self.with_operating_point(out)

    def mean_outputs(self, rows: pd.DataFrame, by: str) -> pd.DataFrame:
        """Class probabilities averaged within ``by``; ``pred`` recomputed from the means."""
        out = super().mean_outputs(rows, by)
        probs = out[[f"prob_{c}" for c in self.classes]].to_numpy()
        out["pred"] = [self.classes[i] for i in probs.argmax(1)]
        return out

    def averaging_words(self) -> str:
        return "class probabilities averaged"

    def average_predictions(
        self, members: list[pd.DataFrame], scales: list[dict[str, float]] | None = None
    ) -> pd.DataFrame:
        """Class probabilities averaged; ``pred`` from the means, ``pred_op`` at this task's
        operating point (fit it on the members' averaged validation predictions first)."""
        out = super().average_predictions(members, scales).drop(columns="pred_op", errors="ignore")
        out["pred"] = [self.classes[i] for i in self._prob(out).argmax(1)]
        return self.with_operating_point(out)

    def _prob(self, pred: pd.DataFrame) -> np.ndarray:
        return pred[[f"prob_{c}" for c in self.classes]].to_numpy(float)

    def _positive(self, pred: pd.DataFrame) -> np.ndarray | None:
        """Decisions at the operating point (``pred_op`` is the positive class), if any."""
        if "pred_op" not in pred or len(self.classes) != 2:
            return None
        return (pred["pred_op"].astype(str) == str(self.classes[1])).to_numpy()

    def metrics(self, pred: pd.DataFrame, train_pred: pd.DataFrame | None = None) -> dict[str, Any]:
        y, p = pred["label_index"].to_numpy(int), self._prob(pred)
        out: dict[str, Any] = self.pooled_metrics(pred)
        out["confusion_matrix"] = confusion(y, p)
        if self.threshold is not None and "pred_op" in pred:
            out["threshold"] = self.threshold
        return out

    def pooled_metrics(self, pred: pd.DataFrame) -> dict[str, float]:
        y, p, positive = pred["label_index"].to_numpy(int), self._prob(pred), self._positive(pred)
        if positive is None:
            return classification_metrics(y, p)
        return _with_threshold_metrics(y, p, positive)

    def metric_value(self, pred: pd.DataFrame, name: str) -> float:
        if name != "auc":
            return super().metric_value(pred, name)
        with warnings.catch_warnings():  # alone: a sixth of the cost of every metric
            warnings.simplefilter("ignore")
            return classification_auc(pred["label_index"].to_numpy(int), self._prob(pred))

    def pooled_ci(self, pred: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> dict[str, tuple[float, float]]:
        y, p, positive = pred["label_index"].to_numpy(int), self._prob(pred), self._positive(pred)
        groups = pred["patient_id"].to_numpy()
        if positive is None:
            return bootstrap_ci(classification_metrics, y, p, n_boot=n_boot, seed=seed, groups=groups)
        return bootstrap_ci(_with_threshold_metrics, y, p, positive, n_boot=n_boot, seed=seed, groups=groups)

    def counts(self, pred: pd.DataFrame) -> dict[str, int]:
        y = pred["label_index"].to_numpy(int)
        return {f"n_{c}": int((y == k).sum()) for k, c in enumerate(self.classes)}

    def outcome_strata(self, pred: pd.DataFrame) -> np.ndarray:
        return pred["label_index"].to_numpy(int)

    def summary_artifacts(self, folds: FoldTables) -> tuple[dict[str, Any], Artifacts]:
        """Out-of-fold ROC curves: ``roc.csv`` (per fold and pooled) and ``roc.png``.

        Binary: the positive (last) class; multi-class: each class against the
        rest, pooled. With repeated cross-validation only the first repeat is
        used, so that every bag counts once. Returns ``auc_pooled`` (per class
        for multi-class), the AUC of the pooled out-of-fold predictions.
        """
        preds = folds("predictions.csv")
        if not preds:
            return {}, {}
        classes = self.classes[-1:] if len(self.classes) == 2 else self.classes
        curves, aucs = roc_curves(preds, self.classes, classes)
        if curves is None:
            return {}, {}
        title = f"{self.cfg.name}: out-of-fold ROC, {len(preds)} folds"
        artifacts = {"roc.csv": curves, "roc.png": roc_figure(curves, aucs, title)}
        if len(self.classes) == 2:
            artifacts.update(self._calibration(preds))
            return {"auc_pooled": aucs.get(self.classes[-1], float("nan"))}, artifacts
        return {"auc_pooled": aucs}, artifacts

    def _calibration(self, preds: dict[str, pd.DataFrame]) -> Artifacts:
        """Reliability diagram of the pooled out-of-fold predictions (first repeat, as the
        ROC): ``calibration.csv`` and ``calibration.png``, 10 bins of equal size
        (scikit-learn ``calibration_curve``, quantile strategy)."""
        from sklearn.calibration import calibration_curve

        pooled = pd.concat(list(preds.values()), ignore_index=True)
        y, p = pooled["label_index"].to_numpy(int), pooled[f"prob_{self.classes[1]}"].to_numpy(float)
        if len(np.unique(y)) < 2:
            return {}
        bins = int(min(10, max(2, len(y) // 10)))
        frac, mean = calibration_curve(y, p, n_bins=bins, strategy="quantile")
        table = pd.DataFrame({"mean_predicted": mean, "fraction_positive": frac})
        brier = float(np.mean((p - y) ** 2))
        title = f"{self.cfg.name}: calibration, {len(y)} out-of-fold predictions"
        return {"calibration.csv": table, "calibration.png": calibration_figure(table, brier, title)}

    def positive_bags(self, pred: pd.DataFrame) -> np.ndarray:
        return pred["label_index"].to_numpy(int) > 0

    def patient_predictions(self, pred: pd.DataFrame) -> pd.DataFrame:
        """Patient-level predictions: class probabilities averaged over a patient's bags."""
        cols = [f"prob_{c}" for c in self.classes]
        g = pred.groupby("patient_id", sort=False)
        out = g[cols].mean().reset_index()
        first = g[["label", "label_index"]].first().reset_index(drop=True)
        out.insert(1, "label", first["label"].values)
        out.insert(2, "label_index", first["label_index"].values)
        out["n_bags"] = g.size().values
        out["pred"] = [self.classes[i] for i in out[cols].to_numpy().argmax(1)]
        return self.with_operating_point(out)

    def score_column(self) -> str:
        return f"prob_{self.classes[-1]}"

    def describe(self, row: pd.Series) -> str:
        c = self.classes[-1]
        return f"label {row['label']}, P({c}) = {row[f'prob_{c}']:.2f}"

    def title(self) -> str:
        return f"{self.cfg.data.bag_level} classification"

    def methods(self) -> str:
        weights = self.cfg.task.class_weights
        return (
            "Loss: cross-entropy"
            + (f" with class weights ({weights})" if weights != "none" else "")
            + ". Metrics (scikit-learn): ROC AUC (one-vs-rest macro for more than two classes), "
            "average precision (AUPRC), Brier score, and balanced accuracy, accuracy and macro F1 "
            "at the most probable class"
            + (
                f"; sensitivity and specificity at a threshold chosen on each fold's validation "
                f"predictions ({_operating_words(self.cfg.task.operating_point)}) and applied "
                f"unchanged to its test bags."
                if len(self.classes) == 2 and self.cfg.splits.val_fraction > 0
                else "."
            )
        )


def _operating_words(op) -> str:
    if op == "youden":
        return "the largest Youden's J, sensitivity + specificity - 1"
    return f"the highest threshold reaching a sensitivity of {op:g}"


def _with_threshold_metrics(y: np.ndarray, p: np.ndarray, positive: np.ndarray) -> dict[str, float]:
    return {**classification_metrics(y, p), **threshold_metrics(y, positive)}
