"""One path from a fold's model, or a fold ensemble, to its scores.

:func:`score_fold` takes a predictor (:class:`ModelPredictor`: a model in memory and its
fold's view of the bags, as the runner has it; :class:`FoldEnsemble`: saved fold models,
as ``mil evaluate``, :meth:`mil.Run.predict` and the benchmarks have them), the bags, the
task and a :class:`Scoring`; it returns the prediction rows, the task's metrics, the
instance score kinds as the task reads them (what ``attention.h5`` holds), the witness
metrics and the deletion/insertion areas (:mod:`mil.explain.faithfulness`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch

from mil.config import Config
from mil.data.batch import Bag
from mil.data.dataset import BagDataset, FeatureStore
from mil.data.tabular import TabularTable
from mil.explain.faithfulness import faithfulness, predicted_columns
from mil.metrics.instances import task_scores, witness_auc, witness_metrics
from mil.schema import TrainConfig
from mil.splits import Split
from mil.tasks import Task
from mil.train.distributed import SINGLE, Dist
from mil.train.experiment import Experiment
from mil.train.inference import FoldModel, ensemble, predict_with_tables
from mil.train.loop import Forward, diverged, forward_bags, predict

#: a bag's instance labels by bag id (None where its features carry none)
InstanceLabels = Callable[[str], "np.ndarray | None"]


@dataclass
class Scoring:
    """What :func:`score_fold` computes beside the prediction rows."""

    #: the bags' site and subgroup columns, copied into the rows (subgroup metrics)
    group_cols: Sequence[str] = ()
    #: the task's metrics of the rows (bags with outcomes only)
    metrics: bool = True
    #: the instance scores (the forward's), read as the task reads them
    scores: bool = False
    #: witness metrics of the instance scores against these labels (bags with outcomes only)
    instance_labels: InstanceLabels | None = None
    #: deletion/insertion areas of the scores (:func:`fold_faithfulness`)
    faithfulness: bool = False
    #: the kinds the curves follow beside ``main``; None: the task's default heatmap kind
    faithfulness_kinds: Sequence[str] | None = None


@dataclass
class FoldScores:
    """What :func:`score_fold` returns."""

    pred: pd.DataFrame  # one row per bag: ids, outcomes, outputs, groups (ids only: outputs)
    metrics: dict[str, Any]  # the task's, the witness metrics, the deletion/insertion areas
    forward: Forward | None = None  # logits and instance scores (kinds as the task reads them)


class Predictor(Protocol):
    """What :func:`score_fold` asks of a model or a fold ensemble."""

    def forward(self, bag_ids: list[str], keep_scores: bool = False) -> Forward: ...

    def rows(
        self, task: Task, bags: pd.DataFrame | None, bag_ids: list[str], fwd: Forward | None
    ) -> pd.DataFrame: ...

    def logits(self, batch: list[Bag]) -> np.ndarray: ...

    def bags(self, bag_ids: list[str]) -> list[Bag]: ...


def score_fold(
    task: Task,
    predictor: Predictor,
    bags: pd.DataFrame | Sequence[str],
    scoring: Scoring | None = None,
    reference: pd.DataFrame | None = None,
    pred: pd.DataFrame | None = None,
    forward: Forward | None = None,
) -> FoldScores:
    """Predict ``bags`` with ``predictor`` and score them.

    ``bags``: the cohort's rows of the bags (``bag_id``, outcomes, group columns): the rows
    are the task's prediction rows and the metrics the task's (``reference``: the training
    bags' predictions, for a task whose metrics need them); or bag ids alone (new bags, no
    outcomes): the rows are the outputs (``bag_id``, the task's columns, ``n_folds``) and
    only instance-score metrics that need no outcome (faithfulness) are computed.
    ``pred`` and ``forward``: the rows and forward predicted already (the runner's average
    of a fold's ensemble and its model's instance scores), used as they are.
    """
    scoring = scoring or Scoring()
    table = bags if isinstance(bags, pd.DataFrame) else None
    ids = [str(b) for b in (table["bag_id"] if table is not None else bags)]
    want_forward = scoring.scores or scoring.faithfulness
    fwd = None
    if want_forward:  # the model's instance scores
        fwd = forward if forward is not None else predictor.forward(ids, True)
    if pred is None:
        pred = predictor.rows(task, table, ids, fwd)
        for col in scoring.group_cols if table is not None else ():
            pred[col] = table[col].to_numpy()
    metrics: dict[str, Any] = {}
    if table is not None and scoring.metrics:
        metrics.update(task.metrics(pred, reference))
    if fwd is not None:
        labels = scoring.instance_labels if table is not None else None
        metrics.update(instance_metrics(task, pred, fwd, labels))
        if scoring.faithfulness:  # deletion/insertion of the top-scored instances
            metrics.update(
                fold_faithfulness(
                    predictor.logits, predictor.bags(ids), fwd, task, scoring.faithfulness_kinds
                )
            )
    return FoldScores(pred, metrics, fwd)


def instance_metrics(
    task: Task, pred: pd.DataFrame, fwd: Forward, labels: InstanceLabels | None
) -> dict[str, Any]:
    """Witness metrics of the instance scores of ``fwd`` (where ``labels`` are given); the
    score kinds of ``fwd`` are replaced by the task's reading of them (class evidence, share
    of the risk): what ``attention.h5`` holds and the faithfulness curves follow."""
    out: dict[str, Any] = {}
    ids = pred["bag_id"].tolist()
    if labels is not None:
        witness = witness_auc(ids, fwd.scores, task.positive_bags(pred), labels)
        if witness is not None:
            out["witness_auc"] = witness
    fwd.extra_scores = task_scores(fwd.extra_scores, task.instance_view)
    if labels is not None:
        out.update(witness_metrics(ids, fwd.extra_scores, task.positive_bags(pred), labels))
    return out


def fold_faithfulness(
    predict_logits: Callable[[list[Bag]], np.ndarray],
    bags: Sequence[Bag],
    fwd: Forward,
    task: Task,
    extra: Sequence[str] | None = None,
) -> dict[str, float]:
    """:func:`mil.explain.faithfulness.faithfulness` of ``bags`` re-predicted by
    ``predict_logits`` (bags in, logits ``[n, n_out]`` out) for the model's main score
    (``main``) and the default heatmap score (its kind's name; or the kinds ``extra``
    names), each read at the bag's predicted class. ``fwd``: the forward of ``bags`` with
    scores (its logits are the whole bags')."""
    kinds = {} if fwd.scores is None else {"main": fwd.scores}
    if extra is None:
        extra = [k for k in task.score_order if k in fwd.extra_scores][:1]
    kinds.update({k: fwd.extra_scores[k] for k in extra if k in fwd.extra_scores})
    if not kinds or not len(bags):
        return {}
    logits = fwd.logits.numpy()
    columns = {k: predicted_columns(v, logits, task) for k, v in kinds.items()}
    return faithfulness(predict_logits, bags, columns, task, full_logits=logits)


# ---- predictors -----------------------------------------------------------------------------


class ModelPredictor:
    """A model in memory and its fold's view of the bags (the fold's preprocessing applied):
    the runner's freshly trained model, or one of its seed replicas."""

    def __init__(
        self,
        model: torch.nn.Module,
        data: BagDataset,
        train: TrainConfig,
        device: torch.device,
        dist: Dist = SINGLE,
    ) -> None:
        self.model, self.data, self.train, self.device, self.dist = model, data, train, device, dist

    def forward(self, bag_ids: list[str], keep_scores: bool = False) -> Forward:
        return predict(
            self.model,
            self.data,
            bag_ids,
            max_instances=self.train.max_instances,
            device=self.device,
            keep_scores=keep_scores,
            precision=self.train.precision,
            dist=self.dist,
        )

    def rows(
        self, task: Task, bags: pd.DataFrame | None, bag_ids: list[str], fwd: Forward | None
    ) -> pd.DataFrame:
        logits = (fwd or self.forward(bag_ids)).logits.numpy()
        if bags is not None:
            return task.predictions(bags, logits)
        out = task.outputs(logits)
        out.insert(0, "bag_id", bag_ids)
        return out

    def logits(self, batch: list[Bag]) -> np.ndarray:
        self.model.eval()
        with torch.no_grad():
            out = forward_bags(
                self.model,
                batch,
                self.train.max_instances,
                self.device,
                precision=self.train.precision,
            )
        return out.logits.cpu().numpy()

    def bags(self, bag_ids: list[str]) -> list[Bag]:
        return [self.data[b] for b in bag_ids]


class FoldEnsemble:
    """Saved fold models (:class:`~mil.train.inference.FoldModel`, each applying its own
    fold's preprocessing, seed replicas and linear members) on bags given as slides of a
    feature store: the mean of their outputs (:func:`~mil.train.inference.ensemble`).

    ``tabular``: the bags' tables laid out as the run's; or ``run_config``: the run's own
    tables, by patient (:func:`~mil.train.inference.predict_with_tables`). ``per_fold``: the
    rows of bag ids alone are one per bag and fold. Instance scores and re-predictions
    (faithfulness) are those of a single model: the ensemble of one fold."""

    def __init__(
        self,
        models: Sequence[FoldModel],
        bag_slides: Mapping[str, list[str]],
        store: FeatureStore,
        tabular: TabularTable | None = None,
        run_config: Config | None = None,
        per_fold: bool = False,
    ) -> None:
        self.models, self.bag_slides, self.store = list(models), dict(bag_slides), store
        self.tabular, self.run_config, self.per_fold = tabular, run_config, per_fold

    def _slides(self, bag_ids: list[str]) -> dict[str, list[str]]:
        return {b: self.bag_slides[b] for b in bag_ids}

    def _one(self) -> FoldModel:
        if len(self.models) != 1:
            raise ValueError("instance scores are a single fold model's: give one")
        return self.models[0]

    def outputs(self, bag_ids: list[str], per_fold: bool = False) -> pd.DataFrame:
        """``bag_id``, the task's columns and ``n_folds`` (``per_fold``: ``fold`` instead)."""
        slides = self._slides(bag_ids)
        if self.run_config is not None:
            return predict_with_tables(self.models, slides, self.store, per_fold, self.run_config)
        return ensemble(self.models, slides, self.store, per_fold, self.tabular)

    def forward(self, bag_ids: list[str], keep_scores: bool = False) -> Forward:
        return self._one().forward(self._slides(bag_ids), self.store, keep_scores, self.tabular)

    def rows(
        self, task: Task, bags: pd.DataFrame | None, bag_ids: list[str], fwd: Forward | None
    ) -> pd.DataFrame:
        """With outcomes: the columns of a fold's ``predictions.csv`` holding the ensemble's
        mean outputs, then ``n_folds``; the decisions at ``task``'s operating point."""
        if bags is None:
            return self.outputs(bag_ids, self.per_fold)
        mean = self.outputs(bag_ids).set_index("bag_id").loc[bags["bag_id"]]
        pred = task.predictions(bags, np.zeros((len(bags), task.n_out)))  # ids and outcomes
        for col in mean.columns:
            pred[col] = mean[col].to_numpy()
        return task.with_operating_point(pred)  # binary: the class at the ensemble's threshold

    def logits(self, batch: list[Bag]) -> np.ndarray:
        """Bags of raw features (as :meth:`bags` gives them) through the fold model's
        :meth:`~mil.train.inference.FoldModel.forward` (its preprocessing; a graph model's
        graph built afresh on the instances given; a fusion model's tables missing)."""
        ids = [f"variant_{i}" for i in range(len(batch))]  # the variants share their bag's id
        store = _InMemory(dict(zip(ids, batch)))
        return self._one().forward({i: [i] for i in ids}, store).logits.numpy()

    def bags(self, bag_ids: list[str]) -> list[Bag]:
        raw = BagDataset(self._slides(bag_ids), self.store)  # the fold model preprocesses
        return [raw[b] for b in bag_ids]


class _InMemory(FeatureStore):
    """Bags as a feature store: one 'slide' per bag, nothing read from disk."""

    def __init__(self, bags: dict[str, Bag]) -> None:
        super().__init__({})
        self.bags = bags

    def get(self, slide_id: str):
        bag = self.bags[slide_id]
        return bag.x, bag.coords, {}


# ---- the runner's fold ----------------------------------------------------------------------


def fold_predictions(
    exp: Experiment,
    task: Task,
    split: Split,
    model: ModelPredictor,
    history: pd.DataFrame,
    train: pd.DataFrame,
    val: pd.DataFrame | None,
    test: pd.DataFrame,
) -> tuple[pd.DataFrame | None, Forward, pd.DataFrame, pd.DataFrame | None]:
    """The fold model's validation (for the operating point), test (with instance scores and
    the group columns) and training predictions (where the task needs them)."""
    val_pred = None
    if task.needs_val_predictions and val is not None and len(val):  # the operating point
        val_pred = model.rows(task, val, val["bag_id"].tolist(), None)
        task.fit_operating_point(val_pred)
    fwd = model.forward(test["bag_id"].tolist(), keep_scores=True)
    if not torch.isfinite(fwd.logits).all():
        epoch = int(history["epoch"].max())
        what = "the model's test outputs are NaN or infinite"
        raise diverged(f"fold {split.name}", epoch, what, exp.cfg.train)
    pred = model.rows(task, test, test["bag_id"].tolist(), fwd)
    for col in exp.cohort.group_cols:  # site and subgroup columns, for subgroup metrics
        pred[col] = test[col].to_numpy()
    train_pred = None
    if task.needs_train_predictions:
        train_pred = model.rows(task, train, train["bag_id"].tolist(), None)
    return val_pred, fwd, pred, train_pred


def fold_scoring(exp: Experiment) -> Scoring:
    """How the runner scores a fold's test bags: its model's instance scores (witness metrics,
    faithfulness where ``train.faithfulness``)."""
    return Scoring(
        group_cols=exp.cohort.group_cols,
        scores=True,
        instance_labels=exp.data.instance_labels,
        faithfulness=exp.cfg.train.faithfulness,
    )
