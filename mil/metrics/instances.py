"""Instance-level metrics: how well instance scores rank annotated positive instances."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from sklearn.metrics import roc_auc_score


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


__all__ = ["witness_auc"]
