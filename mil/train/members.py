"""A fold's ensemble (``ensemble: [meanpool_linear]``): linear models fitted on the fold's
training bags beside the model, and the average of their predictions with the model's.

Each member's outputs are put on a common scale first (:meth:`mil.tasks.Task.output_scale`,
fitted on the member's own training-fold predictions: Cox risks standardised), then
averaged with equal weights (:meth:`mil.tasks.Task.average_predictions`); a binary operating
point is fitted anew on the averaged validation predictions. The model's instance scores
(heatmaps) stay the model's own. Files: :mod:`mil.results.members`.
"""

from __future__ import annotations

from dataclasses import dataclass
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

__all__ = ["Member", "average", "fit_members", "refit_members", "write_members"]


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

    def scale(self, task: Task) -> dict[str, float]:
        return task.output_scale(self.train_pred)


def fit_members(
    exp: Experiment,
    task: Task,
    train: pd.DataFrame,
    val: pd.DataFrame | None,
    test: pd.DataFrame,
    device: torch.device,
) -> list[Member]:
    """Fit each linear model of ``ensemble:`` on the training bags (penalty chosen on the
    validation bags, as a baseline run chooses it) and predict the fold's partitions."""
    out = []
    for name in exp.cfg.members:
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
    main: tuple[torch.nn.Module, BagDataset],
    penalties: dict[str, float],
    device: torch.device,
) -> list[Member]:
    """A refit's ensemble: the refit model (``main``: it and its view of the bags) and each
    linear member fitted on every bag at ``penalties[name]`` (cross-validation's choice),
    with every member's training predictions for its scale."""
    limit = exp.cfg.train.max_instances
    want = task.needs_train_predictions
    out = [
        Member(
            exp.cfg.model_name,
            None,
            _rows(*main, task, bags, limit, device) if want else None,
            None,
        )
    ]
    for name in exp.cfg.members:
        model, norm, data = exp.fold_setup(task, bags["bag_id"].tolist(), member=name)
        history = fit_closed_form(model, task, data, bags, None, exp.cfg.train, (penalties[name],))
        model = model.to(device)
        train_pred = _rows(model, data, task, bags, limit, device) if want else None
        out.append(Member(name, None, train_pred, None, model=model, norm=norm, history=history))
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


def write_members(fold_dir: Path, exp: Experiment, task: Task, members: list[Member]) -> None:
    """Each member's predictions (and a linear member's model and history) under
    ``members/<name>/``, then ``members.json`` naming them, their model files and scales."""
    entries: list[dict[str, Any]] = []
    for m in members:
        folder = member_dir(fold_dir, m.name)
        folder.mkdir(parents=True, exist_ok=True)
        for name, frame in (
            (PREDICTIONS, m.pred),
            (PREDICTIONS_TRAIN, m.train_pred),
            (PREDICTIONS_VAL, m.val_pred),
        ):
            if frame is not None:
                write_csv(folder / name, frame)
        model_file = MODEL
        if m.model is not None:
            write_csv(folder / HISTORY, m.history)
            save_model(folder / MODEL, exp.checkpoint(task, m.name, {}, m.model.state_dict(), m.norm))
            model_file = str((folder / MODEL).relative_to(fold_dir))
        entries.append({"name": m.name, "model": model_file, "scale": m.scale(task)})
    write_json(fold_dir / MEMBERS_JSON, {"combine": "mean", "members": entries})
