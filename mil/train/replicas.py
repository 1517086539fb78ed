"""Seed ensembles (``train.seeds: N``): N copies of a fold's model trained from different seeds
(initial weights, batch order, dropout and subsampling draws) on the same bags, their outputs
averaged (:meth:`mil.tasks.Task.average_predictions`, each replica on its own training scale)
and their instance scores averaged, so that one draw of the seed does not decide a result.

Replica 0 is the fold's model itself (``model.pt``, seed ``train.seed``); replica ``j`` trains
with ``train.seed + REPLICA_SEED * j`` and is saved as a member of the fold's ensemble
(:mod:`mil.results.members`, ``members/<model>_seed<j>/``).
"""

from __future__ import annotations

import dataclasses

import pandas as pd
import torch

from mil.splits import Split
from mil.tasks import Task
from mil.train.distributed import SINGLE, Dist
from mil.train.experiment import Experiment
from mil.train.loop import Forward, fit, predict
from mil.train.members import Member

#: seed offset between replicas (a prime, far from the fold offsets of the runner)
REPLICA_SEED = 100_003


def replica_name(model: str, j: int) -> str:
    """The member name of replica ``j`` of ``model``."""
    return f"{model}_seed{j}"


def train_replica(
    exp: Experiment,
    task: Task,
    split: Split,
    j: int,
    bags: dict[str, pd.DataFrame | None],
    device: torch.device,
    dist: Dist = SINGLE,
    standardize: tuple[str, bool | str] | None = None,
) -> tuple[Member, Forward]:
    """Replica ``j`` of the fold's model, trained on ``bags["train"]`` (validated on
    ``bags["val"]``) as the model is, and its predictions of the fold's partitions (test with
    instance scores, training and validation where the task needs them). ``standardize``:
    (member name, preprocessing): the model on another preprocessing instead (a selection's
    candidate; ``j`` 0 for the model's own seed)."""
    cfg = exp.cfg
    seed = cfg.train.seed + REPLICA_SEED * j
    train, val, test = bags["train"], bags["val"], bags["test"]
    torch.manual_seed(seed + split.fold + 1000 * split.repeat)
    how = None if standardize is None else standardize[1]
    model, norm, data = exp.fold_setup(task, train["bag_id"].tolist(), standardize=how)
    model = model.to(device)
    if dist.enabled:
        torch.manual_seed(seed + split.fold + 1000 * split.repeat + 7919 * dist.rank)
    history, _ = fit(
        model,
        task,
        data,
        train,
        val,
        dataclasses.replace(cfg.train, seed=seed),
        device,
        progress=exp.progress,
        desc=f"fold {split.name} " + (f"seed {j}" if standardize is None else standardize[0]),
        dist=dist,
    )

    def infer(frame: pd.DataFrame, scores: bool = False) -> Forward:
        ids = frame["bag_id"].tolist()
        return predict(
            model,
            data,
            ids,
            cfg.train.max_instances,
            device,
            keep_scores=scores,
            precision=cfg.train.precision,
            dist=dist,
        )

    fwd = infer(test, scores=True)
    pred = task.predictions(test, fwd.logits.numpy())
    for col in exp.cohort.group_cols:
        pred[col] = test[col].to_numpy()
    train_pred = (
        task.predictions(train, infer(train).logits.numpy())
        if task.needs_train_predictions
        else None
    )
    val_pred = None
    if task.needs_val_predictions and val is not None and len(val):
        val_pred = task.predictions(val, infer(val).logits.numpy())
    name = replica_name(cfg.model_name, j) if standardize is None else standardize[0]
    member = Member(name, pred, train_pred, val_pred, model, norm, history)
    member.arch = (cfg.model_name, cfg.model_hparams)
    return member, fwd


def average_forwards(forwards: list[Forward]) -> Forward:
    """The replicas' instance scores (main and every extra kind) averaged bag by bag; the
    logits are the first's (predictions are averaged on the task's scale elsewhere)."""
    first = forwards[0]

    def mean(parts: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        return [torch.stack(list(bag)).mean(0) for bag in zip(*parts)]

    scores = None if first.scores is None else mean([f.scores for f in forwards])
    extra = {k: mean([f.extra_scores[k] for f in forwards]) for k in first.extra_scores}
    return Forward(logits=first.logits, aux_loss=None, scores=scores, extra_scores=extra)
