"""The ordinal task's cumulative link and metrics (:mod:`mil.tasks.ordinal`): the cumulative
bits, CORAL's loss, grade probabilities from a score and thresholds, the decided grade, quadratic
weighted kappa and the other metrics of a predicted grade, and the pooled confusion figure."""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mil.metrics.classification import classification_auc


def levels(y: Tensor, k: int) -> Tensor:
    """``[B, k-1]`` cumulative bits ``[y > j]`` of grade indices ``y``."""
    return (y.unsqueeze(1) > torch.arange(k - 1, device=y.device)).to(torch.float32)


def coral_loss(cum_logits: Tensor, y: Tensor) -> Tensor:
    r"""CORAL's loss: :math:`-\frac1B\sum_b\sum_j [y_b>j]\log\sigma(l_{bj}) + [y_b\le j]\log(1-\sigma(l_{bj}))`."""
    lv = levels(y, cum_logits.shape[1] + 1).to(cum_logits.dtype)
    logsig = F.logsigmoid(cum_logits)
    return -(logsig * lv + (logsig - cum_logits) * (1.0 - lv)).sum(1).mean()


def class_probabilities(score: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """``[n, k]`` grade probabilities of scores ``[n]`` under ordered ``thresholds [k-1]``."""
    z = np.asarray(score, float)[:, None] - np.asarray(thresholds, float)[None, :]
    above = 1.0 / (1.0 + np.exp(-np.clip(z, -700, 700)))  # P(y > j)
    n = len(above)
    cum = np.hstack([np.ones((n, 1)), above, np.zeros((n, 1))])
    return np.clip(cum[:, :-1] - cum[:, 1:], 0.0, 1.0)


def decide(prob: np.ndarray, rule: str) -> np.ndarray:
    """The predicted grade index of class probabilities ``[n, k]``: ``median``: the number of
    cumulative probabilities P(y > j) above 0.5; ``mode``: the most probable grade."""
    prob = np.asarray(prob, float)
    if rule == "mode":
        return prob.argmax(1)
    above = 1.0 - np.cumsum(prob, 1)[:, :-1]  # P(y > j), j = 0 .. k-2
    return (above > 0.5).sum(1)


def quadratic_weighted_kappa(y: np.ndarray, pred: np.ndarray, k: int) -> float:
    """Cohen's kappa with weights :math:`(i-j)^2` over the grades ``0 .. k-1`` (scikit-learn's
    ``cohen_kappa_score(y, pred, weights="quadratic", labels=range(k))``); NaN when undefined
    (one grade in both)."""
    y, pred = np.asarray(y, int), np.asarray(pred, int)
    if not len(y):
        return float("nan")
    observed = np.zeros((k, k))
    np.add.at(observed, (y, pred), 1.0)
    expected = np.outer(observed.sum(1), observed.sum(0)) / observed.sum()
    w = (np.arange(k)[:, None] - np.arange(k)[None, :]) ** 2
    denom = float((w * expected).sum())
    return float(1.0 - (w * observed).sum() / denom) if denom > 0 else float("nan")


def ordinal_metrics(y: np.ndarray, prob: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """``qwk``, ``mae`` (in grades), ``auc`` (macro one-vs-rest of ``prob``, as classification's),
    ``balanced_accuracy`` and ``accuracy`` of grade indices ``pred`` against ``y``."""
    from sklearn import metrics as skm

    y, pred, prob = np.asarray(y, int), np.asarray(pred, int), np.asarray(prob, float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a predicted grade absent from y (balanced accuracy)
        bacc = float(skm.balanced_accuracy_score(y, pred)) if len(y) else float("nan")
    return {
        "qwk": quadratic_weighted_kappa(y, pred, prob.shape[1]),
        "mae": float(np.abs(pred - y).mean()) if len(y) else float("nan"),
        "auc": classification_auc(y, prob),
        "balanced_accuracy": bacc,
        "accuracy": float((pred == y).mean()) if len(y) else float("nan"),
    }


def equal_thresholds(k: int) -> np.ndarray:
    """``k - 1`` thresholds 1 apart, centred on 0."""
    return np.arange(k - 1, dtype=float) - (k - 2) / 2.0


def confusion_figure(cm: np.ndarray, classes: list[str], title: str):
    from matplotlib.figure import Figure

    k = len(classes)
    fig = Figure(figsize=(1.2 + 0.7 * k, 1.0 + 0.7 * k), dpi=120)
    ax = fig.subplots()
    ax.imshow(cm, cmap="Blues")
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                str(cm[i, j]),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if cm[i, j] > cm.max() / 2 else "black",
            )
    ax.set_xticks(range(k), classes)
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted grade")
    ax.set_ylabel("true grade")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig
