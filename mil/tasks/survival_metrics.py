"""The survival task's fold and pooled metrics: Harrell's and Uno's C-index, time-dependent
AUC, integrated Brier score and log-rank test (scikit-survival, lifelines via
:mod:`mil.metrics.survival`); a mixin of :class:`mil.tasks.survival.SurvivalTask`."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd

from mil.errors import MilWarning
from mil.metrics import bootstrap_ci
from mil.metrics.survival import (
    NanOnDataError,
    breslow_survival,
    c_index,
    c_index_uno,
    discrete_survival_at,
    ibs,
    ibs_times,
    logrank_p,
    pooled_arrays,
    pooled_c_index,
    risk_groups,
    td_auc,
)


class SurvivalWarning(MilWarning):
    """A fold whose data leave a survival metric or early stopping undefined."""


class SurvivalMetrics:
    """:meth:`metrics`, :meth:`pooled_metrics` and :meth:`pooled_ci` of survival predictions
    (``time``, ``event``, ``risk``; ``surv_k`` for the discrete-time loss). The task provides
    ``where``, ``loss_name``, ``n_out``, ``bin_edges`` and ``_edges``."""

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

    def _undefined_as_nan(self, out: dict[str, Any], key: str, quiet: bool = False):
        return NanOnDataError(out, key, None if quiet else self.where, SurvivalWarning)
