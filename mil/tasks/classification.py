"""Slide/patient classification: cross-entropy head, probabilities, scikit-learn metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from mil.config import Config
from mil.errors import ConfigError
from mil.io import atomic_path, write_csv
from mil.metrics import bootstrap_ci, classification_metrics, confusion
from mil.tasks.base import Task, as_tensor, first_repeat_folds


class ClassificationTask(Task):
    """Cross-entropy over C classes (C >= 2), optional class weights.

    ``task.class_weights``: ``none``, ``balanced`` (inverse class frequency
    in the training fold, as scikit-learn's ``compute_class_weight``) or a
    list of C weights.
    """

    name = "classification"

    def __init__(self, cfg: Config, classes: list[str]) -> None:
        super().__init__(cfg, classes)
        self.weight: Tensor | None = None
        cw = cfg.task.class_weights
        if isinstance(cw, list) and len(cw) != len(classes):
            raise ConfigError(
                f"{cfg.source}: task.class_weights has {len(cw)} values for {len(classes)} classes {classes}"
            )

    @property
    def n_out(self) -> int:
        return len(self.classes)

    def setup_fold(self, train_bags: pd.DataFrame) -> None:
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

    def state(self) -> dict[str, Any]:
        return {"class_weights": None if self.weight is None else self.weight.tolist()}

    def targets(self, bags: pd.DataFrame) -> dict[str, Tensor]:
        return {"label": as_tensor(bags["label"].to_numpy(int), torch.long)}

    def model_targets(self, targets: dict[str, Tensor]) -> Tensor | None:
        return targets["label"]

    def loss(self, logits: Tensor, targets: dict[str, Tensor]) -> Tensor:
        w = None if self.weight is None else self.weight.to(logits.device)
        return F.cross_entropy(logits, targets["label"].to(logits.device), weight=w)

    def predictions(self, bags: pd.DataFrame, logits: np.ndarray) -> pd.DataFrame:
        prob = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), 1).numpy()
        out = pd.DataFrame(
            {"bag_id": bags["bag_id"].values, "patient_id": bags["patient_id"].values}
        )
        out["label"] = [self.classes[i] for i in bags["label"]]
        out["label_index"] = bags["label"].to_numpy(int)
        for i, c in enumerate(self.classes):
            out[f"prob_{c}"] = prob[:, i]
        out["pred"] = [self.classes[i] for i in prob.argmax(1)]
        return out

    def _prob(self, pred: pd.DataFrame) -> np.ndarray:
        return pred[[f"prob_{c}" for c in self.classes]].to_numpy(float)

    def metrics(self, pred: pd.DataFrame, train_pred: pd.DataFrame | None = None) -> dict[str, Any]:
        y, p = pred["label_index"].to_numpy(int), self._prob(pred)
        out: dict[str, Any] = classification_metrics(y, p)
        out["confusion_matrix"] = confusion(y, p)
        return out

    def pooled_metrics(self, pred: pd.DataFrame) -> dict[str, float]:
        return classification_metrics(pred["label_index"].to_numpy(int), self._prob(pred))

    def pooled_ci(self, pred: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> dict[str, tuple[float, float]]:
        y, p = pred["label_index"].to_numpy(int), self._prob(pred)
        return bootstrap_ci(
            classification_metrics, y, p, n_boot=n_boot, seed=seed, groups=pred["patient_id"].to_numpy()
        )

    def counts(self, pred: pd.DataFrame) -> dict[str, int]:
        y = pred["label_index"].to_numpy(int)
        return {f"n_{c}": int((y == k).sum()) for k, c in enumerate(self.classes)}

    def summary_artifacts(self, run_dir: Path, fold_dirs: list[Path]) -> dict[str, Any]:
        """Out-of-fold ROC curves: ``roc.csv`` (per fold and pooled) and ``roc.png``.

        Binary: the positive (last) class; multi-class: each class against the
        rest, pooled. With repeated cross-validation only the first repeat is
        used, so that every bag counts once. Returns ``auc_pooled`` (per class
        for multi-class), the AUC of the pooled out-of-fold predictions.
        """
        from sklearn.metrics import roc_auc_score, roc_curve

        preds = first_repeat_folds(fold_dirs, "predictions.csv")
        if not preds:
            return {}
        pooled = pd.concat(preds.values(), ignore_index=True)
        classes = self.classes[-1:] if len(self.classes) == 2 else self.classes
        rows, aucs = [], {}
        for c in classes:
            k = self.classes.index(c)
            for fold, part in [*preds.items(), ("pooled", pooled)]:
                y = part["label_index"].to_numpy(int) == k
                if y.all() or not y.any():
                    continue  # one class only: no curve
                fpr, tpr, thr = roc_curve(y, part[f"prob_{c}"].to_numpy(float))
                rows.append(pd.DataFrame({"class": c, "fold": fold, "fpr": fpr, "tpr": tpr, "threshold": thr}))
                if fold == "pooled":
                    aucs[c] = float(roc_auc_score(y, part[f"prob_{c}"]))
        if not rows:
            return {}
        curves = pd.concat(rows, ignore_index=True)
        write_csv(Path(run_dir) / "roc.csv", curves)
        save_roc_plot(
            Path(run_dir) / "roc.png",
            curves,
            aucs,
            f"{self.cfg.name}: out-of-fold ROC, {len(preds)} folds",
        )
        if len(self.classes) == 2:
            return {"auc_pooled": aucs.get(self.classes[-1], float("nan"))}
        return {"auc_pooled": aucs}

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
        return out


def save_roc_plot(path: Path, curves: pd.DataFrame, aucs: dict[str, float], title: str) -> None:
    """ROC curves as a PNG: each fold thin, the pooled out-of-fold curve bold (per class)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.8, 4.4), dpi=120)  # no pyplot: leaves the user's backend alone
    ax = fig.subplots()
    colours = [f"C{i}" for i in range(10)]
    for i, (c, g) in enumerate(curves.groupby("class", sort=False)):
        colour = colours[i % len(colours)]
        for fold, f in g.groupby("fold", sort=False):
            if fold != "pooled":
                ax.plot(f["fpr"], f["tpr"], color=colour, alpha=0.25, lw=0.8)
        f = g[g["fold"] == "pooled"]
        label = f"{c}: pooled AUC {aucs[c]:.3f}" if c in aucs else str(c)
        ax.plot(f["fpr"], f["tpr"], color=colour, lw=2.0, label=label)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8, title="thin: single folds")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
