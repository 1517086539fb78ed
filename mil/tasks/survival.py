"""Survival: a Cox or discrete-time hazard head, its loss batches, predictions, metrics and KM curves.

Targets are ``time`` and ``event`` (1 = observed) as :class:`~mil.data.cohort.Cohort`
reads them. Metrics come from scikit-survival (:mod:`mil.metrics.survival`),
Kaplan–Meier curves and log-rank tests from lifelines.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from mil.errors import DataError
from mil.losses import (
    assign_bins,
    cox_batches,
    cox_ph_loss,
    discrete_hazard_nll,
    discrete_survival,
    discrete_time_bins,
)
from mil.metrics.survival import (
    fold_stratified_c_index,
    logrank_p,
    risk_groups,
    risk_scale,
    standardized_risk,
)
from mil.models.base import DEFAULT_SCORE_KIND, SURVIVAL_SCORE_KIND
from mil.plots import km_figure
from mil.tasks.base import Artifacts, FoldTables, LinearHead, Task, TaskRun, as_tensor, logit_kind
from mil.tasks.linear_fits import ALPHA_GRID, cox_head
from mil.tasks.registry import register
from mil.tasks.survival_metrics import SurvivalMetrics, SurvivalWarning
from mil.tasks.survival_words import SurvivalOptions, methods_words
from mil.tasks.targets import SurvivalTargets

# the pooled C-index over pairs within a fold (kept importable from here)
_fold_stratified_c_index = fold_stratified_c_index


#: an external cohort with fewer events is warned about (its C-index says little)
MIN_EVENTS = 10


@register("survival")
class SurvivalTask(SurvivalMetrics, Task):
    """Cox partial likelihood (``task.loss: cox``) or discrete-time hazard NLL (``nll``).

    Cox: one output, the log-hazard ``risk``; every loss batch holds at least
    two events (:func:`cox_batches`), since a risk set without events carries
    no ranking signal. NLL: ``task.bins`` hazard logits over bins cut at
    quantiles of the *training* fold's event times; ``risk = -sum_k S_k``.

    A validation partition without events leaves the validation loss and
    C-index undefined (the Cox loss of a batch without events is identically
    zero; the NLL of censored patients alone rewards low hazards), so such a
    fold is trained for the full ``train.epochs`` without early stopping,
    with a :class:`SurvivalWarning` naming the fold (see
    :meth:`validation_usable`).
    """

    Options = SurvivalOptions
    headline_metrics = ("c_index",)
    report_metrics = ("c_index", "c_index_uno", "td_auc", "ibs")
    outcome_columns = ("time", "event")
    #: the runner also predicts the training bags: Uno's C, the IBS (Breslow
    #: baseline) and the risk-group cut all need the training fold
    needs_train_predictions = True
    strata_description = "event status and time quantile"
    figure_captions = {"km.png": "Kaplan-Meier curves of out-of-fold risk groups."}
    #: the Cox loss grows with the risks' scale and rates warm-up epochs best (docs/benchmarks.md)
    stop_on = "c_index"

    @classmethod
    def default_ensemble(cls, model: type, tables: bool = False) -> list[str]:
        """A slide model is averaged with ``meanpool_linear``, and where the run has tables
        with ``clinical_linear`` too (the tables' ridge Cox risk: a late fusion of risks that
        the slide model alone does not read; docs/benchmarks.md, "Fusion at the library
        defaults")."""
        slides_only = model.trained_by_gradient and not model.uses_tabular
        if not slides_only:
            return []
        return ["meanpool_linear", "clinical_linear"] if tables else ["meanpool_linear"]

    #: survival: the signed share of the risk (an instance logit's sign is relative to an
    #: arbitrary zero of the Cox predictor)
    score_order = (SURVIVAL_SCORE_KIND, "attention_x_logit", DEFAULT_SCORE_KIND)
    linear_penalty = ("alpha", ALPHA_GRID)
    linear_words = "a ridge Cox model (scikit-survival)"

    @classmethod
    def target_reader(cls, options: SurvivalOptions) -> SurvivalTargets:
        return SurvivalTargets()

    def __init__(
        self, options: SurvivalOptions, classes: list[str], run: TaskRun | None = None
    ) -> None:
        super().__init__(options, [], run)
        self.loss_name = self.options.loss
        self.ties = self.options.ties
        self.bin_edges: np.ndarray | None = None
        self.cohort_times: tuple[np.ndarray, np.ndarray] | None = None

    def observe_cohort(self, bags: pd.DataFrame) -> None:
        """With ``task.bins_from: cohort``, keep every bag's time and event for the bins."""
        if self.options.bins_from == "cohort":
            self.cohort_times = (bags["time"].to_numpy(float), bags["event"].to_numpy(int))

    @property
    def n_out(self) -> int:
        return 1 if self.loss_name == "cox" else int(self.options.bins)

    def fit_fold(self, train_bags: pd.DataFrame) -> None:
        event = train_bags["event"].to_numpy(int)
        if self.loss_name == "cox":
            if event.sum() < 2:
                raise DataError(
                    f"{self.where}: the training partition has {int(event.sum())} event(s) among "
                    f"{len(event)} bags; the Cox loss needs at least 2 events per batch. Use fewer "
                    f"folds (splits.folds), more patients, or task.loss: nll"
                )
            return
        times = train_bags["time"].to_numpy(float)
        if self.cohort_times is not None:  # bins_from: cohort (test folds' times included)
            times, event = self.cohort_times
        try:
            self.bin_edges = discrete_time_bins(times, event, self.options.bins)
        except DataError as exc:
            raise DataError(f"{self.where}: {exc} (task.bins = {self.options.bins})") from None

    def constant_logits(self, train_bags: pd.DataFrame) -> np.ndarray:
        """Cox: 0 (every constant risk is as good). NLL: the logit of each bin's hazard in the
        training bags (events in the bin over bags at risk at its start)."""
        if self.loss_name == "cox":
            return np.zeros(1)
        bins = assign_bins(train_bags["time"].to_numpy(float), self._edges())
        event = train_bags["event"].to_numpy(int)
        at_risk = np.array([(bins >= k).sum() for k in range(self.n_out)], float)
        events = np.array([((bins == k) & (event == 1)).sum() for k in range(self.n_out)], float)
        hazard = np.clip((events + 0.5) / (at_risk + 1.0), 1e-4, 1 - 1e-4)
        return np.log(hazard / (1 - hazard))

    def constant_predictions(self, pred: pd.DataFrame) -> str | None:
        risk = pred["risk"].to_numpy(float)
        if len(risk) > 1 and np.ptp(risk) <= 1e-9 * max(1.0, float(np.abs(risk).max())):
            return "every test bag was given the same risk"
        return None

    def state(self) -> dict[str, Any]:
        cuts = None if self.bin_edges is None else self.bin_edges[1:-1].tolist()
        return {"loss": self.loss_name, "ties": self.ties, "bin_cuts": cuts}

    def load_fold_state(self, state: dict[str, Any]) -> None:
        cuts = state.get("bin_cuts")
        if cuts is not None:
            self.bin_edges = np.concatenate([[0.0], np.asarray(cuts, float), [np.inf]])

    def validation_usable(self, val_bags: pd.DataFrame) -> bool:
        """False (with a warning naming the fold) if the validation bags hold no event."""
        if int(val_bags["event"].sum()) > 0:
            return True
        warnings.warn(
            f"{self.where}: the validation partition ({len(val_bags)} bags) has no events, so "
            f"its loss and C-index are undefined and not logged; this fold trains for its whole "
            f"budget (train.epochs, train.min_steps) without early stopping",
            SurvivalWarning,
            stacklevel=2,
        )
        return False

    def batches(
        self, bags: pd.DataFrame, batch_size: int, rng: np.random.Generator
    ) -> list[np.ndarray]:
        if self.loss_name != "cox":
            return super().batches(bags, batch_size, rng)
        return cox_batches(bags["event"].to_numpy(int), batch_size, rng, where=self.where)

    def balance_groups(self, bags: pd.DataFrame) -> np.ndarray:
        """Event status (1: observed): balanced batches hold as many events as censored bags."""
        return bags["event"].to_numpy(int)

    def targets(self, bags: pd.DataFrame) -> dict[str, Tensor]:
        time = bags["time"].to_numpy(float)
        out = {
            # float64: the Cox loss only sorts and compares times, so no ties are invented
            "time": as_tensor(time, torch.float64),
            "event": as_tensor(bags["event"].to_numpy(int), torch.long),
        }
        if self.loss_name == "nll":
            out["bin"] = as_tensor(assign_bins(time, self._edges()), torch.long)
        return out

    def loss(self, logits: Tensor, targets: dict[str, Tensor]) -> Tensor:
        event = targets["event"].to(logits.device)
        if self.loss_name == "cox":
            return cox_ph_loss(
                logits[:, 0], targets["time"].to(logits.device), event, ties=self.ties
            )
        return discrete_hazard_nll(
            logits, targets["bin"].to(logits.device), event, alpha=self.options.alpha
        )

    def outputs(self, logits: np.ndarray) -> pd.DataFrame:
        """``risk`` (+ ``surv_k``: survival after bin k, for the nll loss)."""
        logits = torch.as_tensor(logits, dtype=torch.float64)
        if logits.shape[1] == 1:
            return pd.DataFrame({"risk": logits[:, 0].numpy()})
        d = discrete_survival(logits)
        out = pd.DataFrame({"risk": d["risk"].numpy()})
        for k in range(logits.shape[1]):
            out[f"surv_{k}"] = d["survival"][:, k].numpy()
        return out

    def row_targets(self, bags: pd.DataFrame) -> dict[str, Any]:
        """``fold, time, event``; the rows go on with ``risk`` (+ ``surv_k``: S after bin k,
        for nll)."""
        return {
            "fold": self.fold_name,
            "time": bags["time"].to_numpy(float),
            "event": bags["event"].to_numpy(int),
        }

    def output_scale(self, train_pred: pd.DataFrame | None) -> dict[str, float]:
        """Cox: the training risks' mean and sd (:func:`risk_scale`); NLL: none (probabilities)."""
        return risk_scale(train_pred) if self.loss_name == "cox" and train_pred is not None else {}

    def averaging_words(self) -> str:
        if self.loss_name == "cox":
            return "each risk standardised by its own training-fold risks, then averaged"
        return "survival curves averaged"

    def average_predictions(
        self, members: list[pd.DataFrame], scales: list[dict[str, float]] | None = None
    ) -> pd.DataFrame:
        """Cox: each member's log-hazard standardised by its :meth:`output_scale` (mean 0, sd 1
        on its training fold) before averaging, so no member weighs more for a larger scale;
        NLL: survival curves and risks averaged as they are."""
        if scales is not None:
            members = [standardized_risk(m, **s) if s else m for m, s in zip(members, scales)]
        return super().average_predictions(members)

    def patient_predictions(self, pred: pd.DataFrame) -> pd.DataFrame:
        """Patient-level predictions: risk (and survival) averaged over a patient's bags."""
        cols = ["risk", *[c for c in pred.columns if c.startswith("surv_")]]
        g = pred.groupby("patient_id", sort=False)
        out = g[["fold", "time", "event"]].first().reset_index()
        out[cols] = g[cols].mean().to_numpy()
        out["n_bags"] = g.size().to_numpy()
        return out

    def counts(self, pred: pd.DataFrame) -> dict[str, int]:
        return {"n_events": int(pred["event"].to_numpy(int).sum())}

    def outcome_strata(self, pred: pd.DataFrame) -> np.ndarray:
        return pred["event"].to_numpy(int)

    def positive_bags(self, pred: pd.DataFrame) -> np.ndarray:
        """Every bag: witness AUC is averaged over the bags that hold aggressive tiles at all."""
        return np.ones(len(pred), dtype=bool)

    def test_problem(self, test_bags: pd.DataFrame) -> str | None:
        if test_bags["event"].to_numpy(int).any():
            return None
        return (
            "the test partition has no events, so its survival metrics are undefined; use fewer "
            "folds (splits.folds)"
        )

    def thin_outcome(self, pred: pd.DataFrame) -> str | None:
        events = int(pred.groupby("patient_id")["event"].max().sum())
        if not 0 < events < MIN_EVENTS:
            return None
        n = pred["patient_id"].nunique()
        return (
            f"the external cohort has {events} event{'s' * (events != 1)} among {n} "
            f"patient{'s' * (n != 1)}; its C-index and confidence interval rest on so few events "
            f"that they say little (a CI can look narrow by chance). Add patients with events "
            f"(at least {MIN_EVENTS})"
        )

    @classmethod
    def instance_view(cls, values: np.ndarray, kind: str) -> np.ndarray:
        """A Cox risk is one column already; discrete-time hazard logits (one per bin) become
        their mean over the bins (higher: higher risk)."""
        v = np.asarray(values, dtype=np.float64)
        return v.mean(1, keepdims=True) if logit_kind(kind, v) and v.shape[1] > 1 else v

    def fit_linear(
        self, z: np.ndarray, bags: pd.DataFrame, penalty: float, seed: int
    ) -> LinearHead:
        """A ridge Cox model (the task's ties); for ``nll`` its risk becomes bin hazards
        through the Breslow baseline of the training bags."""
        cuts = None if self.n_out == 1 else np.asarray(self.state()["bin_cuts"], float)
        return cox_head(
            z, bags["time"].to_numpy(float), bags["event"].to_numpy(int), penalty, self.ties, cuts
        )

    def fold_artifacts(self, pred: pd.DataFrame, train_pred: pd.DataFrame | None) -> Artifacts:
        """``risk_groups.csv`` and ``km.png``: test bags cut at the training fold's median risk."""
        if train_pred is None:
            return {}
        groups = risk_groups(pred, train_pred)
        title = f"{self.run.name}, fold {self.fold_name}: test bags by predicted risk"
        return {
            "risk_groups.csv": groups,
            "km.png": km_figure(groups, title, self._time_label()),
        }

    def summary_artifacts(self, folds: FoldTables) -> tuple[dict[str, Any], Artifacts]:
        """Pooled KM curves (``km.png``) of all folds' risk groups, and ``logrank_p_pooled``.

        Each fold's risks are standardised with its own training fold
        (``risk_std``, centred at the training median), so the pooled cut at
        0 is exactly each fold's own cut. With repeated cross-validation only
        the first repeat is pooled, so that every patient counts once.
        """
        parts = list(folds("risk_groups.csv").values())
        if not parts:
            return {}, {}
        pooled = pd.concat(parts, ignore_index=True)
        title = f"{self.run.name}: out-of-fold risk groups, {len(parts)} folds pooled"
        artifacts = {
            "risk_groups.csv": pooled,
            "km.png": km_figure(pooled, title, self._time_label()),
        }
        return {"logrank_p_pooled": logrank_p(pooled)}, artifacts

    def score_column(self) -> str:
        return "risk"

    def describe(self, row: pd.Series) -> str:
        return f"risk {row['risk']:.2f}" if "risk" in row else ""

    def title(self) -> str:
        return "survival prediction"

    def methods(self) -> str:
        return methods_words(self.options)

    def _time_label(self) -> str:
        return self.run.columns.get("time", "time")

    def _edges(self) -> np.ndarray:
        if self.bin_edges is None:
            raise RuntimeError("SurvivalTask.setup_fold must run before the nll targets exist")
        return self.bin_edges
