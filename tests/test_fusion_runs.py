"""Fusion models through the runner: classification from a planted omics signal, and the
discrete-time survival loss on the multimodal demo cohort."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from mil.config import config_from_dict
from mil.data.synthetic_multimodal import multimodal_tabular, write_multimodal_cohort
from mil.train.runner import run_cv


@pytest.mark.filterwarnings("ignore::mil.errors.TrainingWarning")
def test_snn_classifies_from_a_planted_omics_signal(small_cohort, tmp_path):
    """Three omics columns, one carrying the label (plus noise); a fifth of the patients have
    no row. Patients with omics are ranked well, those without get one shared score."""
    raw = small_cohort
    cohort = pd.read_csv(raw["data"]["csv"]).drop_duplicates("case_id")
    rng = np.random.default_rng(0)
    y = (cohort["label"] == "positive").to_numpy(float)
    omics = pd.DataFrame(
        {
            "case_id": cohort["case_id"],
            "g1": 2.0 * y + rng.normal(0, 0.5, len(y)),
            "g2": rng.normal(0, 1, len(y)),
            "g3": rng.normal(5, 2, len(y)),
        }
    )
    keep = rng.uniform(size=len(y)) > 0.2
    omics[keep].to_csv(tmp_path / "omics.csv", index=False)
    raw["data"]["tabular"] = [{"name": "omics", "csv": str(tmp_path / "omics.csv")}]
    raw["model"] = {"name": "snn", "hidden_dim": [16]}
    raw["train"].update(epochs=30, lr=3e-3)
    run = run_cv(
        config_from_dict(raw), tmp_path / "run", progress=False, log=lambda *a: None, n_boot=20
    )
    folds = [pd.read_csv(p) for p in sorted(run.glob("fold_*/predictions.csv"))]
    pred = pd.concat(folds)
    has = pred["modalities"] == "slides+omics"
    assert roc_auc_score(pred.loc[has, "label"], pred.loc[has, "prob_positive"]) > 0.85
    for fold in folds:  # no omics: one score per fold model
        assert fold.loc[fold["modalities"] == "slides", "prob_positive"].round(6).nunique() == 1
    sub = pd.read_csv(run / "subgroups.csv")
    assert set(sub.loc[sub["column"] == "modalities", "value"]) == {"slides+omics", "slides"}


@pytest.mark.filterwarnings("ignore::mil.errors.TrainingWarning")
@pytest.mark.parametrize("name", ["mcat", "survpath"])
def test_group_models_train_with_the_discrete_time_loss(tmp_path, name):
    write_multimodal_cohort(
        tmp_path, n_patients=30, genes_per_family=2, dim=8, min_tiles=10, max_tiles=20
    )
    raw = {
        "name": "mm",
        "task": {"type": "survival", "loss": "nll", "bins": 3},
        "data": {
            "csv": str(tmp_path / "cohort.csv"),
            "features": str(tmp_path / "features"),
            "patient_col": "case_id",
            "time_col": "survival_months",
            "event_col": "censorship",
            "censored_value": 1,
            "standardize": False,
            "tabular": multimodal_tabular(tmp_path),
        },
        "splits": {"dir": str(tmp_path / "splits"), "folds": 2, "val_fraction": 0.2},
        "model": {"name": name, "hidden_dim": 8, "modality_dropout": 0.5},
        "train": {"epochs": 2, "batch_size": 8, "patience": None},
    }
    run = run_cv(
        config_from_dict(raw),
        tmp_path / "run",
        folds=[0],
        progress=False,
        log=lambda *a: None,
        n_boot=20,
    )
    metrics = json.loads((run / "fold_0" / "metrics.json").read_text())["metrics"]
    assert 0.0 <= metrics["c_index"] <= 1.0
    pred = pd.read_csv(run / "fold_0" / "predictions.csv")
    assert pred["risk"].notna().all() and {"slides+rna+clinical", "slides+clinical"} <= set(
        pred["modalities"]
    )
