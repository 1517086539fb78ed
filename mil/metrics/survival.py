"""Survival metrics: thin wrappers over scikit-survival with input checks and IPCW-safe times.

Every function takes plain arrays (``time``, ``event`` with 1 = observed) and
builds scikit-survival's structured arrays itself. The IPCW metrics (Uno's
C-index, time-dependent AUC, integrated Brier score) estimate the censoring
distribution on the *training* fold, which only covers times up to
:func:`ipcw_tau`; see there for how later test times are handled.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import pandas as pd
from sksurv.linear_model.coxph import BreslowEstimator
from sksurv.metrics import (
    concordance_index_censored,
    concordance_index_ipcw,
    cumulative_dynamic_auc,
    integrated_brier_score,
)
from sksurv.nonparametric import CensoringDistributionEstimator
from sksurv.util import Surv

from mil.errors import DataError


def c_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C-index of ``risk [n]`` (higher = earlier event), via scikit-survival."""
    time, event = check_survival(time, event, "test")
    risk = _check_values(risk, len(time), "risk")
    with _as_data_error("Harrell's C-index"):
        return float(concordance_index_censored(event, time, risk)[0])


def ipcw_tau(train_time: np.ndarray, train_event: np.ndarray) -> float:
    """The latest time the training fold's censoring distribution covers.

    Rule: the last training follow-up time, or, if the censoring survival
    ``G(t) = P(C > t)`` (Kaplan–Meier on the training fold, censorings as
    events) reaches zero earlier, the first time it does. Strictly below this
    tau, ``G > 0`` and inverse-probability weights exist; scikit-survival
    raises for test events at or after it.
    """
    train_time, train_event = check_survival(train_time, train_event, "train")
    cens = CensoringDistributionEstimator().fit(Surv.from_arrays(train_event, train_time))
    zero = cens.unique_time_[cens.prob_ <= 0]
    return float(min(train_time.max(), zero.min() if len(zero) else np.inf))


def c_index_uno(
    train_time: np.ndarray,
    train_event: np.ndarray,
    time: np.ndarray,
    event: np.ndarray,
    risk: np.ndarray,
    tau: float | None = None,
) -> dict[str, float]:
    """Uno's IPCW C-index truncated at ``tau``: ``{"c_index", "tau"}``.

    The censoring distribution comes from the training fold. ``tau`` defaults
    to :func:`ipcw_tau` of the training fold; test pairs are compared only
    for events strictly before ``tau`` (scikit-survival's truncation). A
    ``tau`` beyond the training follow-up is a :class:`DataError`.
    """
    train_time, train_event = check_survival(train_time, train_event, "train")
    time, event = check_survival(time, event, "test")
    risk = _check_values(risk, len(time), "risk")
    limit = ipcw_tau(train_time, train_event)
    if tau is None:
        tau = limit
    elif not 0 < tau <= limit:
        raise DataError(
            f"tau={tau} is outside (0, {limit}]: the training fold's censoring distribution "
            "only covers times up to its last follow-up"
        )
    with _as_data_error("Uno's C-index"):
        value = concordance_index_ipcw(
            Surv.from_arrays(train_event, train_time), Surv.from_arrays(event, time), risk, tau=tau
        )[0]
    return {"c_index": float(value), "tau": float(tau)}


def td_auc(
    train_time: np.ndarray,
    train_event: np.ndarray,
    time: np.ndarray,
    event: np.ndarray,
    risk: np.ndarray,
    quantiles: Sequence[float] = (0.25, 0.5, 0.75),
) -> dict[str, float | np.ndarray]:
    """Cumulative/dynamic AUC at quantiles of the test event times.

    Returns ``{"auc": mean AUC, "times": [T], "auc_at_times": [T]}``; ``auc``
    is scikit-survival's survival-weighted mean over ``times``.

    The times are the ``quantiles`` of the test event times that lie strictly
    below both :func:`ipcw_tau` of the training fold and the last test time
    (the range scikit-survival accepts); equal quantiles collapse into one
    time. Test patients followed beyond the training follow-up are
    controls at every such time; they are passed on as censored at tau,
    which leaves every AUC and the mean unchanged (see :func:`_censor_after`).
    """
    train_time, train_event = check_survival(train_time, train_event, "train")
    time, event = check_survival(time, event, "test")
    risk = _check_values(risk, len(time), "risk")
    tau = ipcw_tau(train_time, train_event)
    upper = min(tau, time.max())
    usable = time[event & (time < upper)]
    if len(usable) == 0:
        raise DataError(
            f"no test event before {upper} (the end of the training follow-up or of the "
            "test follow-up); the time-dependent AUC needs one"
        )
    times = np.unique(np.quantile(usable, quantiles))
    time, event = _censor_after(time, event, tau)
    with _as_data_error("time-dependent AUC"):
        auc_at, mean_auc = cumulative_dynamic_auc(
            Surv.from_arrays(train_event, train_time), Surv.from_arrays(event, time), risk, times
        )
    return {"auc": float(mean_auc), "times": times, "auc_at_times": np.asarray(auc_at)}


