"""Deletion and insertion curves: do a score's top instances carry the bag's prediction?

Faithfulness without instance labels (after Petsiuk et al.'s RISE deletion and
insertion metrics, with tiles for pixels): rank a bag's instances by a score,
then predict the bag again

- *deletion*: without its top ``ceil(f N)`` instances, for each fraction ``f``;
- *insertion*: from its top ``ceil(f N)`` instances only (at least one).

The curve follows the model's evidence for what it predicted on the whole bag, as
the task measures it (:meth:`mil.tasks.Task.evidence`: classification, the
probability of that class; survival, the risk, or the mean hazard logit of a
discrete-time model; regression, the prediction). A score whose top instances carry the
prediction makes the deletion curve fall fast (a low area) and the insertion
curve rise fast (a high area); random orders give the reference.

A fold's model (or a saved fold model) is measured by
:func:`mil.train.scoring.fold_faithfulness`, through :func:`mil.train.scoring.score_fold`;
nothing here knows the training loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from mil.data.batch import Bag
from mil.tasks import Task
from mil.tasks import get as get_task

#: fractions of a bag's instances removed (deletion) or kept (insertion)
FRACTIONS: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.2)

#: a batch of bags -> their logits ``[n, n_out]``
Predict = Callable[[list[Bag]], np.ndarray]
#: the task whose evidence the curves follow: a task, its class, or its registered name
TaskLike = Task | type[Task] | str


def as_task(task: TaskLike) -> Task | type[Task]:
    """A task's class for its registered name (``"classification"``), else ``task``."""
    return get_task(task) if isinstance(task, str) else task


def subset(bag: Bag, keep: np.ndarray) -> Bag:
    """The bag restricted to rows ``keep`` (its instance graph restricted and relabelled)."""
    keep_t = torch.as_tensor(np.sort(keep), dtype=torch.long)
    edge_index = None
    if bag.edge_index is not None:
        from torch_geometric.utils import subgraph

        edge_index, _ = subgraph(keep_t, bag.edge_index, relabel_nodes=True, num_nodes=len(bag))
    coords = None if bag.coords is None else bag.coords[keep_t]
    return Bag(bag_id=bag.bag_id, x=bag.x[keep_t], coords=coords, edge_index=edge_index)


def evidence(logits: np.ndarray, task: TaskLike, cls: np.ndarray | None = None) -> np.ndarray:
    """``[n]``: the task's evidence for output ``cls[i]`` (:meth:`mil.tasks.Task.evidence`;
    classification: the softmax probability of that class, by default the most probable;
    otherwise the mean of the outputs: a Cox risk, hazard logits, a prediction)."""
    return as_task(task).evidence(np.asarray(logits, dtype=np.float64), cls)


def curves(
    predict: Predict,
    bags: Sequence[Bag],
    scores: Sequence[np.ndarray],
    task: TaskLike,
    mode: str = "deletion",
    fractions: Sequence[float] = FRACTIONS,
    full_logits: np.ndarray | None = None,
) -> np.ndarray:
    """``[B, F]``: each bag's evidence for its whole-bag prediction along ``fractions``.

    ``scores[i]`` ``[N_i]`` ranks bag ``i``'s instances (highest first; ties by row).
    ``mode``: ``"deletion"`` (drop the top ``ceil(f N)``, keeping at least one
    instance) or ``"insertion"`` (keep the top ``max(1, ceil(f N))``). ``full_logits``: the
    whole bags' logits, when known (else predicted here).
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode={mode!r}: use 'deletion' or 'insertion'")
    full = np.asarray(predict(list(bags)) if full_logits is None else full_logits)
    task = as_task(task)
    cls = task.faithfulness_target(full)
    variants, owner = [], []
    for i, (bag, s) in enumerate(zip(bags, scores)):
        n = len(bag)
        order = np.lexsort((np.arange(n), -np.asarray(s, dtype=np.float64)))
        for f in fractions:
            k = math.ceil(f * n - 1e-9)
            keep = order[min(k, n - 1) :] if mode == "deletion" else order[: max(1, k)]
            variants.append(subset(bag, keep))
            owner.append(i)
    out = evidence(np.asarray(predict(variants)), task, None if cls is None else cls[owner])
    return out.reshape(len(bags), len(fractions))


def area(curve: np.ndarray, fractions: Sequence[float] = FRACTIONS) -> float:
    """The mean level of curves ``[B, F]`` over the fractions (trapezoids), averaged over bags."""
    f = np.asarray(fractions, dtype=np.float64)
    c = np.atleast_2d(np.asarray(curve, dtype=np.float64))
    widths = np.diff(f)
    per_bag = ((c[:, 1:] + c[:, :-1]) / 2 * widths).sum(1) / (f[-1] - f[0])
    return float(per_bag.mean())


def faithfulness(
    predict: Predict,
    bags: Sequence[Bag],
    kinds: dict[str, Sequence[np.ndarray]],
    task: TaskLike,
    seed: int = 0,
    full_logits: np.ndarray | None = None,
) -> dict[str, float]:
    """``deletion_<kind>`` and ``insertion_<kind>`` areas for every kind of ``kinds``
    (``[N_i]`` scores per bag), and for a random order of each bag (``<kind>`` = ``random``)."""
    rng = np.random.default_rng(seed)
    kinds = {**kinds, "random": [rng.random(len(b)) for b in bags]}
    out: dict[str, float] = {}
    for kind, scores in kinds.items():
        for mode in ("deletion", "insertion"):
            c = curves(predict, bags, scores, task, mode, full_logits=full_logits)
            out[f"{mode}_{kind}"] = area(c)
    return out


def predicted_columns(values: Sequence, logits: np.ndarray, task: TaskLike) -> list[np.ndarray]:
    """Each bag's scores ``[N_i]`` or ``[N_i, K]`` as one column: the column of the output the
    task's curve follows (:meth:`mil.tasks.Task.faithfulness_target`: the predicted class) for
    a kind with a column per output, else the only (first) column."""
    z = np.asarray(logits)
    target = as_task(task).faithfulness_target(z)
    out = []
    for i, v in enumerate(values):
        v = np.asarray(v, dtype=np.float64)
        if v.ndim == 2 and target is not None and v.shape[1] == z.shape[1] > 1:
            v = v[:, int(target[i])]
        out.append(v if v.ndim == 1 else v[:, 0])
    return out


__all__ = [
    "FRACTIONS",
    "area",
    "as_task",
    "curves",
    "evidence",
    "faithfulness",
    "predicted_columns",
    "subset",
]
