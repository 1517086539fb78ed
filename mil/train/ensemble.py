"""A fold's ensemble, in one place: the model's seed replicas (``train.seeds``), the linear
members fitted beside it (``ensemble:``; ``select.members`` under ``select: {mode: inner}``),
under selection the model on the other preprocessing, and the members the fold predicts with
(all of them, or a selection's choice), combined."""

from __future__ import annotations

import dataclasses

import pandas as pd
import torch

from mil.config import other_preprocessing
from mil.splits import Split
from mil.tasks import Task
from mil.train.distributed import Dist
from mil.train.experiment import Experiment
from mil.train.loop import Forward
from mil.train.members import Member, average, combine, fit_members
from mil.train.replicas import average_forwards, replica_name, train_replica
from mil.train.selection import Selection, fitted_members

__all__ = ["fold_ensemble", "seed_replicas"]


def fold_ensemble(
    exp: Experiment,
    task: Task,
    split: Split,
    model_member: Member,
    fwd: Forward,
    bags: tuple[pd.DataFrame, pd.DataFrame | None, pd.DataFrame],
    device: torch.device,
    dist: Dist,
    selection: Selection | None = None,
) -> tuple[list[Member], tuple, Forward]:
    """The fold's ensemble: the model's seed replicas (``train.seeds``; outputs and instance
    scores averaged), then the linear members beside it (``ensemble:``, and ``select.members``
    under selection), combined: all of them, or the members ``selection`` chose
    (:func:`~mil.train.members.combine`). Under selection the model on the other preprocessing
    (:func:`~mil.config.other_preprocessing`) is a member too. Returns the members (none for
    the model alone), the fold's test, training and validation predictions, and the model's
    (replica-averaged) forward of the test bags."""
    cfg = exp.cfg
    if cfg.train.seeds > 1:
        model_member, fwd = seed_replicas(exp, task, split, model_member, fwd, bags, device, dist)
    members = [model_member] if cfg.train.seeds > 1 else []
    preds = (model_member.pred, model_member.train_pred, model_member.val_pred)
    train, val, test = bags
    names = fitted_members(cfg)  # linear models beside the model, averaged with it
    extra = fit_members(exp, task, train, val, test, device, names) if names else []
    alt = other_preprocessing(cfg)
    if alt is not None:  # a selection's candidate (inner and outer folds alike)
        parts = {"train": train, "val": val, "test": test}
        extra.append(train_replica(exp, task, split, 0, parts, device, dist, standardize=alt)[0])
    if extra:
        members = [model_member, *extra]
        chosen = selection.members if selection is not None else [cfg.model_name, *cfg.members]
        preds = combine(task, [m for m in members if m.name in chosen])
    return members, preds, fwd


def seed_replicas(
    exp: Experiment,
    task: Task,
    split: Split,
    first: Member,
    fwd: Forward,
    bags: tuple[pd.DataFrame, pd.DataFrame | None, pd.DataFrame],
    device: torch.device,
    dist: Dist,
) -> tuple[Member, Forward]:
    """The model as the average of ``train.seeds`` replicas (the fold's model first), and
    their averaged instance scores."""
    parts = dict(zip(("train", "val", "test"), bags))
    reps = [dataclasses.replace(first, name=replica_name(first.name, 0))]
    forwards = [fwd]
    for j in range(1, exp.cfg.train.seeds):
        member, f = train_replica(exp, task, split, j, parts, device, dist)
        reps.append(member)
        forwards.append(f)
    model = Member(first.name, *average(task, reps), replicas=reps)
    return model, average_forwards(forwards)
