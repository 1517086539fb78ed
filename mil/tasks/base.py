"""The task interface: every hook the runner, summary, report, comparison and ``mil.Run`` use.

A task is one subclass of :class:`Task` registered under its ``task.type``
(:func:`mil.tasks.registry.register`). Every hook is declared here with a
default, so callers never probe for optional methods.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from mil.data.targets import Targets
from mil.metrics.instances import LOGIT_KINDS
from mil.models.base import DEFAULT_SCORE_KIND

#: what a task's artifact hooks return: file name -> a table (CSV) or a matplotlib Figure (PNG)
Artifacts = dict[str, Any]
#: given a fold file name (e.g. ``"predictions.csv"``), that table of every fold of the first
#: repeat, by fold name: how a task reads its folds back without knowing the run folder
FoldTables = Callable[[str], dict[str, pd.DataFrame]]
#: a closed-form linear head: ``weight [k, D]``, ``bias [k]`` and, for a head that turns one
#: linear predictor into ``n_out`` outputs, its per-output offsets (else None)
LinearHead = tuple[np.ndarray, np.ndarray, np.ndarray | None]


@dataclass
class NoOptions:
    """The options of a task that declares none (``task:`` holds only ``type``)."""


@dataclass(frozen=True)
class TaskRun:
    """What a task knows of its run besides its own options: words for titles and messages.

    ``name``: the run's name (figure titles); ``source``: the config file (messages);
    ``bag_level``: what a bag is (``slide``, ``patient``); ``columns``: the cohort column each
    target comes from (``{"time": "survival_months"}``, axis labels); ``validated``: the folds
    have an inner validation split."""

    name: str = "run"
    source: str = "<dict>"
    bag_level: str = "slide"
    columns: dict[str, str] = field(default_factory=dict)
    validated: bool = True


class Task:
    """Owns its targets and turns head outputs into a loss, predictions, metrics and artifacts.

    Before any fold, :meth:`target_reader` says what the cohort reads as targets (columns,
    checks, fold strata); the task's own ``task:`` keys are its :attr:`Options`. A task is
    built with its options, the classes and a :class:`TaskRun` (:func:`mil.tasks.make_task`), never
    the whole config. Per fold the runner calls :meth:`setup_fold` with the training bags, then
    :meth:`batches`, :meth:`targets` and :meth:`loss` while training, and
    :meth:`predictions` and :meth:`metrics` on the test bags; :meth:`fold_artifacts`
    and :meth:`patient_predictions` give the fold's extra files. The summary
    pools the folds with :meth:`pooled_metrics`, :meth:`pooled_ci`,
    :meth:`counts` and :meth:`summary_artifacts`. The closed-form linear baselines fit the
    task's :meth:`fit_linear`; instance scores are read through :meth:`instance_view` and
    :attr:`score_order`, and deletion/insertion curves follow :meth:`evidence`.
    """

    #: the ``task.type`` it is registered under (set by the registry)
    name = "task"
    #: the task's own ``task:`` keys: a dataclass whose fields are typed and checked like a
    #: config section (:func:`mil.schema.build_section`); ``__post_init__`` checks values
    #: (a ``ValueError`` becomes a config error naming the file)
    Options: type = NoOptions
    #: ``task:`` keys and values that configs saved before tasks owned their options hold for
    #: every run (another task's defaults under a key this task may declare too): read as
    #: absent, so such a saved config still loads
    saved_defaults: dict[str, Any] = {}
    #: metrics that compare runs, headline first (comparison tables, paired and subgroup tests)
    headline_metrics: tuple[str, ...] = ()
    #: metrics shown first in reports, in this order (the rest follow alphabetically)
    report_metrics: tuple[str, ...] = ()
    #: prediction columns that hold the outcome (two runs are paired only where they agree)
    outcome_columns: tuple[str, ...] = ()
    #: the runner also predicts the training bags and passes them to :meth:`metrics`
    needs_train_predictions = False
    #: how the folds are stratified, in the report's words
    strata_description = "class"
    #: run-level figures of :meth:`summary_artifacts` shown in the report, with their captions
    figure_captions: dict[str, str] = {}
    #: the epoch ``train.stop_on: auto`` keeps: the lowest validation ``"loss"``, or the highest
    #: validation value of a headline metric
    stop_on = "loss"

    @classmethod
    def default_ensemble(cls, model: type, tables: bool = False) -> list[str]:
        """The linear models ``ensemble: auto`` averages with a model of class ``model``
        (``tables``: the run has ``data.tabular``)."""
        return []

    @classmethod
    def stop_criterion(cls, stop_on: str) -> tuple[str, int]:
        """``train.stop_on`` as a history column and a sign (+1: higher is better)."""
        name = cls.stop_on if stop_on == "auto" else stop_on
        return ("val_loss", -1) if name == "loss" else (f"val_{name}", 1)

    @classmethod
    def target_reader(cls, options: Any) -> Targets:
        """What the cohort reads as this task's targets (:class:`~mil.data.targets.Targets`):
        by default class labels from ``data.label_col``."""
        from mil.tasks.targets import LabelTargets

        return LabelTargets()

    def __init__(self, options: Any, classes: list[str], run: TaskRun | None = None) -> None:
        self.options = options if options is not None else self.Options()
        self.classes = list(classes)
        self.run = run if run is not None else TaskRun()
        #: the fold being run ("" outside a fold), named in messages and predictions
        self.fold_name = ""

    @classmethod
    def headline(cls) -> str:
        """The metric that compares runs (``auc``, ``c_index``)."""
        return cls.headline_metrics[0]

    @property
    def n_out(self) -> int:
        raise NotImplementedError

    @property
    def where(self) -> str:
        """The fold, for messages."""
        return f"fold {self.fold_name}" if self.fold_name != "" else "this fold"

    # ---- one fold -----------------------------------------------------------------------

    def setup_fold(self, train_bags: pd.DataFrame, fold_name: str | None = None) -> None:
        """Start a fold: remember its name and fit fold state on the training bags."""
        if fold_name is not None:
            self.fold_name = fold_name
        self.fit_fold(train_bags)

    def fit_fold(self, train_bags: pd.DataFrame) -> None:
        """Fit fold-dependent state (class weights, survival bins) on the training bags."""

    def observe_cohort(self, bags: pd.DataFrame) -> None:
        """Every bag of the cohort, before any fold. Nothing may be fitted on them by default;
        a task option that reproduces a published (leaky) protocol may read them."""

    def state(self) -> dict[str, Any]:
        """Fold state saved beside the model weights (plain Python types)."""
        return {}

    def load_fold_state(self, state: dict[str, Any]) -> None:
        """Take back what scoring a fold's saved predictions needs from its :meth:`state`
        (survival: the bins); a decision threshold is fitted anew, not taken."""

    #: the task's decision rule fitted on validation predictions (binary classification's
    #: threshold: :class:`mil.tasks.operating_point.OperatingPoint`), or None; the four
    #: members below only hand on to it
    operating_point: Any = None

    @property
    def needs_val_predictions(self) -> bool:
        """Whether the runner predicts the validation bags (with the kept weights) for
        :meth:`fit_operating_point` and writes them to ``predictions_val.csv``."""
        return self.operating_point is not None and self.operating_point.applies

    def fit_operating_point(self, val_pred: pd.DataFrame) -> None:
        """Fit the operating point on the validation predictions."""
        if self.operating_point is not None:
            self.operating_point.fit(val_pred)

    def ensemble_operating_point(self, fold_metrics: list[dict[str, Any]]) -> None:
        """Set the fold ensemble's operating point from the folds' ``metrics.json`` metrics."""
        if self.operating_point is not None:
            self.operating_point.from_folds(fold_metrics)

    def with_operating_point(self, pred: pd.DataFrame) -> pd.DataFrame:
        """``pred`` with the decisions at the operating point, where the task has one."""
        return pred if self.operating_point is None else self.operating_point.apply(pred)

    def validation_usable(self, val_bags: pd.DataFrame) -> bool:
        """Whether the validation bags can drive early stopping (survival: some event)."""
        return True

    def batches(
        self, bags: pd.DataFrame, batch_size: int, rng: np.random.Generator
    ) -> list[np.ndarray]:
        """Row positions of ``bags`` for each loss batch of one epoch (shuffled)."""
        order = rng.permutation(len(bags))
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

    def auto_sampler(self, bags: pd.DataFrame) -> str:
        """``train.sampler: auto`` on a fold's training ``bags``: ``random`` or ``balanced``."""
        return "random"

    def balance_groups(self, bags: pd.DataFrame) -> np.ndarray | None:
        """Each bag's group ``[len(bags)]`` (a class, an event status) that ``train.sampler:
        balanced`` puts in equal number in every loss batch and ``train.batch_size: auto``
        sizes batches by; None: the task has none (regression)."""
        return None

    def targets(self, bags: pd.DataFrame) -> dict[str, Tensor]:
        raise NotImplementedError

    def constant_logits(self, train_bags: pd.DataFrame) -> np.ndarray:
        """The best constant head output ``[n_out]`` on the training bags: what a model that
        learned nothing from the instances would predict. Its loss is the yardstick of the
        under-training diagnostic (:mod:`mil.train.diagnostics`)."""
        return np.zeros(self.n_out)

    def constant_predictions(self, pred: pd.DataFrame) -> str | None:
        """Why the test predictions are (nearly) the same for every bag, or None if they differ."""
        return None

    def model_targets(self, targets: dict[str, Tensor]) -> Tensor | None:
        """Class labels handed to models with instance-level losses (CLAM), else None."""
        return None

    def loss(self, logits: Tensor, targets: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    #: SC-MIL's contrastive term (:class:`mil.losses.supcon.SupCon`), or None: no projection head
    supcon: Any = None

    def training_objective(
        self, loss: Tensor, targets: dict[str, Tensor], projected: Tensor | None, progress: float
    ) -> Tensor:
        """What a training step minimises, from the batch's :meth:`loss`: that loss, or (with
        :attr:`supcon`) its mix with the contrastive loss of the projected bag embeddings
        ``[B, P]`` at ``progress`` (the share of the training budget done, 0 to 1)."""
        return loss

    # ---- predictions and metrics ------------------------------------------------------------

    def outputs(self, logits: np.ndarray) -> pd.DataFrame:
        """The prediction columns of head outputs ``[B, n_out]`` (probabilities, risk, ...)."""
        raise NotImplementedError

    def row_targets(self, bags: pd.DataFrame) -> dict[str, Any]:
        """The columns of a prediction row that hold what was to be predicted (``label``,
        ``time``/``event``, ``target``, ...), in order; :meth:`predictions` writes them
        between the ids and :meth:`outputs`."""
        raise NotImplementedError

    def predictions(self, bags: pd.DataFrame, logits: np.ndarray) -> pd.DataFrame:
        """One row per bag: ``bag_id, patient_id``, :meth:`row_targets` and :meth:`outputs`."""
        out = pd.DataFrame(
            {"bag_id": bags["bag_id"].values, "patient_id": bags["patient_id"].values}
        )
        for col, values in self.row_targets(bags).items():
            out[col] = values
        values = self.outputs(logits)
        for col in values.columns:
            out[col] = values[col].to_numpy()
        return out

    def mean_outputs(self, rows: pd.DataFrame, by: str) -> pd.DataFrame:
        """:meth:`outputs` rows averaged within groups of column ``by`` (a fold ensemble)."""
        cols = [
            c
            for c in rows.columns
            if c not in (by, "fold") and pd.api.types.is_numeric_dtype(rows[c])
        ]
        return rows.groupby(by, sort=False)[cols].mean().reset_index()

    def output_columns(self) -> list[str]:
        """The numeric columns of :meth:`outputs` (probabilities, risk): what averages average."""
        out = self.outputs(np.zeros((1, self.n_out)))
        return [c for c in out.columns if pd.api.types.is_numeric_dtype(out[c])]

    def output_scale(self, train_pred: pd.DataFrame | None) -> dict[str, float]:
        """What puts a model's outputs on a common scale before averaging, fitted on its
        training-fold predictions (``{}``: they are averaged as they are)."""
        return {}

    def averaging_words(self) -> str:
        """How :meth:`average_predictions` combines, for the report."""
        return "outputs averaged"

    def average_predictions(
        self, members: list[pd.DataFrame], scales: list[dict[str, float]] | None = None
    ) -> pd.DataFrame:
        """Several predictors' rows of the same bags as one (an average of settings or models):
        :meth:`output_columns` averaged, each member's rows matched to the first's by
        ``bag_id``; ids, outcomes and group columns from the first. ``scales``: each member's
        :meth:`output_scale`, where a task puts outputs on a common scale first."""
        cols = self.output_columns()
        first = members[0]
        values = []
        for m in members:
            m = m.set_index("bag_id")
            if len(m) != len(first) or not m.index.isin(first["bag_id"]).all():
                raise ValueError("the predictors to average hold different bags")
            values.append(m.loc[first["bag_id"], cols].to_numpy(float))
        out = first.copy()
        out[cols] = np.mean(values, axis=0)
        return out

    def patient_predictions(self, pred: pd.DataFrame) -> pd.DataFrame | None:
        """Patient-level predictions (``predictions_patient.csv``); None: no such file."""
        return None

    def metrics(self, pred: pd.DataFrame, train_pred: pd.DataFrame | None = None) -> dict[str, Any]:
        """Scalar metrics (and extras such as a confusion matrix) of one fold's predictions."""
        raise NotImplementedError

    def pooled_metrics(self, pred: pd.DataFrame) -> dict[str, float]:
        """Metrics of pooled out-of-fold predictions: the statistics :meth:`pooled_ci` bootstraps."""
        return {}

    def metric_value(self, pred: pd.DataFrame, name: str) -> float:
        """One metric of :meth:`pooled_metrics` (NaN where undefined, e.g. a one-class resample;
        its warnings are silenced): what paired comparisons and permutation tests resample. A
        task may compute it alone, faster."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(self.pooled_metrics(pred).get(name, float("nan")))

    def pooled_ci(
        self, pred: pd.DataFrame, n_boot: int = 1000, seed: int = 0
    ) -> dict[str, tuple[float, float]]:
        """Bootstrap 95% CIs of the metrics over pooled out-of-fold predictions."""
        return {}

    def counts(self, pred: pd.DataFrame) -> dict[str, int]:
        """Outcome counts of some predictions (bags per class, or events), for subgroup tables."""
        return {}

    def outcome_strata(self, pred: pd.DataFrame) -> np.ndarray:
        """Per-row outcome stratum (class, event status) within which permutation tests shuffle."""
        return np.zeros(len(pred), dtype=int)

    def positive_bags(self, pred: pd.DataFrame) -> np.ndarray:
        """Which bags can hold positive instances (for instance-level AUC)."""
        return np.ones(len(pred), dtype=bool)

    def score_column(self) -> str | None:
        """The prediction column that ranks bags from most to least positive (or at risk):
        the slides ``mil heatmap --top-n`` draws. None: the task ranks no bags."""
        return None

    def describe(self, row: pd.Series) -> str:
        """One prediction row in a few words, for a heatmap's title (``P(tumour) = 0.93``)."""
        return ""

    def test_problem(self, test_bags: pd.DataFrame) -> str | None:
        """Why a fold's test bags cannot carry the metrics (``mil check`` warns), or None."""
        return None

    def thin_outcome(self, pred: pd.DataFrame) -> str | None:
        """Why an external cohort's outcomes cannot carry the metrics (one class, a handful of
        events), for ``mil evaluate``'s warning after the cohort's name; None if they can."""
        return None

    # ---- instance scores ----------------------------------------------------------------------

    #: the score kinds ``"default"`` reads, first the one a model has: the heatmaps' default
    #: (chosen by benchmarks/localization.py, docs/benchmarks.md)
    score_order: tuple[str, ...] = (DEFAULT_SCORE_KIND, "contribution", "attention_x_logit")

    @classmethod
    def instance_view(cls, values: np.ndarray, kind: str) -> np.ndarray:
        """One bag's scores of ``kind`` ``[N, K]`` (a column per head output) as the task reads
        them: what ``attention.h5``, witness AUCs and heatmaps use. By default as they are."""
        return np.asarray(values, dtype=np.float64)

    @classmethod
    def faithfulness_target(cls, logits: np.ndarray) -> np.ndarray | None:
        """``[n]``: the head output each bag's deletion/insertion curve follows (a class), or
        None: the mean of the outputs (:meth:`evidence`)."""
        return None

    @classmethod
    def evidence(cls, logits: np.ndarray, target: np.ndarray | None = None) -> np.ndarray:
        """``[n]``: the model's evidence for its prediction of each bag (what faithfulness
        curves follow): by default the mean of the outputs (a Cox risk, a prediction)."""
        return np.asarray(logits, dtype=np.float64).mean(1)

    # ---- the closed-form linear baselines (meanpool_linear, bow_linear) ----------------------

    #: the penalty of :meth:`fit_linear`: its name in ``history.csv`` and the grid tried (empty:
    #: the task has no closed-form linear fit)
    linear_penalty: tuple[str, tuple[float, ...]] = ("", ())
    #: that model in the report's words (``ridge regression (scikit-learn)``)
    linear_words = ""

    def fit_linear(
        self, z: np.ndarray, bags: pd.DataFrame, penalty: float, seed: int
    ) -> LinearHead:
        """The penalised linear model of the task on standardised bag vectors ``z [B, D]``
        (scikit-learn / scikit-survival), whose head outputs :meth:`loss` reads."""
        raise NotImplementedError

    # ---- files beside the predictions, and the report -----------------------------------------

    def fold_artifacts(self, pred: pd.DataFrame, train_pred: pd.DataFrame | None) -> Artifacts:
        """Extra files of a fold folder (e.g. survival's ``risk_groups.csv``, ``km.png``)."""
        return {}

    def summary_artifacts(self, folds: FoldTables) -> tuple[dict[str, Any], Artifacts]:
        """Run-level results for ``summary.json`` and files of the run folder (pooled ROC or
        Kaplan–Meier curves), from the first repeat's fold files."""
        return {}, {}

    def title(self) -> str:
        """What the run does, for the report's heading (``slide classification``)."""
        return self.name

    def methods(self) -> str:
        """The report's sentences on the loss and the metrics."""
        return ""


def as_tensor(values: np.ndarray, dtype: torch.dtype) -> Tensor:
    return torch.as_tensor(np.asarray(values), dtype=dtype)


def logit_kind(kind: str, values: np.ndarray) -> bool:
    """Whether scores of ``kind`` hold a column per head output (class logits, a share of them)."""
    return kind in LOGIT_KINDS and np.ndim(values) == 2
