"""Instance-level metrics: how well instance scores rank annotated positive instances.

Score kinds hold one column per head output (:data:`mil.models.base.SCORE_KINDS`);
:func:`task_scores` turns them into what a task reads (its ``instance_view``: class
evidence, a share of the risk) and :func:`score_column` picks the column a witness AUC ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

#: kinds holding class logits (or additive shares of them); see mil.models.base.LOGIT_KINDS
LOGIT_KINDS = ("contribution", "instance_logits", "attention_x_logit")
#: kinds whose values mean the same in every bag, so a ranking of all test instances is defined
POOLED_KINDS = ("instance_logits", "instance_classifier")


#: one bag's scores of a kind ``[N, K]`` and the kind's name -> the scores as the task reads
#: them (:meth:`mil.tasks.Task.instance_view`: class evidence, a share of the risk)
View = Callable[[np.ndarray, str], np.ndarray]


def task_scores(extra_scores: dict[str, Sequence], view: View) -> dict[str, list[np.ndarray]]:
    """Every bag's scores of every kind as the task reads them (``view``: the task's
    :meth:`~mil.tasks.Task.instance_view`): what ``attention.h5`` holds."""
    return {
        kind: [np.asarray(view(np.asarray(v), kind)).astype(np.float32) for v in values]
        for kind, values in extra_scores.items()
    }


def score_column(values: np.ndarray) -> np.ndarray:
    """``[N]``: a kind's evidence for the positive side: the only column, the last class of
    two, or the most supported class other than the first (the reference) of several."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 1:
        return v
    if v.shape[1] <= 2:
        return v[:, -1]
    return v[:, 1:].max(1)


def witness_auc(
    bag_ids: Sequence[str],
    scores: Sequence | None,
    positive: np.ndarray,
    instance_labels: Callable[[str], np.ndarray | None],
) -> float | None:
    """Mean over positive bags of the ROC AUC of instance scores against instance labels.

    ``scores[i]`` holds the instance scores of ``bag_ids[i]``; ``instance_labels(bag)``
    its 0/1 labels (None where the features carry none). Bags whose instances
    are all one label are skipped; None when no bag qualifies.
    """
    if scores is None:
        return None
    aucs = []
    for bag_id, s, pos in zip(bag_ids, scores, positive):
        if not pos:
            continue
        labels = instance_labels(bag_id)
        if labels is None or len(np.unique(labels)) < 2:
            continue
        aucs.append(roc_auc_score(labels, np.asarray(s)))
    return float(np.mean(aucs)) if aucs else None


def pooled_witness_auc(
    bag_ids: Sequence[str],
    scores: Sequence | None,
    instance_labels: Callable[[str], np.ndarray | None],
) -> float | None:
    """ROC AUC of all labelled test instances ranked together (every bag, positive or not):
    the ranking a heatmap with one colour scale across slides shows. Meaningful only for
    kinds comparable across bags (:data:`POOLED_KINDS`); None without both labels."""
    if scores is None:
        return None
    ys, ss = [], []
    for bag_id, s in zip(bag_ids, scores):
        labels = instance_labels(bag_id)
        if labels is not None:
            ys.append(np.asarray(labels).reshape(-1))
            ss.append(np.asarray(s, dtype=np.float64).reshape(-1))
    if not ys:
        return None
    y = np.concatenate(ys)
    if len(np.unique(y)) < 2:
        return None
    return float(roc_auc_score(y, np.concatenate(ss)))


def witness_metrics(
    bag_ids: Sequence[str],
    extra_scores: dict[str, Sequence],
    positive: np.ndarray,
    instance_labels: Callable[[str], np.ndarray | None],
    view: View | None = None,
) -> dict[str, float]:
    """``witness_auc_<kind>`` (within positive bags) for every score kind, and
    ``witness_auc_pooled_<kind>`` for the kinds comparable across bags; ``view``: how the task
    reads a kind (None: ``extra_scores`` are read already, as :func:`task_scores` gives them)."""
    out: dict[str, float] = {}
    scores = extra_scores if view is None else task_scores(extra_scores, view)
    for kind, values in scores.items():
        cols = [score_column(v) for v in values]
        within = witness_auc(bag_ids, cols, positive, instance_labels)
        if within is not None:
            out[f"witness_auc_{kind}"] = within
        if kind in POOLED_KINDS:
            pooled = pooled_witness_auc(bag_ids, cols, instance_labels)
            if pooled is not None:
                out[f"witness_auc_pooled_{kind}"] = pooled
    return out


__all__ = [
    "LOGIT_KINDS",
    "POOLED_KINDS",
    "pooled_witness_auc",
    "score_column",
    "View",
    "task_scores",
    "witness_auc",
    "witness_metrics",
]
