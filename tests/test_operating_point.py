"""Operating points and calibration (binary classification): a threshold chosen on each
fold's validation predictions (Youden's J, or a target sensitivity), applied unchanged to
its test bags; AUPRC and Brier score; checked against brute force and scikit-learn, and a
threshold that test labels cannot move."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, brier_score_loss

from mil.config import config_from_dict
from mil.errors import ConfigError
from mil.metrics import classification_metrics
from mil.metrics.classification import operating_threshold
from mil.train.runner import run_cv
from tests.conftest import flipped_test_labels, small_config
from tests.test_evaluate import cls_run, cohort_yaml, external_cls, root  # noqa: F401 (fixtures)

pytestmark = pytest.mark.filterwarnings("ignore::mil.errors.TrainingWarning")


def youden_by_hand(y, p) -> float:
    """The largest sensitivity + specificity - 1 over every cut 'p >= t' (t a predicted value)."""
    y, p = np.asarray(y, int), np.asarray(p, float)
    return max((p[y == 1] >= t).mean() + (p[y == 0] < t).mean() - 1 for t in np.unique(p))


def j_at(y, p, t) -> float:
    y, p = np.asarray(y, int), np.asarray(p, float)
    return (p[y == 1] >= t).mean() + (p[y == 0] < t).mean() - 1


@pytest.mark.parametrize("seed", range(5))
def test_youden_threshold_reaches_the_best_j_and_a_target_sensitivity_is_met(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 40)
    p = np.clip(0.5 + 0.25 * (2 * y - 1) + rng.normal(0, 0.25, 40), 0, 1)
    t = operating_threshold(y, p)
    assert j_at(y, p, t) == pytest.approx(youden_by_hand(y, p))
    for target in (0.8, 0.95):
        t = operating_threshold(y, p, target)
        assert (p[y == 1] >= t).mean() >= target
        higher = np.unique(p[p >= t])[1:]  # the cuts above the chosen one miss the target
        assert all((p[y == 1] >= u).mean() < target for u in higher)
    assert operating_threshold(np.zeros(5, int), p[:5]) is None
    # perfectly separated: midway between the classes, not at the lowest positive score
    assert operating_threshold([0, 0, 1, 1], [0.1, 0.3, 0.9, 0.95]) == pytest.approx(0.6)


def test_auprc_and_brier_match_scikit_learn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 50)
    p1 = np.clip(0.3 + 0.4 * y + rng.normal(0, 0.2, 50), 0.01, 0.99)
    m = classification_metrics(y, np.c_[1 - p1, p1])
    assert m["auprc"] == pytest.approx(average_precision_score(y, p1))
    assert m["brier"] == pytest.approx(brier_score_loss(y, p1))
    y3 = rng.integers(0, 3, 60)
    p3 = rng.dirichlet(np.ones(3), 60)
    m3 = classification_metrics(y3, p3)
    by_hand = np.mean([average_precision_score(y3 == k, p3[:, k]) for k in range(3)])
    assert m3["auprc"] == pytest.approx(by_hand)
    assert m3["brier"] == pytest.approx(np.mean(((p3 - np.eye(3)[y3]) ** 2).sum(1)))


def test_a_bad_operating_point_names_the_key(tmp_path):
    raw = small_config(tmp_path)
    raw["task"]["operating_point"] = 1.5
    with pytest.raises(ConfigError, match="task.operating_point"):
        config_from_dict(raw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run, and the same run with fold 0's test labels flipped (same split files)."""
    base = tmp_path_factory.mktemp("op")
    raw = small_config(base, epochs=4)
    clean = run_cv(
        config_from_dict(raw), base / "clean", progress=False, log=lambda *a: None, n_boot=50
    )
    raw = flipped_test_labels(raw, clean, base / "poisoned.csv")
    poisoned = run_cv(
        config_from_dict(raw), base / "poisoned", progress=False, log=lambda *a: None, n_boot=50
    )
    return clean, poisoned


def test_each_fold_applies_its_validation_threshold_to_its_test_bags(runs):
    clean, poisoned = runs
    for fold in ("0", "1", "2"):
        val = pd.read_csv(clean / f"fold_{fold}" / "predictions_val.csv")
        test = pd.read_csv(clean / f"fold_{fold}" / "predictions.csv")
        record = json.loads((clean / f"fold_{fold}" / "metrics.json").read_text())["metrics"]
        t = record["threshold"]
        assert j_at(val["label_index"], val["prob_positive"], t) == pytest.approx(
            youden_by_hand(val["label_index"], val["prob_positive"])
        )
        positive = test["prob_positive"] >= t
        assert (test["pred_op"] == np.where(positive, "positive", "negative")).all()
        y = test["label_index"].to_numpy()
        assert record["sensitivity"] == pytest.approx(positive[y == 1].mean())
        assert record["specificity"] == pytest.approx((~positive[y == 0]).mean())
    summary = json.loads((clean / "summary.json").read_text())
    for m in ("sensitivity", "specificity", "auprc", "brier"):
        assert len(summary["metrics"][m]["ci95_pooled"]) == 2
    report = (clean / "report.md").read_text()
    assert (clean / "calibration.png").is_file() and "calibration.png" in report
    # the threshold is a setting each fold chose, not a score: its range, no row of the table
    folds = [
        json.loads((clean / f"fold_{f}" / "metrics.json").read_text())["metrics"]["threshold"]
        for f in ("0", "1", "2")
    ]
    assert f"lowest {min(folds):.3f}, highest {max(folds):.3f} over folds" in report
    assert "| threshold |" not in report
    # the test labels of fold 0 are flipped: its threshold stays, its test sensitivity moves
    a = json.loads((clean / "fold_0" / "metrics.json").read_text())["metrics"]
    b = json.loads((poisoned / "fold_0" / "metrics.json").read_text())["metrics"]
    assert b["threshold"] == pytest.approx(a["threshold"], abs=1e-9)
    assert b["sensitivity"] != pytest.approx(a["sensitivity"]) or b["specificity"] != pytest.approx(
        a["specificity"]
    )


def test_mil_evaluate_applies_the_median_of_the_fold_thresholds(
    cls_run,
    external_cls,
    root,
    tmp_path,
):
    """An external cohort gets the ensemble's threshold unchanged: the median of the folds'
    validation thresholds, never one chosen on the external labels."""
    from mil.evaluate import evaluate

    summary = evaluate(
        cls_run, cohort_yaml(tmp_path / "ext.yaml", external_cls), tmp_path / "ev", n_boot=20
    )
    folds = [
        json.loads((cls_run / f"fold_{k}" / "metrics.json").read_text())["metrics"]["threshold"]
        for k in range(3)
    ]
    t = float(np.median(folds))
    pred = pd.read_csv(tmp_path / "ev" / "predictions.csv")
    positive = pred["prob_positive"] >= t
    assert (pred["pred_op"] == np.where(positive, "positive", "negative")).all()
    y = pred["label_index"].to_numpy()
    assert summary["metrics"]["sensitivity"]["value"] == pytest.approx(positive[y == 1].mean())
    assert summary["metrics"]["specificity"]["value"] == pytest.approx((~positive[y == 0]).mean())
