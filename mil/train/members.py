"""A fold's ensemble (``ensemble: [meanpool_linear]``): linear models fitted on the fold's
training bags beside the model, and the average of their predictions with the model's.

Each member's outputs are put on a common scale first (:meth:`mil.tasks.Task.output_scale`,
fitted on the member's own training-fold predictions: Cox risks standardised), then
averaged with equal weights (:meth:`mil.tasks.Task.average_predictions`); a binary operating
point is fitted anew on the averaged validation predictions. The model's instance scores
(heatmaps) stay the model's own. Files: :mod:`mil.results.members`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from mil.data.dataset import BagDataset
from mil.data.transforms import Standardizer
from mil.io import write_csv, write_json
from mil.results import HISTORY, MODEL, PREDICTIONS, PREDICTIONS_TRAIN, PREDICTIONS_VAL
from mil.results.checkpoint import save_model
from mil.results.members import MEMBERS_JSON, member_dir
from mil.tasks import Task
from mil.train.closed_form import fit_closed_form
from mil.train.experiment import Experiment
from mil.train.loop import predict

__all__ = ["Member", "average", "combine", "fit_members", "refit_members", "write_members"]


@dataclass
class Member:
    """One model of a fold's ensemble: its predictions of the fold's partitions and, for a
    linear member, what its files hold (the model itself leaves ``model`` None: its weights
    are the fold's ``model.pt``)."""

    name: str
    pred: pd.DataFrame | None  # None in a refit (no test bags)
    train_pred: pd.DataFrame | None
    val_pred: pd.DataFrame | None
    model: torch.nn.Module | None = None
    norm: Standardizer | None = None
    history: pd.DataFrame | None = None
    #: the model's seed replicas (``train.seeds``), the model itself first; the member's
    #: predictions are then their average
    replicas: list[Member] = field(default_factory=list)
    #: what rebuilds ``model``: its registered name and hyper-parameters (default: ``name``, {})
    arch: tuple[str, dict[str, Any]] | None = None

    def scale(self, task: Task) -> dict[str, float]:
        return task.output_scale(self.train_pred)


def fit_members(
    exp: Experiment,
    task: Task,
    train: pd.DataFrame,
    val: pd.DataFrame | None,
    test: pd.DataFrame,
    device: torch.device,
    names: list[str] | None = None,
) -> list[Member]:
    """Fit each linear model of ``names`` (default ``ensemble:``'s) on the training bags
    (penalty chosen on the validation bags, as a baseline run chooses it) and predict the
    fold's partitions."""
    out = []
    for name in exp.cfg.members if names is None else names:
        model, norm, data = exp.fold_setup(task, train["bag_id"].tolist(), member=name)
        history = fit_closed_form(model, task, data, train, val, exp.cfg.train)
        model = model.to(device)
        wanted = (True, task.needs_train_predictions, task.needs_val_predictions)
        preds = [
            _rows(model, data, task, bags, exp.cfg.train.max_instances, device) if want else None
            for bags, want in zip((test, train, val), wanted)
        ]
        out.append(Member(name, *preds, model=model, norm=norm, history=history))
    return out


def _rows(
    model, data, task: Task, bags: pd.DataFrame | None, max_instances: int, device
) -> pd.DataFrame | None:
    """``task.predictions`` of ``bags`` by ``model`` (None for no bags)."""
    if bags is None or not len(bags):
        return None
    fwd = predict(model, data, bags["bag_id"].tolist(), max_instances, device)
    return task.predictions(bags, fwd.logits.numpy())


def refit_members(
    exp: Experiment,
    task: Task,
    bags: pd.DataFrame,
    replicas: list[tuple[torch.nn.Module, Standardizer | None, BagDataset, pd.DataFrame]],
    penalties: dict[str, float],
    device: torch.device,
    names: list[str] | None = None,
    alternative: tuple[str, Any] | None = None,
) -> list[Member]:
    """A refit's ensemble: the refit model (``replicas``: it, then its seed replicas, each as
    (model, preprocessing, view of the bags, history)), each linear member fitted on every
    bag at ``penalties[name]`` (cross-validation's choice) and ``alternative`` (name, (model,
    preprocessing, view, history)): the model on the other preprocessing a selection chose;
    with every one's training predictions for its scale."""
    limit, want = exp.cfg.train.max_instances, task.needs_train_predictions
    name = exp.cfg.model_name
    reps = []
    for j, (model, norm, data, history) in enumerate(replicas):
        train_pred = _rows(model, data, task, bags, limit, device) if want else None
        member = Member(f"{name}_seed{j}", None, train_pred, None)
        if j:  # the first is the refit's own model.pt
            member.model, member.norm, member.history = model, norm, history
            member.arch = (name, exp.cfg.model_hparams)
        reps.append(member)
    if len(reps) == 1:
        out = [dataclasses.replace(reps[0], name=name)]
    else:
        out = [Member(name, None, average(task, reps)[1], None, replicas=reps)]
    for member in exp.cfg.members if names is None else names:
        model, norm, data = exp.fold_setup(task, bags["bag_id"].tolist(), member=member)
        history = fit_closed_form(
            model, task, data, bags, None, exp.cfg.train, (penalties[member],)
        )
        model = model.to(device)
        train_pred = _rows(model, data, task, bags, limit, device) if want else None
        out.append(Member(member, None, train_pred, None, model=model, norm=norm, history=history))
    if alternative is not None:
        alt, (model, norm, data, history) = alternative
        train_pred = _rows(model, data, task, bags, limit, device) if want else None
        out.append(Member(alt, None, train_pred, None, model=model, norm=norm, history=history))
        out[-1].arch = (name, exp.cfg.model_hparams)
    return out


def average(
    task: Task, members: list[Member]
) -> tuple[pd.DataFrame, pd.DataFrame | None, pd.DataFrame | None]:
    """The members' average test, training and validation predictions (the last two where
    every member has them); a binary operating point fitted on the averaged validation ones."""
    scales = [m.scale(task) for m in members]

    def mean(parts: list[pd.DataFrame | None]) -> pd.DataFrame | None:
        return None if any(p is None for p in parts) else task.average_predictions(parts, scales)

    val = mean([m.val_pred for m in members])
    if val is not None:
        task.fit_operating_point(val)
        val = task.with_operating_point(val)
    return mean([m.pred for m in members]), mean([m.train_pred for m in members]), val


def combine(
    task: Task, members: list[Member]
) -> tuple[pd.DataFrame, pd.DataFrame | None, pd.DataFrame | None]:
    """The fold's predictions from the members it predicts with: the :func:`average` of
    several, or one member's own (its operating point fitted on its validation predictions),
    as :class:`mil.train.inference.FoldModel` predicts new bags."""
    if len(members) > 1:
        return average(task, members)
    m = members[0]
    if m.val_pred is None:
        return m.pred, m.train_pred, None
    task.fit_operating_point(m.val_pred)
    return task.with_operating_point(m.pred), m.train_pred, task.with_operating_point(m.val_pred)


def write_members(
    fold_dir: Path,
    exp: Experiment,
    task: Task,
    members: list[Member],
    chosen: list[str] | None = None,
) -> None:
    """Each member's predictions (and a linear member's or a seed replica's model and history)
    under ``members/<name>/``, then ``members.json`` naming them, their model files and scales
    (a member with seed replicas lists them under ``replicas``), and ``chosen``: the members
    whose average the fold predicts with (all of them unless ``select:`` chose)."""
    entries = []
    for m in members:
        entry = _write_member(fold_dir, exp, task, m)
        if m.replicas:
            entry["replicas"] = [_write_member(fold_dir, exp, task, r) for r in m.replicas]
        entries.append(entry)
    record: dict[str, Any] = {"combine": "mean", "members": entries}
    if chosen is not None:
        record["chosen"] = list(chosen)
    write_json(fold_dir / MEMBERS_JSON, record)


def _write_member(fold_dir: Path, exp: Experiment, task: Task, m: Member) -> dict[str, Any]:
    folder = member_dir(fold_dir, m.name)
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame in (
        (PREDICTIONS, m.pred),
        (PREDICTIONS_TRAIN, m.train_pred),
        (PREDICTIONS_VAL, m.val_pred),
    ):
        if frame is not None:
            write_csv(folder / name, frame)
    model_file = MODEL  # the fold's own model.pt
    if m.model is not None:
        write_csv(folder / HISTORY, m.history)
        arch, hparams = m.arch or (m.name, {})
        save_model(
            folder / MODEL, exp.checkpoint(task, arch, hparams, m.model.state_dict(), m.norm)
        )
        model_file = str((folder / MODEL).relative_to(fold_dir))
    return {"name": m.name, "model": model_file, "scale": m.scale(task)}
