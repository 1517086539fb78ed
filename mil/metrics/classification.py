"""Classification metrics from scikit-learn, for binary and multi-class predictions."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn import metrics as skm


def classification_metrics(y_true: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    """``auc``, ``balanced_accuracy``, ``accuracy``, ``f1`` (macro) from class probabilities.

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
    if len(present) < 2:
        auc = float("nan")
    elif n_classes == 2:
        auc = skm.roc_auc_score(y_true, prob[:, 1])
    elif len(present) < n_classes:
        # One-vs-rest over the classes present, probabilities renormalised over them;
        # with two present that is the binary AUC of the second one's share
        sub = prob[:, present] / prob[:, present].sum(1, keepdims=True)
        y_sub = np.searchsorted(present, y_true)
        if len(present) == 2:
            auc = skm.roc_auc_score(y_sub, sub[:, 1])
        else:
            auc = skm.roc_auc_score(y_sub, sub, multi_class="ovr", average="macro")
    else:
        auc = skm.roc_auc_score(y_true, prob, multi_class="ovr", average="macro")
    return {
        "auc": float(auc),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y_true, y_pred)),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "f1": float(
            skm.f1_score(
                y_true, y_pred, average="macro", labels=np.arange(n_classes), zero_division=0
            )
        ),
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
