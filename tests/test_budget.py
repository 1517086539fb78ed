"""The training budget: train.min_steps adds epochs (and holds early stopping back), and the
learning-rate schedule follows its formula step by step."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from mil.config import config_from_dict
from mil.errors import ConfigError
from mil.train.runner import run_cv
from tests.conftest import small_config


def quiet(*a):
    pass


def fold_history(run, k=0) -> pd.DataFrame:
    return pd.read_csv(run / f"fold_{k}" / "history.csv")


def test_min_steps_adds_epochs_until_the_steps_are_reached(tmp_path):
    raw = small_config(tmp_path, epochs=2, min_steps=20, patience=1)
    raw["splits"]["val_fraction"] = 0.2
    run = run_cv(
        config_from_dict(raw), tmp_path / "run", folds=[0], progress=False, log=quiet, n_boot=10
    )
    h = fold_history(run)
    per_epoch = int(h["steps"].iloc[0])
    assert len(h) == math.ceil(20 / per_epoch) and h["steps"].sum() >= 20
    # patience 1 could have stopped after two epochs; min_steps holds it back
    assert len(h) > 2


@pytest.mark.parametrize("schedule, warmup", [("cosine", 0), ("cosine", 5), ("constant", 4)])
def test_learning_rate_follows_the_schedule(tmp_path, schedule, warmup):
    raw = small_config(tmp_path, epochs=6, lr=1e-3, schedule=schedule, warmup_steps=warmup)
    run = run_cv(
        config_from_dict(raw), tmp_path / "run", folds=[0], progress=False, log=quiet, n_boot=10
    )
    h = fold_history(run)
    per_epoch, total = int(h["steps"].iloc[0]), int(h["steps"].sum())
    for epoch, lr in zip(h["epoch"], h["lr"]):
        s = (epoch + 1) * per_epoch  # the factor of the next step, after s updates
        factor = min(1.0, (s + 1) / warmup) if warmup else 1.0
        if schedule == "cosine":
            factor *= 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
        assert lr == pytest.approx(1e-3 * factor, rel=1e-9, abs=1e-15)
    if schedule == "cosine":
        assert h["lr"].iloc[-1] == pytest.approx(0.0, abs=1e-12)


def test_a_config_without_a_budget_gets_the_step_floor_warmup_and_cosine(tmp_path):
    """The defaults (chosen on the cohort zoo): at least 500 optimizer steps however few bags
    a fold has, a linear warm-up over 50 steps to lr 1e-3, then cosine decay."""
    raw = small_config(tmp_path)
    raw["train"] = {"batch_size": 16, "patience": 8}  # no epochs, lr or schedule keys
    cfg = config_from_dict(raw)
    assert (cfg.train.min_steps, cfg.train.schedule, cfg.train.warmup_steps) == (500, "cosine", 50)
    run = run_cv(cfg, tmp_path / "run", folds=[0], progress=False, log=quiet, n_boot=10)
    h = fold_history(run)
    per_epoch = int(h["steps"].iloc[0])
    assert per_epoch <= 2 and h["steps"].sum() >= 500  # ~16 training bags: 250+ epochs
    total = int(h["steps"].sum())
    cosine = 0.5 * (1 + math.cos(math.pi * per_epoch / total))
    assert h["lr"].iloc[0] == pytest.approx(1e-3 * (per_epoch + 1) / 50 * cosine)
    assert h["lr"].max() == pytest.approx(1e-3, rel=0.05)  # the peak, after the warm-up


def test_an_explicit_epoch_count_is_the_budget(tmp_path):
    """train.epochs without train.min_steps runs those epochs (a deliberately short run stays
    short), in the resolved config.yaml too; compare entries follow the same rule."""
    from mil.compare import entry_config

    run = run_cv(
        config_from_dict(small_config(tmp_path, epochs=3)),
        tmp_path / "run",
        folds=[0],
        progress=False,
        log=quiet,
        n_boot=10,
    )
    assert len(fold_history(run)) == 3
    from mil.results import RunFolder

    assert RunFolder(run).read_config().train.min_steps is None
    raw = small_config(tmp_path)
    raw["train"] = {"patience": 8}
    cfg = config_from_dict(raw)
    assert cfg.train.min_steps == 500
    entry = {"label": "short", "model": {"name": "abmil"}, "train": {"epochs": 2}}
    assert entry_config(cfg, entry).train.min_steps is None
    assert entry_config(cfg, {"label": "a", "model": {"name": "abmil"}}).train.min_steps == 500


@pytest.mark.parametrize(
    "key, value", [("min_steps", 0), ("warmup_steps", -1), ("schedule", "step")]
)
def test_budget_keys_are_checked(small_cohort, key, value):
    small_cohort["train"][key] = value
    with pytest.raises(ConfigError, match=f"train.{key}"):
        config_from_dict(small_cohort)
