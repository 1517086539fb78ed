"""The loss batches of an epoch: shuffled (``train.sampler: random``) or holding every group of
bags in equal number (``balanced``), and the batch size from the rarest group (``auto``)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from mil.errors import ConfigError
from mil.schema import TrainConfig
from mil.tasks.base import Task

#: ``train.batch_size: auto`` (nnMIL's rule): at least this many bags of the rarest group per
#: batch, within these bounds
AUTO_RARE, AUTO_MIN, AUTO_MAX = 3, 16, 48


def auto_batch_size(groups: np.ndarray | None) -> int:
    """``ceil(3 / p_rare)`` clipped to [16, 48], ``p_rare`` the rarest group's share of the
    training bags (:meth:`Task.balance_groups`: a class, an event status); 16 for a task
    without groups (regression)."""
    if groups is None or len(groups) == 0:
        return AUTO_MIN
    counts = np.unique(groups, return_counts=True)[1]
    needed = -(-AUTO_RARE * int(counts.sum()) // int(counts.min()))  # ceil(3 / p_rare), exactly
    return int(np.clip(needed, AUTO_MIN, AUTO_MAX))


def balanced_batches(
    groups: np.ndarray, batch_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Row positions of an epoch's loss batches, each with every group in equal number.

    With ``G`` groups among the ``n`` bags, an epoch has ``ceil(n / batch_size)`` batches (as
    many optimizer steps as the random sampler's, so ``train.min_steps`` and the schedule are
    unchanged), each of ``m = max(1, batch_size // G)`` bags of every group (``m * G`` bags).
    Each group's bags are drawn from its own shuffled cycle: every bag once before any bag
    twice, reshuffled when spent. So a rare group's bags recur within an epoch while a common
    group's bags are each seen at most once (a random share of them, another each epoch).
    """
    groups = np.asarray(groups)
    kinds = np.unique(groups)
    n_batches = max(1, math.ceil(len(groups) / max(batch_size, 1)))
    m = max(1, batch_size // len(kinds))
    draws = []
    for g in kinds:
        members = np.flatnonzero(groups == g)
        cycles = math.ceil(n_batches * m / len(members))
        order = np.concatenate([rng.permutation(members) for _ in range(cycles)])
        draws.append(order[: n_batches * m].reshape(n_batches, m))
    return [rng.permutation(np.concatenate([d[b] for d in draws])) for b in range(n_batches)]


def batch_size(task: Task, train: pd.DataFrame, cfg: TrainConfig) -> int:
    """``train.batch_size``, with ``auto`` resolved on the fold's training bags."""
    if cfg.batch_size == "auto":
        return auto_batch_size(task.balance_groups(train))
    return int(cfg.batch_size)


def sampler(task: Task, train: pd.DataFrame, cfg: TrainConfig) -> str:
    """``train.sampler``, with ``auto`` resolved by the task on the fold's training bags."""
    return task.auto_sampler(train) if cfg.sampler == "auto" else cfg.sampler


def loss_batches(
    task: Task, train: pd.DataFrame, cfg: TrainConfig, rng: np.random.Generator
) -> list[np.ndarray]:
    """Row positions of ``train`` for each loss batch of one epoch (``train.sampler``): the
    task's own shuffled batches (:meth:`Task.batches`), or :func:`balanced_batches` over its
    :meth:`Task.balance_groups`."""
    size = batch_size(task, train, cfg)
    if sampler(task, train, cfg) == "random":
        return task.batches(train, size, rng)
    groups = task.balance_groups(train)
    if groups is None:
        raise ConfigError(
            f"train.sampler: balanced: a {task.name} task has no groups of bags to balance "
            "(classes, or event status); use train.sampler: random"
        )
    return balanced_batches(groups, size, rng)
