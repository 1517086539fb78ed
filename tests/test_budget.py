"""The training budget: train.min_steps adds epochs (and holds early stopping back), and the
learning-rate schedule follows its formula step by step."""

from __future__ import annotations

import math

import numpy as np
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
    run = run_cv(config_from_dict(raw), tmp_path / "run", folds=[0], progress=False, log=quiet, n_boot=10)
    h = fold_history(run)
    per_epoch = int(h["steps"].iloc[0])
    assert len(h) == math.ceil(20 / per_epoch) and h["steps"].sum() >= 20
    # patience 1 could have stopped after two epochs; min_steps holds it back
    assert len(h) > 2


@pytest.mark.parametrize("schedule, warmup", [("cosine", 0), ("cosine", 5), ("constant", 4)])
def test_learning_rate_follows_the_schedule(tmp_path, schedule, warmup):
    raw = small_config(tmp_path, epochs=6, lr=1e-3, schedule=schedule, warmup_steps=warmup)
    run = run_cv(config_from_dict(raw), tmp_path / "run", folds=[0], progress=False, log=quiet, n_boot=10)
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


def test_the_default_schedule_keeps_the_learning_rate(tmp_path):
    run = run_cv(config_from_dict(small_config(tmp_path, epochs=3, lr=5e-4)), tmp_path / "run",
                 folds=[0], progress=False, log=quiet, n_boot=10)  # fmt: skip
    np.testing.assert_array_equal(fold_history(run)["lr"], 5e-4)


@pytest.mark.parametrize("key, value", [("min_steps", 0), ("warmup_steps", -1), ("schedule", "step")])
def test_budget_keys_are_checked(small_cohort, key, value):
    small_cohort["train"][key] = value
    with pytest.raises(ConfigError, match=f"train.{key}"):
        config_from_dict(small_cohort)
