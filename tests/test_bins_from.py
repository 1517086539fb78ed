"""``task.bins_from``: discrete-time bins at quantiles of the training fold's event times (the
default) or of the whole cohort's (MCAT/Patch-GCN/SurvPath's labelling, for reproduction only,
said in report.md). Reference: numpy quantiles of the event times read from the CSV and the
split files."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mil.config import config_from_dict
from mil.data.synthetic import write_synthetic_cohort
from mil.train.runner import run_cv

pytestmark = pytest.mark.filterwarnings("ignore::mil.errors.TrainingWarning")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("bins")
    csv, feats = root / "surv.csv", root / "features"
    write_synthetic_cohort(
        "survival",
        csv,
        feats,
        seed=4,
        n_patients=40,
        n_two_slides=0,
        dim=8,
        min_tiles=10,
        max_tiles=30,
    )
    return root, csv, feats


def run(cohort, bins_from):
    root, csv, feats = cohort
    cfg = config_from_dict(
        {
            "name": f"bins_{bins_from}",
            "task": {"type": "survival", "loss": "nll", "bins": 4, "bins_from": bins_from},
            "data": {
                "csv": str(csv),
                "features": str(feats),
                "patient_col": "case_id",
                "time_col": "survival_months",
                "event_col": "censorship",
                "censored_value": 1,
            },
            "splits": {"dir": str(root / "splits"), "folds": 3, "val_fraction": 0.2},
            "model": {"name": "abmil", "hidden_dim": 8},
            "train": {"epochs": 1, "batch_size": 8, "patience": None},
        }
    )
    return run_cv(cfg, root / bins_from, progress=False, log=lambda *a: None, n_boot=10)


def quartiles(df: pd.DataFrame) -> np.ndarray:
    observed = df.loc[df["censorship"] == 0, "survival_months"].to_numpy(float)
    return np.quantile(observed, [0.25, 0.5, 0.75])


@pytest.mark.parametrize("bins_from", ["fold", "cohort"])
def test_bins_come_from_the_training_fold_or_the_whole_cohort(cohort, bins_from):
    root, csv, _ = cohort
    out = run(cohort, bins_from)
    table = pd.read_csv(csv, dtype={"slide_id": str})
    report = (out / "report.md").read_text()
    for k in range(3):
        cuts = json.loads((out / f"fold_{k}" / "metrics.json").read_text())["metrics"]["bin_cuts"]
        split = pd.read_csv(root / "splits" / f"splits_{k}.csv", dtype=str)
        train = table[table["slide_id"].isin(split["train"].dropna())]
        expected = quartiles(table if bins_from == "cohort" else train)
        np.testing.assert_allclose(cuts, expected, rtol=1e-9)
        if bins_from == "fold":
            assert np.abs(np.array(cuts) - quartiles(table)).max() > 1e-9  # not the cohort's
    assert ("test folds included" in report) == (bins_from == "cohort")
