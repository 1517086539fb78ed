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

from mil.errors import DataError, MilWarning
from mil.losses import (
    assign_bins,
    cox_batches,
    cox_ph_loss,
    discrete_hazard_nll,
    discrete_survival,
    discrete_time_bins,
)
from mil.metrics import bootstrap_ci
from mil.metrics.survival import (
    NanOnDataError,
    breslow_survival,
    c_index,
    c_index_uno,
    discrete_survival_at,
    fold_stratified_c_index,
    ibs,
    ibs_times,
    logrank_p,
    pooled_arrays,
    pooled_c_index,
    risk_groups,
    risk_scale,
    standardized_risk,
    td_auc,
)
from mil.plots import km_figure
from mil.schema import Config
from mil.tasks.base import Artifacts, FoldTables, Task, as_tensor
from mil.tasks.registry import register
from mil.tasks.survival_words import methods_words

# the pooled C-index over pairs within a fold (kept importable from here)
_fold_stratified_c_index = fold_stratified_c_index


class SurvivalWarning(MilWarning):
    """A fold whose data leave a survival metric or early stopping undefined."""


@register("survival")
class SurvivalTask(Task):
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

    target_kind = "survival"
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
    def default_ensemble(cls, model: type) -> list[str]:
        """A slide model is averaged with ``meanpool_linear`` (docs/benchmarks.md)."""
        slides_only = model.trained_by_gradient and not model.uses_tabular
        return ["meanpool_linear"] if slides_only else []

    def __init__(self, cfg: Config, classes: list[str]) -> None:
        super().__init__(cfg, [])
        self.loss_name = cfg.task.loss
        self.ties = cfg.task.ties
        self.bin_edges: np.ndarray | None = None
        self.cohort_times: tuple[np.ndarray, np.ndarray] | None = None

    def observe_cohort(self, bags: pd.DataFrame) -> None:
        """With ``task.bins_from: cohort``, keep every bag's time and event for the bins."""
        if self.cfg.task.bins_from == "cohort":
            self.cohort_times = (bags["time"].to_numpy(float), bags["event"].to_numpy(int))

    @property
    def n_out(self) -> int:
        return 1 if self.loss_name == "cox" else int(self.cfg.task.bins)

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
            self.bin_edges = discrete_time_bins(times, event, self.cfg.task.bins)
        except DataError as exc:
            raise DataError(f"{self.where}: {exc} (task.bins = {self.cfg.task.bins})") from None

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
            f"its loss and C-index are undefined and not logged; this fold trains for the full "
            f"train.epochs = {self.cfg.train.epochs} without early stopping",
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
            logits, targets["bin"].to(logits.device), event, alpha=self.cfg.task.alpha
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

    def predictions(self, bags: pd.DataFrame, logits: np.ndarray) -> pd.DataFrame:
        """``bag_id, patient_id, fold, time, event, risk`` (+ ``surv_k``: S after bin k, for nll)."""
        out = pd.DataFrame(
            {
                "bag_id": bags["bag_id"].values,
                "patient_id": bags["patient_id"].values,
                "fold": self.fold_name,
                "time": bags["time"].to_numpy(float),
                "event": bags["event"].to_numpy(int),
            }
        )
        values = self.outputs(logits)
        for col in values.columns:
            out[col] = values[col].to_numpy()
        return out

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

    def metrics(self, pred: pd.DataFrame, train_pred: pd.DataFrame | None = None) -> dict[str, Any]:
        """Harrell's C; with the training fold's predictions also Uno's C, td-AUC, IBS, log-rank p.

        Without ``train_pred`` (validation during training) only ``c_index``,
        NaN where undefined. A test fold where a metric is undefined (no
        events, no event before the training follow-up ends, …) gets NaN and
        a :class:`SurvivalWarning`, so one small fold does not stop a run.
        """
        time, event, risk = (pred[c].to_numpy(float) for c in ("time", "event", "risk"))
        validating = train_pred is None
        nan = float("nan")
        out: dict[str, Any] = {}
        if not validating and event.sum() == 0:
            warnings.warn(
                f"{self.where}: the test partition ({len(pred)} bags) has no events; its "
                "survival metrics are undefined (NaN). Use fewer folds (splits.folds)",
                SurvivalWarning,
                stacklevel=2,
            )
            names = ("c_index", "c_index_uno", "c_index_uno_tau", "td_auc", "ibs", "logrank_p")
            return dict.fromkeys(names, nan)
        with self._undefined_as_nan(out, "c_index", quiet=validating):
            out["c_index"] = c_index(time, event, risk)
        if validating:
            return out
        tr_time, tr_event = (train_pred[c].to_numpy(float) for c in ("time", "event"))
        out["c_index_uno"], out["c_index_uno_tau"] = nan, nan
        with self._undefined_as_nan(out, "c_index_uno"):
            uno = c_index_uno(tr_time, tr_event, time, event, risk)
            out["c_index_uno"], out["c_index_uno_tau"] = uno["c_index"], uno["tau"]
        with self._undefined_as_nan(out, "td_auc"):
            auc = td_auc(tr_time, tr_event, time, event, risk)
            out["td_auc"] = auc["auc"]
            out["td_auc_times"] = auc["times"].tolist()
        with self._undefined_as_nan(out, "ibs"):
            times = ibs_times(tr_time, tr_event, time)
            surv = self.survival_at(pred, train_pred, times)
            out["ibs"] = ibs(tr_time, tr_event, time, event, surv, times)
            out["ibs_times"] = times.tolist()
        groups = risk_groups(pred, train_pred)
        out["logrank_p"] = logrank_p(groups)
        if self.bin_edges is not None:
            out["bin_cuts"] = self.bin_edges[1:-1].tolist()
        return out

    def survival_at(
        self, pred: pd.DataFrame, train_pred: pd.DataFrame, times: np.ndarray
    ) -> np.ndarray:
        """Survival ``[n, len(times)]`` of ``pred``'s bags.

        Cox: Breslow baseline fitted on the training fold's predicted risks.
        NLL: the product of ``1 - hazard`` up to each time's bin.
        """
        if self.loss_name == "cox":
            return breslow_survival(
                train_pred["risk"].to_numpy(float),
                train_pred["time"].to_numpy(float),
                train_pred["event"].to_numpy(int),
                pred["risk"].to_numpy(float),
                times,
            )
        cols = [f"surv_{k}" for k in range(self.n_out)]
        return discrete_survival_at(pred[cols].to_numpy(float), self._edges(), times)

    def pooled_metrics(self, pred: pd.DataFrame) -> dict[str, float]:
        """Harrell's C of pooled out-of-fold predictions, over pairs within a fold.

        Risks of different folds come from different models (a Cox risk is
        defined only up to a shift), so the statistic compares pairs within a
        fold only: concordant / comparable pairs summed over folds.
        """
        return pooled_c_index(*pooled_arrays(pred))

    def pooled_ci(
        self, pred: pd.DataFrame, n_boot: int = 1000, seed: int = 0
    ) -> dict[str, tuple[float, float]]:
        """Bootstrap 95% CI of :meth:`pooled_metrics`, resampling patients."""
        return bootstrap_ci(
            pooled_c_index,
            *pooled_arrays(pred),
            n_boot=n_boot,
            seed=seed,
            groups=pred["patient_id"].astype(str).to_numpy(),
        )

    def counts(self, pred: pd.DataFrame) -> dict[str, int]:
        return {"n_events": int(pred["event"].to_numpy(int).sum())}

    def outcome_strata(self, pred: pd.DataFrame) -> np.ndarray:
        return pred["event"].to_numpy(int)

    def positive_bags(self, pred: pd.DataFrame) -> np.ndarray:
        """Every bag: witness AUC is averaged over the bags that hold aggressive tiles at all."""
        return np.ones(len(pred), dtype=bool)

    def fold_artifacts(self, pred: pd.DataFrame, train_pred: pd.DataFrame | None) -> Artifacts:
        """``risk_groups.csv`` and ``km.png``: test bags cut at the training fold's median risk."""
        if train_pred is None:
            return {}
        groups = risk_groups(pred, train_pred)
        title = f"{self.cfg.name}, fold {self.fold_name}: test bags by predicted risk"
        return {
            "risk_groups.csv": groups,
            "km.png": km_figure(groups, title, self.cfg.data.time_col),
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
        title = f"{self.cfg.name}: out-of-fold risk groups, {len(parts)} folds pooled"
        artifacts = {
            "risk_groups.csv": pooled,
            "km.png": km_figure(pooled, title, self.cfg.data.time_col),
        }
        return {"logrank_p_pooled": logrank_p(pooled)}, artifacts

    def score_column(self) -> str:
        return "risk"

    def describe(self, row: pd.Series) -> str:
        return f"risk {row['risk']:.2f}" if "risk" in row else ""

    def title(self) -> str:
        return "survival prediction"

    def methods(self) -> str:
        return methods_words(self.cfg.task)

    def _edges(self) -> np.ndarray:
        if self.bin_edges is None:
            raise RuntimeError("SurvivalTask.setup_fold must run before the nll targets exist")
        return self.bin_edges

    def _undefined_as_nan(self, out: dict[str, Any], key: str, quiet: bool = False):
        return NanOnDataError(out, key, None if quiet else self.where, SurvivalWarning)
