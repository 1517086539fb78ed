"""Slide/patient classification: cross-entropy head, probabilities, scikit-learn metrics."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from mil.errors import ConfigError
from mil.losses.focal import focal_loss
from mil.losses.supcon import SupCon
from mil.metrics import bootstrap_ci, classification_metrics, confusion
from mil.metrics.classification import classification_auc, roc_curves, threshold_metrics
from mil.plots import calibration_figure, roc_figure
from mil.tasks.base import Artifacts, FoldTables, LinearHead, Task, TaskRun, as_tensor, logit_kind
from mil.tasks.linear_fits import C_GRID, logistic_head
from mil.tasks.operating_point import OperatingPoint
from mil.tasks.registry import register
from mil.tasks.targets import label_columns

#: ``train.sampler: auto`` balances the batches of a fold whose commonest class outnumbers its
#: rarest this many times or more (docs/benchmarks.md, "Class imbalance")
AUTO_BALANCE_RATIO = 5


@dataclass
class ClassificationOptions:
    """``task.class_weights``: ``none``, ``balanced`` (inverse class frequency in the training
    fold, as scikit-learn's ``compute_class_weight``) or a list of C weights.
    ``task.operating_point`` (binary): the threshold chosen on each fold's validation
    predictions, ``youden`` or a target sensitivity in (0, 1). ``task.loss``: cross-entropy
    (``ce``) or the focal loss (``focal``, :func:`mil.losses.focal.focal_loss`) with
    ``task.gamma``. ``task.supcon``: SC-MIL's supervised contrastive term on the bag embeddings
    (:class:`mil.losses.supcon.SupCon`: ``weight``, ``temperature``, ``schedule``), or null."""

    class_weights: Literal["none", "balanced"] | list[float] = "none"
    operating_point: Literal["youden"] | float = "youden"
    loss: Literal["ce", "focal"] = "ce"
    gamma: float = 2.0
    supcon: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.gamma >= 0:
            raise ValueError(f"task.gamma must be >= 0 (0: cross-entropy), found {self.gamma!r}")
        if self.supcon is not None:  # checked, with its defaults filled in (as saved)
            self.supcon = dataclasses.asdict(SupCon.parse(self.supcon))
        op = self.operating_point
        if op != "youden" and not 0.0 < op < 1.0:
            raise ValueError(
                f"task.operating_point must be youden or a sensitivity in (0, 1), found {op!r}"
            )


@register("classification")
class ClassificationTask(Task):
    """Cross-entropy over C classes (C >= 2), optional class weights
    (:class:`ClassificationOptions`); binary tasks get an :class:`OperatingPoint`."""

    Options = ClassificationOptions
    saved_defaults = {"loss": "cox"}  # survival's default, in every saved config

    headline_metrics = ("auc", "balanced_accuracy")
    report_metrics = (
        "auc",
        "auprc",
        "balanced_accuracy",
        "sensitivity",
        "specificity",
        "accuracy",
        "f1",
        "brier",
    )
    outcome_columns = ("label_index",)
    figure_captions = {
        "roc.png": "Out-of-fold ROC curves (thin: folds; bold: pooled).",
        "calibration.png": "Reliability diagram of the pooled out-of-fold probabilities (bins of equal size).",
    }

    def __init__(self, options: Any, classes: list[str], run: TaskRun | None = None) -> None:
        super().__init__(options, classes, run)
        self.weight: Tensor | None = None
        sc = self.options.supcon
        self.supcon = SupCon(**sc) if sc is not None and sc["weight"] > 0 else None
        # binary: the fold's decision threshold on P(positive), from its validation bags
        self.operating_point = OperatingPoint(self.options.operating_point, self.classes)
        cw = self.options.class_weights
        if isinstance(cw, list) and len(cw) != len(classes):
            raise ConfigError(
                f"{self.run.source}: task.class_weights has {len(cw)} values for {len(classes)} classes {classes}"
            )

    @property
    def n_out(self) -> int:
        return len(self.classes)

    @property
    def threshold(self) -> float | None:
        """The fold's decision threshold on P(positive) (binary, once fitted)."""
        return self.operating_point.threshold

    def fit_fold(self, train_bags: pd.DataFrame) -> None:
        self.operating_point.threshold = None
        cw = self.options.class_weights
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
        return {
            "class_weights": None if self.weight is None else self.weight.tolist(),
            "threshold": self.threshold,
        }

    def targets(self, bags: pd.DataFrame) -> dict[str, Tensor]:
        return {"label": as_tensor(bags["label"].to_numpy(int), torch.long)}

    def model_targets(self, targets: dict[str, Tensor]) -> Tensor | None:
        return targets["label"]

    def loss(self, logits: Tensor, targets: dict[str, Tensor]) -> Tensor:
        w = None if self.weight is None else self.weight.to(logits.device)
        label = targets["label"].to(logits.device)
        if self.options.loss == "focal":
            return focal_loss(logits, label, self.options.gamma, weight=w)
        return F.cross_entropy(logits, label, weight=w)

    def balance_groups(self, bags: pd.DataFrame) -> np.ndarray:
        return bags["label"].to_numpy(int)

    def auto_sampler(self, bags: pd.DataFrame) -> str:
        """``balanced`` where the training fold's commonest class outnumbers its rarest by
        :data:`AUTO_BALANCE_RATIO` or more (the imbalance study: from 1:5 on balanced batches
        beat shuffled ones on every measure; at 1:1 they cost), else ``random``."""
        counts = np.bincount(bags["label"].to_numpy(int), minlength=len(self.classes))
        counts = counts[counts > 0]
        imbalanced = len(counts) > 1 and counts.max() >= AUTO_BALANCE_RATIO * counts.min()
        return "balanced" if imbalanced else "random"

    def training_objective(
        self, loss: Tensor, targets: dict[str, Tensor], projected: Tensor | None, progress: float
    ) -> Tensor:
        if self.supcon is None or projected is None:
            return loss
        return self.supcon.mix(loss, projected, targets["label"], progress)

    def outputs(self, logits: np.ndarray) -> pd.DataFrame:
        """``prob_<class>`` (softmax) per class and ``pred``, the most probable class."""
        prob = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), 1).numpy()
        out = pd.DataFrame({f"prob_{c}": prob[:, i] for i, c in enumerate(self.classes)})
        out["pred"] = [self.classes[i] for i in prob.argmax(1)]
        return out

    def row_targets(self, bags: pd.DataFrame) -> dict[str, Any]:
        return label_columns(self.classes, bags)

    def predictions(self, bags: pd.DataFrame, logits: np.ndarray) -> pd.DataFrame:
        return self.with_operating_point(super().predictions(bags, logits))

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
        return self.operating_point.decisions(pred)

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

    def pooled_ci(
        self, pred: pd.DataFrame, n_boot: int = 1000, seed: int = 0
    ) -> dict[str, tuple[float, float]]:
        y, p, positive = pred["label_index"].to_numpy(int), self._prob(pred), self._positive(pred)
        groups = pred["patient_id"].to_numpy()
        if positive is None:
            return bootstrap_ci(
                classification_metrics, y, p, n_boot=n_boot, seed=seed, groups=groups
            )
        return bootstrap_ci(
            _with_threshold_metrics, y, p, positive, n_boot=n_boot, seed=seed, groups=groups
        )

    def counts(self, pred: pd.DataFrame) -> dict[str, int]:
        y = pred["label_index"].to_numpy(int)
        return {f"n_{c}": int((y == k).sum()) for k, c in enumerate(self.classes)}

    def outcome_strata(self, pred: pd.DataFrame) -> np.ndarray:
        return pred["label_index"].to_numpy(int)

    def thin_outcome(self, pred: pd.DataFrame) -> str | None:
        classes = sorted(pred["label"].dropna().astype(str).unique()) if "label" in pred else []
        if len(classes) != 1:
            return None
        return (
            f"every bag of the external cohort ({_count(len(pred), 'bag')}, "
            f"{_count(pred['patient_id'].nunique(), 'patient')}) is of class {classes[0]!r}; the "
            "metrics that need two classes (AUC, its gap) are undefined (null) and the others "
            "describe that class alone"
        )

    @classmethod
    def instance_view(cls, values: np.ndarray, kind: str) -> np.ndarray:
        """Logit kinds centred over the classes (a softmax ignores a common shift; for two
        classes column 1 is half the instance's share of the log-odds); other kinds as they are."""
        v = np.asarray(values, dtype=np.float64)
        if logit_kind(kind, v) and v.shape[1] > 1:
            return v - v.mean(1, keepdims=True)
        return v

    @classmethod
    def faithfulness_target(cls, logits: np.ndarray) -> np.ndarray:
        """The class each bag is predicted."""
        return np.asarray(logits).argmax(1)

    @classmethod
    def evidence(cls, logits: np.ndarray, target: np.ndarray | None = None) -> np.ndarray:
        """The softmax probability of class ``target[i]`` (default: the most probable)."""
        z = np.asarray(logits, dtype=np.float64)
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        target = p.argmax(1) if target is None else np.asarray(target)
        return p[np.arange(len(p)), target]

    linear_penalty = ("C", C_GRID)
    linear_words = "logistic regression (scikit-learn)"

    def fit_linear(
        self, z: np.ndarray, bags: pd.DataFrame, penalty: float, seed: int
    ) -> LinearHead:
        """An L2 logistic regression with the fold's class weights."""
        weight = None if self.weight is None else self.weight.numpy()
        return logistic_head(z, bags["label"].to_numpy(int), penalty, weight, seed)

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
        title = f"{self.run.name}: out-of-fold ROC, {len(preds)} folds"
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
        y, p = (
            pooled["label_index"].to_numpy(int),
            pooled[f"prob_{self.classes[1]}"].to_numpy(float),
        )
        if len(np.unique(y)) < 2:
            return {}
        bins = int(min(10, max(2, len(y) // 10)))
        frac, mean = calibration_curve(y, p, n_bins=bins, strategy="quantile")
        table = pd.DataFrame({"mean_predicted": mean, "fraction_positive": frac})
        brier = float(np.mean((p - y) ** 2))
        title = f"{self.run.name}: calibration, {len(y)} out-of-fold predictions"
        return {
            "calibration.csv": table,
            "calibration.png": calibration_figure(table, brier, title),
        }

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
        return f"{self.run.bag_level} classification"

    def methods(self) -> str:
        weights, o = self.options.class_weights, self.options
        sc = self.supcon
        return (
            ("Loss: cross-entropy" if o.loss == "ce" else f"Loss: focal loss (gamma {o.gamma:g})")
            + (f" with class weights ({weights})" if weights != "none" else "")
            + (
                f", mixed with the supervised contrastive loss of projected bag embeddings "
                f"(SC-MIL; temperature {sc.temperature:g}, share {sc.weight:g} on a {sc.schedule} "
                "schedule over training)"
                if sc is not None
                else ""
            )
            + ". Metrics (scikit-learn): ROC AUC (one-vs-rest macro for more than two classes), "
            "average precision (AUPRC), Brier score, and balanced accuracy, accuracy and macro F1 "
            "at the most probable class"
            + (
                f"; sensitivity and specificity at a threshold chosen on each fold's validation "
                f"predictions ({self.operating_point.words()}) and applied "
                f"unchanged to its test bags."
                if self.operating_point.applies and self.run.validated
                else "."
            )
        )


def _with_threshold_metrics(y: np.ndarray, p: np.ndarray, positive: np.ndarray) -> dict[str, float]:
    return {**classification_metrics(y, p), **threshold_metrics(y, positive)}


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"
