"""Training diagnostics: a starved run is flagged as under-trained (in the warning, summary.json
and report.md), a run that learned is not; each detector against hand-made histories."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from mil.config import config_from_dict
from mil.data.synthetic import write_synthetic_cohort
from mil.errors import TrainingWarning
from mil.schema import TrainConfig
from mil.tasks import make_task
from mil.train.diagnostics import diagnose
from mil.train.runner import run_cv
from tests.test_survival_task import survival_config


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("diag")
    write_synthetic_cohort(
        "classification",
        root / "c.csv",
        root / "f",
        n_patients=30,
        n_two_slides=0,
        dim=16,
        min_tiles=20,
        max_tiles=60,
        shift_norm=6.0,
    )
    return root


def config(root, **train) -> dict:
    return {
        "name": "diag",
        "task": {"type": "classification"},
        "data": {"csv": str(root / "c.csv"), "features": str(root / "f"), "patient_col": "case_id"},
        "splits": {"folds": 3, "val_fraction": 0.2},
        "model": {"name": "abmil", "hidden_dim": 16},
        "train": {"patience": None, **train},
    }


def test_a_starved_run_is_flagged_as_undertrained_everywhere(cohort, tmp_path):
    cfg = config_from_dict(config(cohort, epochs=2, lr=1e-5, batch_size=8))
    with pytest.warns(
        TrainingWarning, match=r"under-training in folds 0, 1, 2 \(fold 0: .*barely trained"
    ):
        run = run_cv(cfg, tmp_path / "run", progress=False, log=lambda *a: None, n_boot=10)
    summary = json.loads((run / "summary.json").read_text())
    under = [d for d in summary["diagnostics"] if d["kind"] == "under-training"]
    assert [d["fold"] for d in under] == ["0", "1", "2"]
    assert "train.epochs" in under[0]["message"] and "optimizer steps" in under[0]["message"]
    assert "## Training diagnostics" in (run / "report.md").read_text()
    record = json.loads((run / "fold_0" / "metrics.json").read_text())
    history = pd.read_csv(run / "fold_0" / "history.csv")
    assert record["metrics"]["steps"] == history["steps"].sum() == 2 * history["steps"].iloc[0]


def test_two_epochs_under_the_default_training_settings_are_flagged(cohort, tmp_path):
    """A deliberately short run (train.epochs: 2, every other training key at its default)."""
    cfg = config_from_dict(config(cohort, epochs=2))
    assert cfg.train.min_steps is None  # the epochs asked for, no step floor
    with pytest.warns(TrainingWarning, match=r"under-training in folds? "):
        run = run_cv(cfg, tmp_path / "run", progress=False, log=lambda *a: None, n_boot=10)
    summary = json.loads((run / "summary.json").read_text())
    assert [d for d in summary["diagnostics"] if d["kind"] == "under-training"]


def test_a_run_that_learned_is_not_flagged_as_undertrained(cohort, tmp_path):
    cfg = config_from_dict(config(cohort, epochs=15, lr=2e-3, batch_size=4))
    run = run_cv(cfg, tmp_path / "run", progress=False, log=lambda *a: None, n_boot=10)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["metrics"]["auc"]["mean"] > 0.75
    assert not [d for d in summary["diagnostics"] if d["kind"] == "under-training"]
    for k in range(3):  # the model's loss fell well below the class prior's
        h = pd.read_csv(run / f"fold_{k}" / "history.csv")
        assert h["train_loss"].iloc[-1] < 0.9 * h["constant_loss"].iloc[-1]


def test_constant_loss_of_classification_is_the_entropy_of_the_smoothed_prior(
    tmp_path, small_cohort
):
    task = make_task(config_from_dict(small_cohort), ["a", "b", "c"])
    bags = pd.DataFrame({"label": [0] * 6 + [1] * 3 + [2] * 1})
    logits = task.constant_logits(bags)
    prior = np.array([6.5, 3.5, 1.5]) / 11.5
    np.testing.assert_allclose(np.exp(logits), prior)
    loss = task.loss(torch.tensor(logits).float().expand(10, -1), task.targets(bags))
    expected = -(6 * np.log(prior[0]) + 3 * np.log(prior[1]) + np.log(prior[2])) / 10
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_constant_hazards_of_the_nll_loss_are_the_bins_event_rates(tmp_path):
    raw = survival_config(tmp_path, "nll")
    task = make_task(config_from_dict(raw), [])
    rng = np.random.default_rng(0)
    bags = pd.DataFrame({"time": rng.uniform(1, 50, 200), "event": rng.integers(0, 2, 200)})
    task.setup_fold(bags)
    hazard = 1 / (1 + np.exp(-task.constant_logits(bags)))
    bins = np.searchsorted(task.bin_edges, bags["time"], side="right") - 1
    for k in range(task.n_out):
        at_risk, events = (bins >= k).sum(), ((bins == k) & (bags["event"] == 1)).sum()
        assert hazard[k] == pytest.approx((events + 0.5) / (at_risk + 1.0))
    # no other constant does better by more than the smoothing
    tgt = task.targets(bags)
    best = float(task.loss(torch.tensor(task.constant_logits(bags)).float().expand(200, -1), tgt))
    for shift in (-0.3, 0.3):
        other = torch.tensor(task.constant_logits(bags) + shift).float().expand(200, -1)
        assert float(task.loss(other, tgt)) > best - 1e-3


def history(train, constant, val=None, best=None) -> pd.DataFrame:
    n = len(train)
    h = pd.DataFrame(
        {"epoch": range(n), "train_loss": train, "constant_loss": constant, "steps": 5}
    )
    if val is not None:
        h["val_loss"] = val
    h["best"] = np.arange(n) == (n - 1 if best is None else best)
    return h


def kinds(h, cfg=None, constant=None) -> list[str]:
    return [d["kind"] for d in diagnose(h, cfg or TrainConfig(epochs=len(h)), constant, "0")]


def test_undertraining_detector_follows_the_loss_ratio():
    assert kinds(history([0.70, 0.69, 0.68, 0.67], [0.693] * 4)) == ["under-training"]
    assert kinds(history([0.70, 0.60, 0.50, 0.40], [0.693] * 4)) == []
    # the best of the last epochs counts, not one noisy epoch
    assert kinds(history([0.70, 0.60, 0.40, 0.70], [0.693] * 4)) == []


def test_still_improving_needs_a_material_fall_at_the_end():
    falling = history([0.5] * 6, [0.7] * 6, val=[1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
    assert kinds(falling) == ["still improving"]
    converged = history([0.5] * 6, [0.7] * 6, val=[0.7, 0.1, 0.01, 0.003, 0.0029, 0.0028])
    assert kinds(converged) == []
    stopped_early = history([0.5] * 6, [0.7] * 6, val=[1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
    assert kinds(stopped_early, TrainConfig(epochs=40)) == []  # early stopping ended it


def test_overfitting_is_a_sustained_rise_of_the_kept_weights_validation_loss():
    rising = history(
        [0.5, 0.2, 0.1, 0.05, 0.02, 0.01], [0.7] * 6, val=[0.6, 0.4, 0.6, 0.7, 0.8, 0.9]
    )
    assert kinds(rising) == ["over-fitting"]
    restored = history(
        [0.5, 0.2, 0.1, 0.05, 0.02, 0.01], [0.7] * 6, val=[0.6, 0.4, 0.6, 0.7, 0.8, 0.9], best=1
    )
    assert kinds(restored) == []  # early stopping kept epoch 2's weights
    blip = history(
        [0.5, 0.2, 0.1, 0.05, 0.02, 0.01], [0.7] * 6, val=[0.6, 0.4, 0.45, 0.6, 0.41, 0.42]
    )
    assert kinds(blip) == []


def test_constant_predictions_from_the_tasks(small_cohort, tmp_path):
    task = make_task(config_from_dict(small_cohort), ["neg", "pos"])
    one_class = pd.DataFrame(
        {
            "label_index": [0, 1, 0, 1],
            "prob_neg": [0.6, 0.55, 0.7, 0.52],
            "prob_pos": [0.4, 0.45, 0.3, 0.48],
        }
    )
    assert "every test bag was predicted 'neg'" in task.constant_predictions(one_class)
    fine = one_class.assign(prob_neg=[0.6, 0.4, 0.7, 0.3], prob_pos=[0.4, 0.6, 0.3, 0.7])
    assert task.constant_predictions(fine) is None
    surv = make_task(config_from_dict(survival_config(tmp_path)), [])
    assert surv.constant_predictions(pd.DataFrame({"risk": [0.2] * 5})) is not None
    assert surv.constant_predictions(pd.DataFrame({"risk": [0.2, 0.3, 0.1, 0.2, 0.2]})) is None


def test_constant_predictions_say_overfitting_when_the_kept_weights_predate_the_fit():
    """Early stopping kept epoch 1 (lowest validation loss); later epochs memorised the
    training bags: the advice is to regularise, not to train longer."""
    memorised = history(
        [0.70, 0.60, 0.20, 0.05, 0.01], [0.693] * 5, val=[0.69, 0.70, 0.9, 1.2, 1.5], best=0
    )
    (found,) = [
        d
        for d in diagnose(memorised, TrainConfig(epochs=5), "probabilities vary by 0.001", "0")
        if d["kind"] == "constant predictions"
    ]
    assert (
        "over-fitting" in found["message"]
        and "epoch 1's" in found["message"]
        and "0.01" in found["message"]
    )
    assert "raise train.epochs" not in found["message"]
    never = history([0.70, 0.69, 0.69, 0.69, 0.69], [0.693] * 5, val=[0.69] * 5, best=4)
    (found,) = [
        d
        for d in diagnose(never, TrainConfig(epochs=5), "probabilities vary by 0.001", "0")
        if d["kind"] == "constant predictions"
    ]
    assert "raise train.epochs" in found["message"] and "over-fitting" not in found["message"]
