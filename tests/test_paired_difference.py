"""Paired bootstrap of a metric difference between two predictors on the same rows,
checked against DeLong's paired AUC test (written out here as the independent reference)."""

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from mil.metrics import paired_difference


def delong_paired(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """DeLong, DeLong & Clarke-Pearson (1988): AUC(a) - AUC(b) and its standard error."""
    pos, neg = y == 1, y == 0
    v10, v01 = [], []
    for s in (a, b):
        x, z = s[pos][:, None], s[neg][None, :]
        psi = (x > z) + 0.5 * (x == z)
        v10.append(psi.mean(1))  # per positive
        v01.append(psi.mean(0))  # per negative
    s10, s01 = np.cov(np.vstack(v10)), np.cov(np.vstack(v01))
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / pos.sum()
    var += (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / neg.sum()
    return float(np.mean(v10[0]) - np.mean(v10[1])), float(np.sqrt(var))


def planted(n: int, strong: float, weak: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    common = rng.normal(
        size=n
    )  # shared noise: the two predictors are correlated, as two models are
    a = strong * y + common + 0.5 * rng.normal(size=n)
    b = weak * y + common + 0.5 * rng.normal(size=n)
    return y, a, b


def auc_difference(y, a, b):
    return lambda rows: roc_auc_score(y[rows], a[rows]) - roc_auc_score(y[rows], b[rows])


@pytest.mark.parametrize("strong, weak", [(1.2, 0.6), (0.8, 0.8)])
def test_bootstrap_agrees_with_delong(strong, weak):
    y, a, b = planted(400, strong, weak)
    d = paired_difference(auc_difference(y, a, b), len(y), n_boot=1000, seed=1)
    delta, se = delong_paired(y, a, b)
    assert d["delta"] == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b), abs=1e-12)
    assert d["delta"] == pytest.approx(delta, abs=1e-12)
    # the percentile CI is about delta +- 1.96 DeLong SE, and p about DeLong's
    assert (d["ci_high"] - d["ci_low"]) / (2 * 1.96 * se) == pytest.approx(1.0, abs=0.15)
    assert d["ci_low"] < d["delta"] < d["ci_high"]
    p_delong = 2 * norm.sf(abs(delta) / se)
    if strong > weak:
        assert d["p"] < 0.01 and p_delong < 0.01 and d["ci_low"] > 0
    else:
        assert d["p"] > 0.05 and p_delong > 0.05 and d["ci_low"] < 0 < d["ci_high"]
        assert abs(d["p"] - p_delong) < 0.1


def test_swapping_the_predictors_mirrors_the_result():
    y, a, b = planted(200, 1.0, 0.5, seed=3)
    ab = paired_difference(auc_difference(y, a, b), len(y), n_boot=300, seed=0)
    ba = paired_difference(auc_difference(y, b, a), len(y), n_boot=300, seed=0)
    assert ba["delta"] == pytest.approx(-ab["delta"])
    assert ba["ci_low"] == pytest.approx(-ab["ci_high"]) and ba["ci_high"] == pytest.approx(
        -ab["ci_low"]
    )
    assert ba["p"] == pytest.approx(ab["p"])


def test_identical_predictors_never_differ():
    y, a, _ = planted(100, 1.0, 0.5)
    d = paired_difference(auc_difference(y, a, a), len(y), n_boot=200)
    assert (d["delta"], d["ci_low"], d["ci_high"], d["p"]) == (0.0, 0.0, 0.0, 1.0)


def test_groups_resample_whole_patients():
    # every patient has two identical rows: resampling patients keeps each pair together, so
    # every resample holds an even count of each row; resampling rows would not
    y, a, b = planted(60, 1.0, 0.5)
    y2, a2, b2 = (np.repeat(v, 2) for v in (y, a, b))
    groups = np.repeat(np.arange(60), 2)
    seen = []

    def metric(rows):
        seen.append(np.bincount(rows, minlength=120))
        return auc_difference(y2, a2, b2)(rows)

    paired_difference(metric, 120, n_boot=50, groups=groups)
    counts = np.array(seen[1:])  # the first call scores all rows once
    assert (counts[:, 0::2] == counts[:, 1::2]).all()
    seen.clear()
    paired_difference(metric, 120, n_boot=50)
    assert not (np.array(seen[1:])[:, 0::2] == np.array(seen[1:])[:, 1::2]).all()


@pytest.mark.parametrize("classes", [["neg", "pos"], ["a", "b", "c"]])
def test_the_resampled_auc_alone_is_sklearns(classes, small_cohort):
    """``metric_value(pred, "auc")`` (what paired comparisons resample, computed alone) equals
    scikit-learn's AUC and the task's full metrics, also on a draw missing one class."""
    import pandas as pd

    from mil.config import config_from_dict
    from mil.tasks import make_task

    task = make_task(config_from_dict(small_cohort), classes)
    rng = np.random.default_rng(0)
    y = rng.integers(0, len(classes), 60)
    prob = rng.dirichlet(np.ones(len(classes)), 60)
    prob[np.arange(60), y] += 0.3
    prob /= prob.sum(1, keepdims=True)
    pred = pd.DataFrame(
        {"label_index": y, **{f"prob_{c}": prob[:, k] for k, c in enumerate(classes)}}
    )
    expected = (
        roc_auc_score(y, prob[:, 1])
        if len(classes) == 2
        else roc_auc_score(y, prob, multi_class="ovr", average="macro")
    )
    assert task.metric_value(pred, "auc") == pytest.approx(expected)
    assert task.metric_value(pred, "auc") == task.pooled_metrics(pred)["auc"]
    drop = pred[pred["label_index"] != 0]  # a resample without the first class
    assert task.metric_value(drop, "auc") == pytest.approx(
        task.pooled_metrics(drop)["auc"], nan_ok=True
    )
    assert (
        task.metric_value(pred, "balanced_accuracy")
        == task.pooled_metrics(pred)["balanced_accuracy"]
    )
