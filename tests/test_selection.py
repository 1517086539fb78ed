"""Selection inside each outer fold's training data (``select: {mode: inner}``,
mil.train.selection): the rule by hand, inner folds that never touch the test fold, a choice the
test labels cannot change, and predictions of the chosen members everywhere."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mil import Run
from mil.config import config_from_dict, other_preprocessing
from mil.errors import ConfigError
from mil.splits import inner_splits
from mil.train import selection
from mil.train.experiment import Experiment
from mil.train.refit import refit
from mil.train.runner import run_cv
from tests.conftest import flipped_test_labels, small_config

pytestmark = pytest.mark.filterwarnings("ignore::mil.errors.TrainingWarning")


def test_the_one_standard_error_rule_by_hand():
    # bow beats default on every inner fold: differences 0.2, 0.3, 0.1 -> mean 0.2, sd 0.1,
    # se 0.1 / sqrt(3) = 0.058 < 0.2: chosen
    scores = {"default": [0.6, 0.5, 0.7], "abmil": [0.55, 0.5, 0.6], "bow": [0.8, 0.8, 0.8]}
    assert selection.choose(scores) == ("bow", "default")
    # a noisy gain: differences +0.3, -0.2, +0.05 -> mean 0.05 < se 0.144: the default stays
    noisy = {"default": [0.5, 0.7, 0.6], "bow": [0.8, 0.5, 0.65]}
    assert selection.choose(noisy) == ("default", "bow")
    # a candidate without a finite score is never chosen; the default wins when it is best
    assert selection.choose({"default": [0.7, 0.7], "x": [np.nan, np.nan]}) == ("default", None)
    assert selection.choose({"default": [0.9, 0.8], "x": [0.5, 0.6]}) == ("default", "x")


def _cfg(root: Path, **select) -> dict:
    raw = small_config(root)
    raw["splits"]["val_fraction"] = 0.25
    raw["select"] = {"mode": "inner", "folds": 3, **select}
    return raw


def test_candidates_and_config_checks(tmp_path):
    cfg = config_from_dict(_cfg(tmp_path))
    # classification's default is the model alone: one candidate, not two; the model on raw
    # features beside it (the config whitens)
    assert selection.candidates(cfg) == {
        "default": ["abmil"],
        "abmil_raw": ["abmil_raw"],
        "meanpool_linear": ["meanpool_linear"],
        "bow_linear": ["bow_linear"],
    }
    raw = _cfg(tmp_path, other_preprocessing=False)
    assert "abmil_raw" not in selection.candidates(config_from_dict(raw))
    raw = _cfg(tmp_path)
    raw["data"]["standardize"] = False
    assert other_preprocessing(config_from_dict(raw)) == ("abmil_whiten", "whiten")
    raw = _cfg(tmp_path)
    raw["ensemble"] = ["meanpool_linear"]
    cfg = config_from_dict(raw)
    assert selection.candidates(cfg)["default"] == ["abmil", "meanpool_linear"]
    assert selection.fitted_members(cfg) == ["meanpool_linear", "bow_linear"]
    for bad, key in (
        ({"members": ["abmil"]}, "select.members"),
        ({"folds": 1}, "select.folds"),
    ):
        with pytest.raises(ConfigError, match=key):
            config_from_dict(_cfg(tmp_path, **bad))
    raw = _cfg(tmp_path)
    raw["model"] = {"name": "meanpool_linear"}
    with pytest.raises(ConfigError, match="select.mode"):
        config_from_dict(raw)


def test_inner_folds_hold_only_the_outer_training_patients(tmp_path):
    cfg = config_from_dict(_cfg(tmp_path))
    exp = Experiment(cfg, tmp_path / "run", progress=False)
    slides = exp.cohort.slides.set_index("slide_id")
    for outer in exp.splits:
        inner = inner_splits(exp.cohort, outer, 3, 0.25, 0)
        own = set(outer.train) | set(outer.val)
        tests = [set(s.test) for s in inner]
        assert set().union(*tests) == own  # every training slide tested once, no test slide
        assert sum(len(t) for t in tests) == len(own)
        for s in inner:
            parts = [set(s.train), set(s.val), set(s.test)]
            assert set().union(*parts) == own and not set(outer.test) & set().union(*parts)
            patients = [set(slides.loc[sorted(p), "patient_id"]) for p in parts]
            assert not (patients[0] & patients[1] or patients[0] & patients[2])
            assert not patients[1] & patients[2]


@pytest.fixture(scope="module")
def selected(tmp_path_factory):
    """A run with selection, and the same run with its fold 0 test labels flipped."""
    root = tmp_path_factory.mktemp("select")
    raw = _cfg(root)
    clean = run_cv(config_from_dict(raw), root / "clean", folds=[0], progress=False, n_boot=50)
    raw = flipped_test_labels(raw, clean, root / "poisoned.csv")
    poisoned = run_cv(
        config_from_dict(raw), root / "poisoned", folds=[0], progress=False, n_boot=50
    )
    return clean, poisoned


def test_the_test_fold_plays_no_part_in_the_choice(selected):
    clean, poisoned = selected
    a = json.loads((clean / "fold_0" / "metrics.json").read_text())["selection"]
    b = json.loads((poisoned / "fold_0" / "metrics.json").read_text())["selection"]
    assert a == b  # the same choice and the same inner scores
    # ... while the flipped test labels did change the test metric
    ma = json.loads((clean / "fold_0" / "metrics.json").read_text())["metrics"]["auc"]
    mb = json.loads((poisoned / "fold_0" / "metrics.json").read_text())["metrics"]["auc"]
    assert ma == pytest.approx(1 - mb)
    summary = json.loads((clean / "summary.json").read_text())["selection"]
    assert summary["folds"]["0"]["chosen"] == a["chosen"]
    assert "## Selection inside the training folds" in (clean / "report.md").read_text()


def test_a_chosen_linear_member_is_what_the_fold_and_run_predict(tmp_path, monkeypatch):
    monkeypatch.setattr(selection, "choose", lambda scores: ("bow_linear", "default"))
    raw = _cfg(tmp_path)
    run_dir = run_cv(config_from_dict(raw), tmp_path / "run", progress=False, n_boot=50)
    fold = run_dir / "fold_0"
    pred = pd.read_csv(fold / "predictions.csv")
    own = pd.read_csv(fold / "members" / "bow_linear" / "predictions.csv")
    model = pd.read_csv(fold / "members" / "abmil" / "predictions.csv")
    assert json.loads((fold / "members.json").read_text())["chosen"] == ["bow_linear"]
    np.testing.assert_allclose(pred["prob_positive"], own["prob_positive"], atol=1e-12)
    assert not np.allclose(pred["prob_positive"], model["prob_positive"])
    new = Run(run_dir).predict(pred["bag_id"].tolist(), folds=[0]).set_index("bag_id")
    np.testing.assert_allclose(
        new.loc[pred["bag_id"], "prob_positive"], pred["prob_positive"], atol=1e-6
    )
    refit(config_from_dict(raw), run_dir, progress=False, log=lambda *a: None)
    record = json.loads((run_dir / "refit" / "refit.json").read_text())
    assert record["selection"] == ["bow_linear"]
    members = json.loads((run_dir / "refit" / "members.json").read_text())
    assert members["chosen"] == ["bow_linear"]


def test_a_chosen_model_on_raw_features_is_a_run_on_raw_features(tmp_path, monkeypatch):
    """The candidate on the other preprocessing is the model trained as a run with
    ``data.standardize: false`` is (same seed, same split files): when a fold chooses it, its
    predictions, ``Run.predict`` and the refit's members are that model's."""
    monkeypatch.setattr(selection, "choose", lambda scores: ("abmil_raw", "default"))
    raw = _cfg(tmp_path)
    run_dir = run_cv(config_from_dict(raw), tmp_path / "run", progress=False, n_boot=50)
    fold = run_dir / "fold_0"
    record = json.loads((fold / "metrics.json").read_text())["selection"]
    assert set(record["inner"]) == {"default", "abmil_raw", "meanpool_linear", "bow_linear"}
    assert json.loads((fold / "members.json").read_text())["chosen"] == ["abmil_raw"]
    pred = pd.read_csv(fold / "predictions.csv")
    own = pd.read_csv(fold / "members" / "abmil_raw" / "predictions.csv")
    np.testing.assert_allclose(pred["prob_positive"], own["prob_positive"], atol=1e-12)
    # the reference: no selection, raw features, the same folds and seed
    ref = _cfg(tmp_path)
    ref.pop("select")
    ref["data"]["standardize"] = False
    ref_dir = run_cv(config_from_dict(ref), tmp_path / "ref", folds=[0], progress=False, n_boot=50)
    ref_pred = pd.read_csv(ref_dir / "fold_0" / "predictions.csv").set_index("bag_id")
    np.testing.assert_allclose(
        ref_pred.loc[own["bag_id"], "prob_positive"], own["prob_positive"], atol=1e-5
    )
    model = pd.read_csv(fold / "members" / "abmil" / "predictions.csv")
    assert not np.allclose(model["prob_positive"], own["prob_positive"], atol=1e-3)
    new = Run(run_dir).predict(pred["bag_id"].tolist(), folds=[0]).set_index("bag_id")
    np.testing.assert_allclose(
        new.loc[pred["bag_id"], "prob_positive"], pred["prob_positive"], atol=1e-5
    )
    refit(config_from_dict(raw), run_dir, progress=False, log=lambda *a: None)
    members = json.loads((run_dir / "refit" / "members.json").read_text())
    assert members["chosen"] == ["abmil_raw"]
    assert (run_dir / "refit" / "members" / "abmil_raw" / "model.pt").is_file()
    assert "the model alone on raw features (`abmil_raw`)" in (run_dir / "report.md").read_text()