def ibs(
    train_time: np.ndarray,
    train_event: np.ndarray,
    time: np.ndarray,
    event: np.ndarray,
    surv_fn_values: np.ndarray,
    times: np.ndarray,
) -> float:
    """Integrated Brier score of survival probabilities ``[n_test, n_times]`` at ``times``.

    ``times`` (at least two, increasing) must lie in ``[first test time,
    last test time)`` and strictly below :func:`ipcw_tau` of the training
    fold. As in :func:`td_auc`, test patients followed beyond the training
    follow-up are passed on as censored at tau, which leaves the score unchanged.
    """
    train_time, train_event = check_survival(train_time, train_event, "train")
    time, event = check_survival(time, event, "test")
    times = np.asarray(times, dtype=float).ravel()
    surv = np.asarray(surv_fn_values, dtype=float)
    if surv.shape != (len(time), len(times)):
        raise DataError(
            f"surv_fn_values must have shape [n_test, n_times] = [{len(time)}, {len(times)}], "
            f"got {list(surv.shape)}"
        )
    if not np.isfinite(surv).all() or (surv < 0).any() or (surv > 1).any():
        raise DataError("surv_fn_values must be survival probabilities in [0, 1]")
    if len(times) < 2 or not np.isfinite(times).all() or np.any(np.diff(times) <= 0):
        raise DataError("times must hold at least two finite, strictly increasing values")
    tau = ipcw_tau(train_time, train_event)
    if times[-1] >= tau:
        raise DataError(
            f"times reach {times[-1]}, but the training fold's censoring distribution only "
            f"covers times below {tau}"
        )
    time, event = _censor_after(time, event, tau)
    with _as_data_error("integrated Brier score"):
        return float(
            integrated_brier_score(
                Surv.from_arrays(train_event, train_time),
                Surv.from_arrays(event, time),
                surv,
                times,
            )
        )


def breslow_survival(
    train_risk: np.ndarray,
    train_time: np.ndarray,
    train_event: np.ndarray,
    test_risk: np.ndarray,
    times: np.ndarray,
) -> np.ndarray:
    """Survival ``[n_test, n_times]`` of a Cox head: ``S(t | r) = exp(-H0(t) e^r)``.

    ``H0`` is Breslow's cumulative baseline hazard fitted by scikit-survival's
    ``BreslowEstimator`` on the training fold's risks ``train_risk [n_train]``
    (log-hazards, as the Cox head outputs). ``H0`` is a right-continuous step
    function: 0 before the first training time, held at its last value after
    the last one.
    """
    train_time, train_event = check_survival(train_time, train_event, "train")
    train_risk = _check_values(train_risk, len(train_time), "train_risk")
    test_risk = _check_values(test_risk, None, "test_risk")
    times = _check_values(times, None, "times")
    if (times < 0).any():
        raise DataError("times must be non-negative")
    breslow = BreslowEstimator().fit(train_risk, train_event, train_time)
    steps, cum_hazard = breslow.cum_baseline_hazard_.x, breslow.cum_baseline_hazard_.y
    idx = np.searchsorted(steps, times, side="right") - 1
    h0 = np.where(idx >= 0, cum_hazard[idx.clip(0)], 0.0)
    # exp(log H0 + r) instead of H0 * exp(r): a large r with H0 = 0 gives S = 1, not NaN.
    with np.errstate(divide="ignore", over="ignore"):
        return np.exp(-np.exp(np.log(h0)[None, :] + test_risk[:, None]))


def discrete_survival_at(
    survival: np.ndarray, bin_edges: np.ndarray, times: np.ndarray
) -> np.ndarray:
    """Survival ``[n, n_times]`` at ``times`` from a discrete head's ``survival [n, K]``.

    ``survival[:, k]`` is the probability of outliving bin ``k``, i.e. of
    reaching ``bin_edges[k + 1]``. The curve is the step function that equals
    1 in bin 0 and ``survival[:, k - 1]`` on ``[bin_edges[k], bin_edges[k + 1])``:
    it is exact at the edges and drops at the end of each bin.
    """
    survival = np.asarray(survival, dtype=float)
    bin_edges = np.asarray(bin_edges, dtype=float)
    times = _check_values(times, None, "times")
    if survival.ndim != 2 or survival.shape[1] != len(bin_edges) - 1:
        raise DataError(
            f"survival must be [n, K] with K = len(bin_edges) - 1 = {len(bin_edges) - 1}, "
            f"got {list(survival.shape)}"
        )
    padded = np.concatenate([np.ones((len(survival), 1)), survival], axis=1)
    idx = (np.searchsorted(bin_edges, times, side="right") - 1).clip(0, survival.shape[1] - 1)
    return padded[:, idx]


def check_survival(time: np.ndarray, event: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``time`` as float64 ``[n]`` and ``event`` as bool ``[n]``, or a DataError naming the problem."""
    time = np.asarray(time, dtype=float)
    event = np.asarray(event)
    if time.ndim != 1 or event.ndim != 1 or len(time) != len(event):
        raise DataError(
            f"{name} time and event must be 1-D arrays of one length, got shapes "
            f"{list(time.shape)} and {list(event.shape)}"
        )
    if np.isnan(time).any():
        raise DataError(f"{name} time holds {int(np.isnan(time).sum())} NaN value(s)")
    if not np.isfinite(time).all() or (time < 0).any():
        raise DataError(f"{name} time must be finite and non-negative, got min {time.min()}")
    bad = ~np.isin(event, (0, 1))
    if bad.any():
        raise DataError(
            f"{name} event must be 0 (censored) or 1 (observed); got {np.unique(event[bad])[:5].tolist()}"
        )
    event = event.astype(bool)
    if not event.any():
        raise DataError(f"{name} set has no observed events; survival metrics are undefined")
    return time, event


def _check_values(values: np.ndarray, n: int | None, name: str) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if values.ndim != 1 or (n is not None and len(values) != n):
        raise DataError(f"{name} must be a 1-D array of length {n}, got shape {list(values.shape)}")
    if not np.isfinite(values).all():
        raise DataError(f"{name} holds NaN or infinite values")
    return values


def _censor_after(time: np.ndarray, event: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """Test records at or after ``tau`` become censored at ``tau``.

    Metrics evaluated at times ``t < tau`` see such a patient only as still at
    risk at ``t`` (a control, with weight ``1/G(t)``), which this keeps; but
    scikit-survival would evaluate ``G`` at the patient's own time, undefined
    beyond the training follow-up, and raise.
    """
    late = time >= tau
    return np.where(late, tau, time), event & ~late


@contextmanager
def _as_data_error(what: str) -> Iterator[None]:
    """Re-raise scikit-survival's ValueError about the data as a DataError."""
    try:
        yield
    except ValueError as exc:
        raise DataError(f"cannot compute the {what}: {exc}") from exc


def ibs_times(train_time: np.ndarray, train_event: np.ndarray, time: np.ndarray) -> np.ndarray:
    """The integrated Brier score's time grid: 15 quantiles (10%..90%) of the test times.

    Kept strictly below the last test time and below :func:`ipcw_tau` of the
    training fold, where scikit-survival's IPCW weights exist.
    """
    upper = min(ipcw_tau(train_time, train_event), float(np.max(time)))
    grid = np.unique(np.quantile(np.asarray(time, float), np.linspace(0.1, 0.9, 15)))
    grid = grid[grid < upper]
    if len(grid) < 2:
        raise DataError(
            f"fewer than two test times below {upper:g} (the end of the training or test "
            "follow-up); the integrated Brier score needs a time range"
        )
    return grid


def risk_groups(pred: pd.DataFrame, train_pred: pd.DataFrame) -> pd.DataFrame:
    """Test bags with ``risk_std`` and ``group`` (high / low): cut at the training median risk.

    ``risk_std = (risk - median_train) / sd_train`` puts every fold on one
    scale with its own cut at 0, ready for pooling across folds.
    """
    train_risk = train_pred["risk"].to_numpy(float)
    median = float(np.median(train_risk))
    sd = float(np.std(train_risk, ddof=1)) if len(train_risk) > 1 else 0.0
    out = pred[["bag_id", "patient_id", "fold", "time", "event", "risk"]].copy()
    out["risk_std"] = (out["risk"] - median) / (sd if sd > 0 else 1.0)
    out["group"] = np.where(out["risk"].to_numpy(float) > median, "high", "low")
    return out


def risk_scale(train_pred: pd.DataFrame) -> dict[str, float]:
    """The mean and sd of a training fold's predicted risks (``risk_mean``, ``risk_sd``)."""
    ref = train_pred["risk"].to_numpy(float)
    return {
        "risk_mean": float(ref.mean()),
        "risk_sd": float(np.std(ref, ddof=1)) if len(ref) > 1 else 0.0,
    }


def standardized_risk(pred: pd.DataFrame, risk_mean: float, risk_sd: float) -> pd.DataFrame:
    """``pred`` with ``risk`` centred and scaled (by a training fold's risks' mean and sd: one
    scale for risks of different models, e.g. before averaging them)."""
    out = pred.copy()
    out["risk"] = (pred["risk"].to_numpy(float) - risk_mean) / (risk_sd if risk_sd > 0 else 1.0)
    return out


def logrank_p(groups: pd.DataFrame) -> float:
    """Log-rank p-value (lifelines) of high vs low risk groups; NaN if a group is empty."""
    from lifelines.statistics import logrank_test

    hi, lo = groups[groups["group"] == "high"], groups[groups["group"] == "low"]
    if len(hi) == 0 or len(lo) == 0 or groups["event"].sum() == 0:
        return float("nan")
    res = logrank_test(
        hi["time"], lo["time"], event_observed_A=hi["event"], event_observed_B=lo["event"]
    )
    return float(res.p_value)


def pooled_arrays(pred: pd.DataFrame) -> tuple[np.ndarray, ...]:
    """``time, event, risk, fold`` arrays of pooled predictions (fold all 0 without a column)."""
    fold = pred["fold"].astype(str).to_numpy() if "fold" in pred else np.zeros(len(pred))
    return (*(pred[c].to_numpy(float) for c in ("time", "event", "risk")), fold)


def pooled_c_index(
    time: np.ndarray, event: np.ndarray, risk: np.ndarray, fold: np.ndarray
) -> dict[str, float]:
    """``{"c_index": fold_stratified_c_index(...)}``: the statistic a bootstrap resamples."""
    return {"c_index": fold_stratified_c_index(time, event, risk, fold)}


def fold_stratified_c_index(
    time: np.ndarray, event: np.ndarray, risk: np.ndarray, fold: np.ndarray
) -> float:
    """Harrell's C over pairs within one fold (scikit-survival's pair counts, summed)."""
    from sksurv.metrics import concordance_index_censored

    concordant = comparable = 0.0
    for f in np.unique(fold):
        m = fold == f
        if not event[m].any():
            continue
        try:
            _, conc, disc, tied_risk, _ = concordance_index_censored(
                event[m].astype(bool), time[m], risk[m]
            )
        except ValueError:  # no comparable pair in this fold's resample
            continue
        concordant += conc + 0.5 * tied_risk
        comparable += conc + disc + tied_risk
    return float(concordant / comparable) if comparable else float("nan")


class NanOnDataError:
    """Context: a DataError from a metric sets ``out[key] = nan`` and, where ``where`` names
    the fold, warns (``category``)."""

    def __init__(self, out: dict, key: str, where: str | None, category: type[Warning]):
        self.out, self.key, self.where, self.category = out, key, where, category

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None or not isinstance(exc, DataError):
            return False
        self.out[self.key] = float("nan")
        if self.where is not None:
            warnings.warn(
                f"{self.where}: {self.key} is undefined on the test partition: {exc}",
                self.category,
                stacklevel=3,
            )
        return True
