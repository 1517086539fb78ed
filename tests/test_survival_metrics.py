"""Survival metric wrappers against scikit-survival and lifelines called directly."""

from __future__ import annotations

import numpy as np
import pytest
from lifelines import CoxPHFitter
from lifelines.datasets import load_rossi
from sksurv.linear_model import CoxPHSurvivalAnalysis
from sksurv.metrics import (
    concordance_index_censored,
    concordance_index_ipcw,
    cumulative_dynamic_auc,
    integrated_brier_score,
)
from sksurv.util import Surv

from mil.errors import DataError
from mil.metrics.survival import (
    breslow_survival,
    c_index,
    c_index_uno,
    discrete_survival_at,
    ibs,
    ipcw_tau,
    td_auc,
)


@pytest.fixture(scope="module")
def cohort():
    """Synthetic Cox data: train (with the latest follow-up, censored) and test folds."""
    rng = np.random.default_rng(0)
    n = 400
    x = rng.normal(size=(n, 2))
    risk = x @ np.array([0.8, -0.5])
    event_time = rng.exponential(10.0 * np.exp(-risk))
    censor_time = rng.uniform(0, 25, size=n)
    time = np.round(np.minimum(event_time, censor_time), 1)  # rounding makes ties
    event = (event_time <= censor_time).astype(int)
    train, test = np.arange(250), np.arange(250, n)
    last = np.argmax(time)
    if last >= 250:  # the censoring distribution must cover the test times
        train[0], test[last - 250] = last, train[0]
    noisy = risk + rng.normal(scale=0.5, size=n)
    return {
        "train": (time[train], event[train]),
        "test": (time[test], event[test]),
        "train_risk": risk[train],
        "risk": noisy[test],
    }


def _surv(time, event):
    return Surv.from_arrays(event, time)


def test_harrell_equals_sksurv(cohort):
    time, event = cohort["test"]
    expected = concordance_index_censored(event.astype(bool), time, cohort["risk"])[0]
    assert c_index(time, event, cohort["risk"]) == expected


def test_uno_equals_sksurv_with_default_and_given_tau(cohort):
    (tr_t, tr_e), (time, event) = cohort["train"], cohort["test"]
    out = c_index_uno(tr_t, tr_e, time, event, cohort["risk"])
    assert out["tau"] == tr_t.max() == ipcw_tau(tr_t, tr_e)
    expected = concordance_index_ipcw(
        _surv(tr_t, tr_e), _surv(time, event), cohort["risk"], tau=out["tau"]
    )[0]
    assert out["c_index"] == expected

    given = c_index_uno(tr_t, tr_e, time, event, cohort["risk"], tau=10.0)
    assert (
        given["c_index"]
        == concordance_index_ipcw(_surv(tr_t, tr_e), _surv(time, event), cohort["risk"], tau=10.0)[
            0
        ]
    )
    with pytest.raises(DataError, match="tau"):
        c_index_uno(tr_t, tr_e, time, event, cohort["risk"], tau=tr_t.max() + 1)


def test_default_tau_keeps_sksurv_from_raising():
    # The last training time is an event, so G stays > 0 but ends there; a
    # test event after it makes a plain sksurv call raise.
    tr_t, tr_e = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), np.array([1, 0, 1, 0, 1, 1])
    time, event = np.array([1.5, 2.5, 3.5, 7.0]), np.array([1, 1, 0, 1])
    risk = np.array([3.0, 2.0, 1.0, 0.0])
    with pytest.raises(ValueError):
        concordance_index_ipcw(_surv(tr_t, tr_e), _surv(time, event), risk)
    out = c_index_uno(tr_t, tr_e, time, event, risk)
    assert out["tau"] == 6.0
    assert (
        out["c_index"]
        == concordance_index_ipcw(_surv(tr_t, tr_e), _surv(time, event), risk, tau=6.0)[0]
    )


def test_td_auc_equals_sksurv_at_test_event_quartiles(cohort):
    (tr_t, tr_e), (time, event) = cohort["train"], cohort["test"]
    out = td_auc(tr_t, tr_e, time, event, cohort["risk"])
    times = np.quantile(time[event == 1], [0.25, 0.5, 0.75])
    np.testing.assert_array_equal(out["times"], times)
    auc_at, mean_auc = cumulative_dynamic_auc(
        _surv(tr_t, tr_e), _surv(time, event), cohort["risk"], times
    )
    assert out["auc"] == mean_auc
    np.testing.assert_array_equal(out["auc_at_times"], auc_at)


def test_late_test_patients_do_not_change_td_auc_or_ibs(cohort):
    # A test patient with an event after the evaluated times: sksurv accepts it
    # inside the training follow-up, raises beyond it; our value is the same.
    (tr_t, tr_e), (time, event) = cohort["train"], cohort["test"]
    late = np.argmax(time)
    inside = time.copy()
    inside[late], event = tr_t.max() - 0.05, event.copy()
    event[late] = 1
    beyond = inside.copy()
    beyond[late] = tr_t.max() + 50.0
    risk = cohort["risk"]

    times = td_auc(tr_t, tr_e, inside, event, risk)["times"]
    _, direct = cumulative_dynamic_auc(_surv(tr_t, tr_e), _surv(inside, event), risk, times)
    with pytest.raises(ValueError):
        cumulative_dynamic_auc(_surv(tr_t, tr_e), _surv(beyond, event), risk, times)
    assert td_auc(tr_t, tr_e, beyond, event, risk)["auc"] == pytest.approx(direct, abs=1e-12)

    grid = np.linspace(2.0, 15.0, 20)
    surv = breslow_survival(cohort["train_risk"], tr_t, tr_e, risk, grid)
    direct = integrated_brier_score(_surv(tr_t, tr_e), _surv(inside, event), surv, grid)
    assert ibs(tr_t, tr_e, beyond, event, surv, grid) == pytest.approx(direct, abs=1e-12)


