"""Survival losses against lifelines, scikit-survival, pandas and hand computations."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from lifelines import CoxPHFitter
from lifelines.datasets import load_rossi
from sksurv.linear_model import CoxPHSurvivalAnalysis
from sksurv.util import Surv

from mil.errors import DataError
from mil.losses import (
    CoxPHLoss,
    DiscreteHazardNLL,
    assign_bins,
    cox_ph_loss,
    discrete_hazard_nll,
    discrete_survival,
    discrete_time_bins,
)


@pytest.fixture(scope="module")
def rossi():
    df = load_rossi()
    x = df.drop(columns=["week", "arrest"])
    return df, x.to_numpy(float), df["week"].to_numpy(float), df["arrest"].to_numpy(int)


def _fit_cox(x: np.ndarray, time: np.ndarray, event: np.ndarray, ties: str) -> np.ndarray:
    """Coefficients of a linear risk fitted by full-batch L-BFGS on cox_ph_loss (float64)."""
    mean, sd = x.mean(0), x.std(0)
    xs = torch.tensor((x - mean) / sd)
    t, e = torch.tensor(time), torch.tensor(event)
    beta = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [beta],
        lr=1.0,
        max_iter=500,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = cox_ph_loss(xs @ beta, t, e, ties=ties)
        loss.backward()
        return loss

    opt.step(closure)
    return beta.detach().numpy() / sd  # back to the unstandardised covariates


def test_efron_fit_matches_lifelines(rossi):
    df, x, time, event = rossi
    cph = CoxPHFitter(penalizer=0.0).fit(df, duration_col="week", event_col="arrest")
    beta = _fit_cox(x, time, event, ties="efron")
    np.testing.assert_allclose(beta, cph.params_.to_numpy(), rtol=0, atol=1e-4)


def test_breslow_fit_matches_sksurv(rossi):
    _, x, time, event = rossi
    est = CoxPHSurvivalAnalysis(ties="breslow", alpha=0.0).fit(x, Surv.from_arrays(event, time))
    beta = _fit_cox(x, time, event, ties="breslow")
    np.testing.assert_allclose(beta, est.coef_, rtol=0, atol=1e-4)


def test_loss_at_lifelines_optimum_is_its_log_likelihood_per_event(rossi):
    df, x, time, event = rossi
    cph = CoxPHFitter(penalizer=0.0).fit(df, duration_col="week", event_col="arrest")
    risk = torch.tensor(x) @ torch.tensor(cph.params_.to_numpy())
    loss = cox_ph_loss(risk, torch.tensor(time), torch.tensor(event), ties="efron")
    assert loss.dtype == torch.float64
    assert abs(loss.item() - (-cph.log_likelihood_ / event.sum())) < 1e-6


# Times with a two-event tie at t=2 (plus a censoring there) and an event/censoring tie at t=4.
TIME = [1.0, 2.0, 2.0, 2.0, 3.0, 4.0, 4.0]
EVENT = [1, 1, 1, 0, 1, 1, 0]
RISK = [0.5, -0.3, 1.2, 0.1, -1.0, 0.7, 0.2]


def _hand_log_likelihood(efron: bool) -> float:
    w = [math.exp(r) for r in RISK]
    at_1 = sum(w)  # everyone is at risk at t=1
    at_2 = w[1] + w[2] + w[3] + w[4] + w[5] + w[6]
    tied_2 = w[1] + w[2]
    at_3 = w[4] + w[5] + w[6]
    at_4 = w[5] + w[6]
    second = at_2 - 0.5 * tied_2 if efron else at_2
    return (
        (RISK[0] - math.log(at_1))
        + (RISK[1] + RISK[2] - math.log(at_2) - math.log(second))
        + (RISK[4] - math.log(at_3))
        + (RISK[5] - math.log(at_4))
    )


@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_tied_example_matches_hand_computation(ties):
    expected = -_hand_log_likelihood(efron=ties == "efron") / 5  # five events
    loss = cox_ph_loss(
        torch.tensor(RISK, dtype=torch.float64),
        torch.tensor(TIME),
        torch.tensor(EVENT),
        ties=ties,
    )
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert CoxPHLoss(ties=ties)(
        torch.tensor(RISK, dtype=torch.float64), torch.tensor(TIME), torch.tensor(EVENT)
    ).item() == pytest.approx(expected, abs=1e-12)


def test_efron_equals_breslow_without_ties():
    g = torch.Generator().manual_seed(0)
    risk, time = torch.randn(20, generator=g), torch.randperm(20).float()
    event = torch.rand(20, generator=g) < 0.6
    assert torch.allclose(
        cox_ph_loss(risk, time, event), cox_ph_loss(risk, time, event, ties="breslow")
    )


def test_float64_in_float64_out():
    risk = torch.tensor(RISK, dtype=torch.float64, requires_grad=True)
    loss = cox_ph_loss(risk, torch.tensor(TIME, dtype=torch.float64), torch.tensor(EVENT))
    loss.backward()
    assert loss.dtype == torch.float64 and risk.grad.dtype == torch.float64


@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_large_risks_give_finite_loss_and_gradients(ties):
    g = torch.Generator().manual_seed(1)
    time = torch.randint(0, 10, (64,), generator=g).float()  # many ties
    event = torch.rand(64, generator=g) < 0.5
    for dtype in (torch.float32, torch.float64):
        risk = (torch.randn(64, generator=g, dtype=dtype).sign() * 1e3).requires_grad_()
        loss = cox_ph_loss(risk, time, event, ties=ties)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(risk.grad).all()


def test_permutation_does_not_change_loss():
    g = torch.Generator().manual_seed(2)
    risk = torch.randn(50, generator=g, dtype=torch.float64)
    time = torch.randint(0, 8, (50,), generator=g).double()
    event = torch.rand(50, generator=g) < 0.5
    perm = torch.randperm(50, generator=g)
    for ties in ("efron", "breslow"):
        a = cox_ph_loss(risk, time, event, ties=ties)
        b = cox_ph_loss(risk[perm], time[perm], event[perm], ties=ties)
        assert a.item() == pytest.approx(b.item(), abs=1e-12)


def test_no_events_gives_differentiable_zero():
    risk = torch.randn(5, requires_grad=True)
    loss = cox_ph_loss(risk, torch.arange(5.0), torch.zeros(5))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(risk.grad, torch.zeros(5))


def _hand_discrete_nll(logits, bins, events, alpha, eps=1e-7):
    total = 0.0
    for row, y, e in zip(logits, bins, events):
        h = [1.0 / (1.0 + math.exp(-v)) for v in row]
        s_pad = [1.0]
        for hk in h:
            s_pad.append(s_pad[-1] * (1.0 - hk))
        c = 1 - e
        unc = -(1 - c) * (math.log(max(s_pad[y], eps)) + math.log(max(h[y], eps)))
        cens = -c * math.log(max(s_pad[y + 1], eps))
        total += (1 - alpha) * (cens + unc) + alpha * unc
    return total / len(bins)


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_discrete_nll_matches_hand_computation(alpha):
    logits = [
        [-1.0, 0.3, 2.0, 0.5],
        [0.2, -0.7, -2.0, 1.5],
        [1.1, 0.0, -0.4, 0.9],
        [-2.5, -1.0, 0.6, 0.1],
    ]
    bins, events = [2, 0, 3, 1], [1, 0, 0, 1]
    expected = _hand_discrete_nll(logits, bins, events, alpha)
    args = (torch.tensor(logits, dtype=torch.float64), torch.tensor(bins), torch.tensor(events))
    assert discrete_hazard_nll(*args, alpha=alpha).item() == pytest.approx(expected, abs=1e-12)
    assert DiscreteHazardNLL(alpha=alpha)(*args).item() == pytest.approx(expected, abs=1e-12)


def test_discrete_nll_floor_caps_loss_like_patch_gcn():
    # log h with h = sigmoid(-40) ~ 4e-18 is floored at log(1e-7); eps=0 gives the exact value.
    logits, bins, events = [[-40.0, 0.0]], [0], [1]
    args = (torch.tensor(logits, dtype=torch.float64), torch.tensor(bins), torch.tensor(events))
    assert discrete_hazard_nll(*args).item() == pytest.approx(-math.log(1e-7), abs=1e-12)
    assert discrete_hazard_nll(*args, eps=0.0).item() == pytest.approx(40.0, abs=1e-12)


@pytest.mark.parametrize("eps", [1e-7, 0.0])
def test_discrete_nll_gradients_finite_for_huge_logits(eps):
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(16, 4, generator=g).sign() * 1e4).requires_grad_()
    bins = torch.randint(0, 4, (16,), generator=g)
    events = torch.rand(16, generator=g) < 0.5
    loss = discrete_hazard_nll(logits, bins, events, alpha=0.4, eps=eps)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_discrete_survival_matches_cumprod():
    logits = torch.tensor([[-1.0, 0.3, 2.0], [0.2, -0.7, -2.0]], dtype=torch.float64)
    out = discrete_survival(logits)
    hazards = 1 / (1 + np.exp(-logits.numpy()))
    survival = np.cumprod(1 - hazards, axis=1)
    np.testing.assert_allclose(out["hazards"].numpy(), hazards, rtol=1e-12)
    np.testing.assert_allclose(out["survival"].numpy(), survival, rtol=1e-12)
    np.testing.assert_allclose(out["risk"].numpy(), -survival.sum(1), rtol=1e-12)


def test_bins_use_uncensored_training_times_only():
    observed = np.arange(1.0, 9.0)  # event times 1..8
    censored = np.array([100.0, 120.0, 150.0, 200.0])  # long follow-up without events
    times = np.concatenate([observed, censored])
    events = np.concatenate([np.ones(8, int), np.zeros(4, int)])
    edges = discrete_time_bins(times, events, n_bins=4)
    # pandas' qcut on the uncensored times is Patch-GCN's reference rule.
    _, reference = pd.qcut(observed, q=4, retbins=True)
    np.testing.assert_allclose(edges[1:-1], reference[1:-1])
    assert edges[0] == 0.0 and edges[-1] == np.inf
    # Quantiles of all times would put the inner edges elsewhere.
    assert not np.allclose(edges[1:-1], np.quantile(times, [0.25, 0.5, 0.75]))

    query = np.array([0.0, 2.75, 2.7, 4.5, 7.0, 200.0, 1e6])
    expected = pd.cut(query, bins=edges, right=False, labels=False)
    np.testing.assert_array_equal(assign_bins(query, edges), expected)


def test_bins_reject_bad_training_data():
    with pytest.raises(DataError, match="no observed events"):
        discrete_time_bins(np.array([1.0, 2.0]), np.array([0, 0]))
    with pytest.raises(DataError, match="distinct"):
        discrete_time_bins(np.array([5.0, 5.0, 5.0, 1.0]), np.array([1, 1, 1, 0]), n_bins=4)
    with pytest.raises(DataError, match="non-negative"):
        discrete_time_bins(np.array([-1.0, 2.0]), np.array([1, 1]))
