"""Classification metrics from scikit-learn, for binary and multi-class predictions."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn import metrics as skm


def classification_metrics(y_true: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    """``auc``, ``auprc``, ``brier``, ``balanced_accuracy``, ``accuracy``, ``f1`` (macro) from
    class probabilities.

    Args:
        y_true: ``[n]`` integer class indices.
        prob: ``[n, C]`` class probabilities (rows sum to 1).

    ``auc`` is the ROC AUC of the positive class for C = 2 and the macro
    one-vs-rest AUC for C > 2; NaN when the labels hold a single class. Where
    only some of C > 2 classes occur (a small validation set), the AUC is over
    the classes present, with probabilities renormalised over them.
    Predicted class = argmax (for C = 2: probability of class 1 >= 0.5).
    """
    y_true = np.asarray(y_true, dtype=int)
    prob = np.asarray(prob, dtype=float)
    n_classes = prob.shape[1]
    y_pred = prob.argmax(1)
    present = np.unique(y_true)
    return {
        "auc": classification_auc(y_true, prob),
        "auprc": _auprc(y_true, prob, present),
        "brier": _brier(y_true, prob),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y_true, y_pred)),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "f1": float(
            skm.f1_score(
                y_true, y_pred, average="macro", labels=np.arange(n_classes), zero_division=0
            )
        ),
    }


def classification_auc(y_true: np.ndarray, prob: np.ndarray) -> float:
    """The ``auc`` of :func:`classification_metrics` alone (what paired comparisons resample)."""
    y_true = np.asarray(y_true, dtype=int)
    prob = np.asarray(prob, dtype=float)
    n_classes = prob.shape[1]
    present = np.unique(y_true)
    if len(present) < 2:
        return float("nan")
    if n_classes == 2:
        return float(skm.roc_auc_score(y_true, prob[:, 1]))
    if len(present) < n_classes:
        # One-vs-rest over the classes present, probabilities renormalised over them;
        # with two present that is the binary AUC of the second one's share
        sub = prob[:, present] / prob[:, present].sum(1, keepdims=True)
        y_sub = np.searchsorted(present, y_true)
        if len(present) == 2:
            return float(skm.roc_auc_score(y_sub, sub[:, 1]))
        return float(skm.roc_auc_score(y_sub, sub, multi_class="ovr", average="macro"))
    return float(skm.roc_auc_score(y_true, prob, multi_class="ovr", average="macro"))


def _auprc(y_true: np.ndarray, prob: np.ndarray, present: np.ndarray) -> float:
    """Average precision (area under the precision-recall curve) of the positive class for
    C = 2, else the macro mean over the classes present of each class against the rest."""
    if len(present) < 2:
        return float("nan")
    if prob.shape[1] == 2:
        return float(skm.average_precision_score(y_true, prob[:, 1]))
    return float(np.mean([skm.average_precision_score(y_true == k, prob[:, k]) for k in present]))


def _brier(y_true: np.ndarray, prob: np.ndarray) -> float:
    """Brier score: ``mean (p_1 - y)^2`` for C = 2 (scikit-learn's ``brier_score_loss``), else
    the multi-class form ``mean sum_k (p_k - [y = k])^2`` (Brier 1950)."""
    if prob.shape[1] == 2:
        return float(skm.brier_score_loss(y_true, prob[:, 1], pos_label=1))
    onehot = np.eye(prob.shape[1])[y_true]
    return float(((prob - onehot) ** 2).sum(1).mean())


def operating_threshold(
    y_true: np.ndarray, p_pos: np.ndarray, sensitivity: float | None = None
) -> float | None:
    """The decision threshold on ``p_pos`` chosen on (validation) predictions: the cut with the
    largest Youden's J (sensitivity + specificity - 1) over scikit-learn's ROC thresholds, or,
    with ``sensitivity``, the highest cut whose sensitivity reaches it. The threshold is put
    midway between that cut's score and the next lower score, which makes the same decisions
    on these predictions with the widest margin (a perfectly separated validation set gets
    the midpoint between its classes, not its lowest positive score). None without both
    classes."""
    y_true, p_pos = np.asarray(y_true, dtype=int), np.asarray(p_pos, dtype=float)
    if len(np.unique(y_true)) < 2:
        return None
    fpr, tpr, thr = skm.roc_curve(y_true, p_pos, drop_intermediate=False)
    k = (
        int(np.argmax(tpr - fpr))
        if sensitivity is None
        else int(np.flatnonzero(tpr >= sensitivity)[0])
    )
    cut = min(float(thr[k]), 1.0)  # scikit-learn's first threshold is inf (nothing positive)
    below = p_pos[p_pos < cut]
    return (cut + float(below.max())) / 2 if len(below) else cut


def threshold_metrics(y_true: np.ndarray, positive: np.ndarray) -> dict[str, float]:
    """``sensitivity`` and ``specificity`` of binary decisions ``positive`` (class 1)."""
    y_true, positive = np.asarray(y_true, dtype=int), np.asarray(positive, dtype=bool)
    pos, neg = y_true == 1, y_true == 0
    return {
        "sensitivity": float(positive[pos].mean()) if pos.any() else float("nan"),
        "specificity": float((~positive[neg]).mean()) if neg.any() else float("nan"),
    }


def confusion(y_true: np.ndarray, prob: np.ndarray) -> list[list[int]]:
    """Confusion matrix (rows = true class, columns = predicted class)."""
    n_classes = np.asarray(prob).shape[1]
    cm = skm.confusion_matrix(
        np.asarray(y_true, dtype=int), np.asarray(prob).argmax(1), labels=np.arange(n_classes)
    )
    return cm.tolist()


def roc_curves(
    preds: dict[str, pd.DataFrame], classes: list[str], which: list[str]
) -> tuple[pd.DataFrame | None, dict[str, float]]:
    """ROC curves of each class in ``which`` against the rest, per fold and pooled.

    ``preds``: fold name -> predictions with ``label_index`` and ``prob_<class>``.
    Returns ``class, fold, fpr, tpr, threshold`` rows (None where no fold holds
    both outcomes) and the pooled AUC per class.
    """
    pooled = pd.concat(preds.values(), ignore_index=True)
    rows, aucs = [], {}
    for c in which:
        k = classes.index(c)
        for fold, part in [*preds.items(), ("pooled", pooled)]:
            y = part["label_index"].to_numpy(int) == k
            if y.all() or not y.any():
                continue  # one class only: no curve
            fpr, tpr, thr = skm.roc_curve(y, part[f"prob_{c}"].to_numpy(float))
            rows.append(
                pd.DataFrame({"class": c, "fold": fold, "fpr": fpr, "tpr": tpr, "threshold": thr})
            )
            if fold == "pooled":
                aucs[c] = float(skm.roc_auc_score(y, part[f"prob_{c}"]))
    if not rows:
        return None, aucs
    return pd.concat(rows, ignore_index=True), aucs