def test_ibs_equals_sksurv(cohort):
    (tr_t, tr_e), (time, event) = cohort["train"], cohort["test"]
    grid = np.linspace(np.quantile(time, 0.1), np.quantile(time, 0.8), 30)
    surv = breslow_survival(cohort["train_risk"], tr_t, tr_e, cohort["risk"], grid)
    expected = integrated_brier_score(_surv(tr_t, tr_e), _surv(time, event), surv, grid)
    assert ibs(tr_t, tr_e, time, event, surv, grid) == expected
    with pytest.raises(DataError, match="covers times below"):
        ibs(tr_t, tr_e, time, event, np.full((len(time), 2), 0.5), [1.0, tr_t.max()])


@pytest.fixture(scope="module")
def rossi_split():
    df = load_rossi()
    rng = np.random.default_rng(1)
    is_train = rng.random(len(df)) < 0.7
    return df[is_train].reset_index(drop=True), df[~is_train].reset_index(drop=True)


def test_breslow_survival_equals_lifelines(rossi_split):
    train, test = rossi_split
    cph = CoxPHFitter(penalizer=0.0).fit(train, duration_col="week", event_col="arrest")
    covariates = cph.params_.index
    beta = cph.params_.to_numpy()
    # lifelines interpolates linearly between its grid points (the training
    # times), so compare on that grid, where both are the Breslow step function.
    times = np.unique(train["week"].to_numpy(float))
    expected = cph.predict_survival_function(test[covariates], times=times).T.to_numpy()
    got = breslow_survival(
        train[covariates].to_numpy() @ beta,
        train["week"].to_numpy(),
        train["arrest"].to_numpy(),
        test[covariates].to_numpy() @ beta,
        times,
    )
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10)


def test_breslow_survival_equals_sksurv_coxph(rossi_split):
    train, test = rossi_split
    covariates = [c for c in train.columns if c not in ("week", "arrest")]
    y = Surv.from_arrays(train["arrest"].to_numpy(), train["week"].to_numpy())
    est = CoxPHSurvivalAnalysis().fit(train[covariates].to_numpy(), y)
    times = np.arange(1.0, 53.0)
    expected = np.array(
        [fn(times) for fn in est.predict_survival_function(test[covariates].to_numpy())]
    )
    got = breslow_survival(
        train[covariates].to_numpy() @ est.coef_,
        train["week"].to_numpy(),
        train["arrest"].to_numpy(),
        test[covariates].to_numpy() @ est.coef_,
        times,
    )
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_breslow_survival_is_one_before_first_time_even_for_huge_risk():
    s = breslow_survival(
        np.array([0.0, 1.0, -1.0]),
        np.array([2.0, 3.0, 4.0]),
        np.array([1, 1, 0]),
        np.array([800.0]),
        np.array([1.0, 3.0]),
    )
    assert s[0, 0] == 1.0 and s[0, 1] == 0.0


def test_discrete_survival_at_is_step_dropping_at_bin_ends():
    survival = np.array([[0.9, 0.6, 0.2], [0.8, 0.5, 0.4]])
    edges = np.array([0.0, 10.0, 20.0, np.inf])
    times = np.array([0.0, 5.0, 10.0, 19.9, 20.0, 1e6])
    expected = np.array([[1.0, 1.0, 0.9, 0.9, 0.6, 0.6], [1.0, 1.0, 0.8, 0.8, 0.5, 0.5]])
    np.testing.assert_array_equal(discrete_survival_at(survival, edges, times), expected)
    with pytest.raises(DataError, match="len\\(bin_edges\\)"):
        discrete_survival_at(survival[:, :2], edges, times)


@pytest.mark.parametrize(
    "time, event, message",
    [
        ([1.0, -2.0, 3.0], [1, 0, 1], "non-negative"),
        ([1.0, np.nan, 3.0], [1, 0, 1], "NaN"),
        ([1.0, 2.0, 3.0], [1, 2, 0], "0 \\(censored\\) or 1"),
        ([1.0, 2.0, 3.0], [0, 0, 0], "no observed events"),
        ([1.0, 2.0], [1, 0, 1], "one length"),
    ],
)
def test_bad_input_raises_data_error(time, event, message):
    with pytest.raises(DataError, match=message):
        c_index(np.array(time), np.array(event), np.zeros(len(time)))
    with pytest.raises(DataError, match=message):
        c_index_uno(np.array(time), np.array(event), [1.0, 2.0], [1, 0], [0.0, 1.0])


def test_bad_risk_raises_data_error():
    with pytest.raises(DataError, match="risk"):
        c_index([1.0, 2.0, 3.0], [1, 0, 1], [0.0, np.nan, 1.0])
