"""How a fold's parameters move: the optimizer, the learning-rate schedule, the number of steps."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from mil.schema import TrainConfig
from mil.tasks.base import Task
from mil.train.sampling import loss_batches


@dataclass
class Budget:
    """How long a fold trains: ``epochs`` (``train.epochs``, raised to reach
    ``train.min_steps``), the epoch before which early stopping may not stop, and the
    optimizer steps per epoch."""

    epochs: int
    min_epochs: int
    steps_per_epoch: int

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch


def training_budget(task: Task, train: pd.DataFrame, cfg: TrainConfig) -> Budget:
    """The fold's :class:`Budget` (the batches per epoch do not depend on the shuffle)."""
    per_epoch = max(1, len(loss_batches(task, train, cfg, np.random.default_rng(0))))
    epochs, min_epochs = cfg.epochs, cfg.min_epochs
    if cfg.min_steps:
        needed = math.ceil(cfg.min_steps / per_epoch)
        epochs, min_epochs = max(epochs, needed), max(min_epochs, needed)
    return Budget(epochs, min_epochs, per_epoch)


class StepSchedule(torch.optim.lr_scheduler.LambdaLR):
    """A per-step learning-rate factor that knows the fold's budget of ``total_steps``."""

    def __init__(self, opt: torch.optim.Optimizer, factor, total_steps: int) -> None:
        self.total_steps = max(1, int(total_steps))
        super().__init__(opt, factor)

    @property
    def progress(self) -> float:
        """The share of the budget's steps taken (0 to 1): what SC-MIL's schedule follows."""
        return min(1.0, self.last_epoch / self.total_steps)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> StepSchedule:
    """``train.schedule`` as a factor on ``train.lr`` per optimizer step ``s`` (from 0):
    a linear warm-up ``(s + 1) / warmup_steps`` over the first ``warmup_steps``, then 1
    (``constant``) or ``(1 + cos(pi s / total_steps)) / 2`` (``cosine``)."""

    def factor(s: int) -> float:
        warm = min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        if cfg.schedule == "cosine":
            return warm * 0.5 * (1.0 + math.cos(math.pi * min(s, total_steps) / total_steps))
        return warm

    return StepSchedule(opt, factor, total_steps)


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``cfg.optimizer``: AdamW (decoupled decay), Adam (coupled L2), SGD (momentum 0.9, L2)
    or RAdam (coupled L2)."""
    if cfg.optimizer == "radam":
        return torch.optim.RAdam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
