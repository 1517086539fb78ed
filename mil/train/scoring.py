"""Scoring a fold's model: what its test bags' outputs and instance scores measure."""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from mil.data.dataset import BagDataset
from mil.explain.faithfulness import fold_faithfulness
from mil.metrics.instances import task_scores, witness_auc, witness_metrics
from mil.splits import Split
from mil.tasks import Task
from mil.train.experiment import Experiment
from mil.train.loop import Forward, diverged


def instance_metrics(
    exp: Experiment,
    task: Task,
    model,
    data: BagDataset,
    test: pd.DataFrame,
    fwd: Forward,
    pred: pd.DataFrame,
    device: torch.device,
) -> dict[str, Any]:
    """Witness metrics of the model's instance scores (where instances are labelled) and the
    deletion/insertion curves of its test bags: the model's, whatever the ensemble."""
    cfg, out = exp.cfg, {}
    witness = witness_auc(
        pred["bag_id"].tolist(), fwd.scores, task.positive_bags(pred), exp.data.instance_labels
    )
    if witness is not None:
        out["witness_auc"] = witness
    # score kinds as the task reads them (class evidence, share of the risk): attention.h5 holds these
    fwd.extra_scores = task_scores(fwd.extra_scores, task.instance_view)
    out.update(
        witness_metrics(
            pred["bag_id"].tolist(),
            fwd.extra_scores,
            task.positive_bags(pred),
            exp.data.instance_labels,
        )
    )
    if cfg.train.faithfulness:  # deletion/insertion of the top-scored instances
        test_bags = [data[b] for b in test["bag_id"]]
        out.update(fold_faithfulness(model, test_bags, fwd, task, cfg.train, device))
    return out


def fold_predictions(
    exp: Experiment,
    task: Task,
    split: Split,
    infer,
    history: pd.DataFrame,
    train: pd.DataFrame,
    val: pd.DataFrame | None,
    test: pd.DataFrame,
) -> tuple[pd.DataFrame | None, Forward, pd.DataFrame, pd.DataFrame | None]:
    """The fold model's validation (for the operating point), test (with instance scores and
    the group columns) and training predictions (where the task needs them)."""
    val_pred = None
    if task.needs_val_predictions and val is not None and len(val):  # the operating point
        val_pred = task.predictions(val, infer(val["bag_id"].tolist()).logits.numpy())
        task.fit_operating_point(val_pred)
    fwd = infer(test["bag_id"].tolist(), keep_scores=True)
    if not torch.isfinite(fwd.logits).all():
        epoch = int(history["epoch"].max())
        what = "the model's test outputs are NaN or infinite"
        raise diverged(f"fold {split.name}", epoch, what, exp.cfg.train)
    pred = task.predictions(test, fwd.logits.numpy())
    for col in exp.cohort.group_cols:  # site and subgroup columns, for subgroup metrics
        pred[col] = test[col].to_numpy()
    train_pred = None
    if task.needs_train_predictions:
        train_pred = task.predictions(train, infer(train["bag_id"].tolist()).logits.numpy())
    return val_pred, fwd, pred, train_pred
