"""A training step's objective over a loss batch: the task's loss, with SC-MIL's contrastive term
on projected bag embeddings where the task asks for it, in one process or shared out over ranks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from mil.data.batch import collate_bags
from mil.data.dataset import BagDataset
from mil.losses.supcon import ProjectionHead
from mil.models.base import MILModel
from mil.tasks.base import Task
from mil.train.distributed import Dist

#: a loss batch's forward (:class:`mil.train.loop.BatchForward`): logits ``[B, n_out]``, the
#: auxiliary loss, the projected bag embeddings ``[B, P]`` (None without a projection head)
BatchOutput = tuple[Tensor, Tensor | None, Tensor | None]


def projection_head(
    model: MILModel,
    task: Task,
    data: BagDataset,
    train: pd.DataFrame,
    device: torch.device,
    seed: int = 0,
) -> ProjectionHead | None:
    """SC-MIL's projection head (:attr:`Task.supcon`) on the model's bag embedding, whose
    width one training bag's forward pass tells (eval mode, no gradient: no random draw);
    None where the task has no contrastive term. Its initial weights come from ``seed`` alone
    (the same on every rank, and the global random stream, dropout's, left as it was)."""
    if task.supcon is None:
        return None
    was_training = model.training
    model.eval()
    with torch.no_grad():
        batch = collate_bags([data[train["bag_id"].iloc[0]]]).to(device)
        width = model(batch).embedding.shape[1]
    model.train(was_training)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ProjectionHead(width).to(device)


def local_objective(
    task: Task, targets: dict[str, Tensor], out: BatchOutput, progress: float
) -> tuple[Tensor, float]:
    """A loss batch's objective (:meth:`Task.training_objective` plus the auxiliary loss) and
    the loss shown in the history (the task's :meth:`Task.loss` plus the auxiliary loss, the
    same measure as the constant prediction's)."""
    logits, aux, projected = out
    loss = task.loss(logits, targets)
    objective = task.training_objective(loss, targets, projected, progress)
    if aux is not None:
        objective, loss = objective + aux, loss + aux
    return objective, float(loss.detach())


def _with_own_rows(x: Tensor, mine: np.ndarray, n: int, dist: Dist) -> Tensor:
    """Every rank's rows of ``x`` (this rank's: rows ``mine`` of the batch) put together,
    ``[n, ...]``, differentiable through this rank's rows only."""
    full = dist.gather_rows(x if len(mine) else x[:0], n)
    if len(mine):
        full = full.index_put((torch.as_tensor(mine, device=full.device),), x)
    return full


def sharded_objective(
    task: Task,
    targets: dict[str, Tensor],
    out: BatchOutput,
    mine: np.ndarray,
    dist: Dist,
    progress: float,
) -> tuple[Tensor, float]:
    """This rank's objective for a loss batch dealt out across ranks, and the batch's loss.

    The loss (and a contrastive term) is computed over the whole batch (all ranks' bag
    outputs, gathered), differentiable through this rank's bags ``mine`` only; scaled by the
    number of ranks, DDP's gradient average is the one-process gradient. An auxiliary loss
    (a mean over this rank's bags) enters with its share of the batch.
    """
    logits, aux, projected = out
    n = len(targets[next(iter(targets))])
    loss = task.loss(_with_own_rows(logits, mine, n, dist), targets)
    z = None if projected is None else _with_own_rows(projected, mine, n, dist)
    objective = task.training_objective(loss, targets, z, progress)
    aux_share = aux * (len(mine) / n) if aux is not None else None
    objective = objective if aux_share is None else objective + aux_share
    if not len(mine):  # the stand-in bag: in the graph, at weight zero
        objective = objective + 0.0 * logits.sum()
        if projected is not None:
            objective = objective + 0.0 * projected.sum()
    shown = float(loss.detach()) + dist.sum([0.0 if aux_share is None else float(aux_share)])[0]
    return objective * dist.world, shown
