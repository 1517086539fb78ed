"""Deletion and insertion curves: do a score's top instances carry the bag's prediction?

Faithfulness without instance labels (after Petsiuk et al.'s RISE deletion and
insertion metrics, with tiles for pixels): rank a bag's instances by a score,
then predict the bag again

- *deletion*: without its top ``ceil(f N)`` instances, for each fraction ``f``;
- *insertion*: from its top ``ceil(f N)`` instances only (at least one).

The curve follows the model's evidence for what it predicted on the whole bag
(classification: the probability of that class; survival: the risk, or the mean
hazard logit of a discrete-time model). A score whose top instances carry the
prediction makes the deletion curve fall fast (a low area) and the insertion
curve rise fast (a high area); random orders give the reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from mil.data.batch import Bag
from mil.models.base import default_score_order

#: fractions of a bag's instances removed (deletion) or kept (insertion)
FRACTIONS: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.2)

#: a batch of bags -> their logits ``[n, n_out]``
Predict = Callable[[list[Bag]], np.ndarray]


def subset(bag: Bag, keep: np.ndarray) -> Bag:
    """The bag restricted to rows ``keep`` (its instance graph restricted and relabelled)."""
    keep_t = torch.as_tensor(np.sort(keep), dtype=torch.long)
    edge_index = None
    if bag.edge_index is not None:
        from torch_geometric.utils import subgraph

        edge_index, _ = subgraph(keep_t, bag.edge_index, relabel_nodes=True, num_nodes=len(bag))
    coords = None if bag.coords is None else bag.coords[keep_t]
    return Bag(bag_id=bag.bag_id, x=bag.x[keep_t], coords=coords, edge_index=edge_index)


def evidence(logits: np.ndarray, task_type: str, cls: np.ndarray | None = None) -> np.ndarray:
    """``[n]``: classification, the softmax probability of class ``cls[i]`` (default: the
    most probable); otherwise the mean of the outputs (a Cox risk, or hazard logits)."""
    z = np.asarray(logits, dtype=np.float64)
    if task_type != "classification":
        return z.mean(1)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    cls = p.argmax(1) if cls is None else np.asarray(cls)
    return p[np.arange(len(p)), cls]


def curves(
    predict: Predict,
    bags: Sequence[Bag],
    scores: Sequence[np.ndarray],
    task_type: str,
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
    cls = full.argmax(1) if task_type == "classification" else None
    variants, owner = [], []
    for i, (bag, s) in enumerate(zip(bags, scores)):
        n = len(bag)
        order = np.lexsort((np.arange(n), -np.asarray(s, dtype=np.float64)))
        for f in fractions:
            k = math.ceil(f * n - 1e-9)
            keep = order[min(k, n - 1) :] if mode == "deletion" else order[: max(1, k)]
            variants.append(subset(bag, keep))
            owner.append(i)
    out = evidence(np.asarray(predict(variants)), task_type, None if cls is None else cls[owner])
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
    task_type: str,
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
            c = curves(predict, bags, scores, task_type, mode, full_logits=full_logits)
            out[f"{mode}_{kind}"] = area(c)
    return out


def predicted_columns(values: Sequence, logits: np.ndarray, task_type: str) -> list[np.ndarray]:
    """Each bag's scores ``[N_i]`` or ``[N_i, K]`` as one column: the bag's predicted class's
    for a classification kind with a column per class, else the only (first) column."""
    z = np.asarray(logits)
    out = []
    for i, v in enumerate(values):
        v = np.asarray(v, dtype=np.float64)
        if v.ndim == 2 and task_type == "classification" and v.shape[1] == z.shape[1] > 1:
            v = v[:, int(z[i].argmax())]
        out.append(v if v.ndim == 1 else v[:, 0])
    return out


def fold_faithfulness(
    model,
    bags: Sequence[Bag],
    fwd,
    task_type: str,
    train,
    device: torch.device,
    extra: Sequence[str] | None = None,
) -> dict[str, float]:
    """:func:`faithfulness` of a fold's test ``bags`` under its ``model`` (eval mode) for the
    model's main score (``main``) and the default heatmap score (its kind's name; or the kinds
    ``extra`` names), each read at the bag's predicted class. ``fwd``: the
    :class:`~mil.train.loop.Forward` of ``bags`` (with scores); ``train``: the run's ``train``
    section (compute chunk, precision)."""
    from mil.train.loop import forward_bags

    def predict(batch: list[Bag]) -> np.ndarray:
        with torch.no_grad():
            out = forward_bags(model, batch, train.max_instances, device, precision=train.precision)
        return out.logits.cpu().numpy()

    kinds = {} if fwd.scores is None else {"main": fwd.scores}
    if extra is None:
        extra = [k for k in default_score_order(task_type) if k in fwd.extra_scores][:1]
    kinds.update({k: fwd.extra_scores[k] for k in extra if k in fwd.extra_scores})
    if not kinds or not len(bags):
        return {}
    model.eval()
    logits = fwd.logits.numpy()
    columns = {k: predicted_columns(v, logits, task_type) for k, v in kinds.items()}
    return faithfulness(predict, bags, columns, task_type, full_logits=logits)


__all__ = [
    "FRACTIONS",
    "area",
    "curves",
    "evidence",
    "faithfulness",
    "fold_faithfulness",
    "predicted_columns",
    "subset",
]
