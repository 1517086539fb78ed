"""``mil train --refit``: one model on every bag, trained for what cross-validation chose.

References: the folds' own ``history.csv`` (which epoch each kept), a hand
computation of the cosine schedule, numpy's mean of every instance, and
scikit-learn's logistic regression fitted directly on the pooled bags."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from mil.cli import main
from mil.config import config_from_dict
from mil.data.readers import read_features
from mil.data.synthetic import write_synthetic_cohort
from mil.errors import MilError
from mil.evaluate import evaluate
from mil.run import Run
from mil.train.refit import refit
from mil.train.runner import run_cv

pytestmark = pytest.mark.filterwarnings("ignore::mil.errors.TrainingWarning")


def quiet(*a):
    pass


def cohort(root, name, seed):
    csv, feats = root / f"{name}.csv", root / f"{name}_features"
    write_synthetic_cohort(
        "classification",
        csv,
        feats,
        seed=seed,
        n_patients=30,
        n_two_slides=0,
        dim=12,
        min_tiles=15,
        max_tiles=40,
        shift_norm=6.0,
    )
    return {"csv": str(csv), "features": str(feats), "patient_col": "case_id"}


def config(root, data, model, train, name):
    return {
        "name": name,
        "task": {"type": "classification"},
        "data": data,
        "splits": {"dir": str(root / "splits"), "folds": 3, "val_fraction": 0.25},
        "model": model,
        "train": {"batch_size": 8, "seed": 0, **train},
    }


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("refit")


@pytest.fixture(scope="module")
def data(root):
    return cohort(root, "internal", seed=3)


@pytest.fixture(scope="module")
def early_run(root, data):
    """An early-stopped ABMIL run with a cosine schedule, refit by the CLI."""
    raw = config(
        root,
        {**data, "standardize": True},
        {"name": "abmil", "hidden_dim": 16},
        {"epochs": 12, "patience": 3, "min_steps": None, "schedule": "cosine", "lr": 1e-3},
        "early",
    )
    path = root / "early.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = root / "run_early"
    assert main(["train", str(path), "--out", str(out), "--refit", "--quiet"]) == 0
    return out


def test_refit_trains_the_median_of_the_epochs_the_folds_kept(early_run):
    kept = []
    for k in range(3):
        hist = pd.read_csv(early_run / f"fold_{k}" / "history.csv")
        kept.append(int(hist.loc[hist["best"], "epoch"].iloc[0]) + 1)
    record = json.loads((early_run / "refit" / "refit.json").read_text())
    assert record["epochs"] == round(float(np.median(kept)))
    assert record["epochs_trained"] == record["epochs"]
    hist = pd.read_csv(early_run / "refit" / "history.csv")
    assert len(hist) == record["epochs"] and "val_loss" not in hist.columns  # nothing held out
    assert record["n_bags"] == len(
        pd.read_csv(early_run / "splits" / "splits_0.csv").melt().dropna()
    )


def test_refit_follows_the_folds_schedule_over_their_budget(early_run):
    """The lr after epoch e is the cosine factor at the same point of a 12-epoch budget (by
    hand), not a schedule squeezed into the shorter refit."""
    record = json.loads((early_run / "refit" / "refit.json").read_text())
    hist = pd.read_csv(early_run / "refit" / "history.csv")
    per_epoch = int(hist["steps"].iloc[0])
    total = record["budget_epochs"] * per_epoch
    assert record["budget_epochs"] == 12
    for e, lr in zip(hist["epoch"], hist["lr"]):
        s = (e + 1) * per_epoch - 1  # the epoch's last step
        expected = 1e-3 * 0.5 * (1 + math.cos(math.pi * min(s + 1, total) / total))
        assert lr == pytest.approx(expected, rel=1e-6)


def test_refit_standardises_with_every_bag(early_run, data):
    payload = Run(early_run).checkpoint("refit")
    files = sorted(Path(data["features"]).glob("*.h5"))
    x = np.concatenate([read_features(p).features.astype(np.float64) for p in files])
    np.testing.assert_allclose(payload["standardize"]["mean"].numpy(), x.mean(0), atol=1e-4)
    fold = Run(early_run).checkpoint(0)["standardize"]["mean"].numpy()
    assert np.abs(fold - x.mean(0)).max() > 1e-3  # a fold saw fewer bags


def test_refit_of_a_linear_baseline_is_sklearns_fit_at_the_folds_median_penalty(
    root, data, tmp_path
):
    raw = config(root, data, {"name": "meanpool_linear"}, {}, "linear")
    cfg = config_from_dict(raw)
    run = run_cv(cfg, tmp_path / "run", progress=False, log=quiet, n_boot=20)
    refit(cfg, run, "cpu", progress=False, log=quiet)
    chosen = []
    for k in range(3):
        hist = pd.read_csv(run / f"fold_{k}" / "history.csv")
        chosen.append(float(hist.loc[hist["best"], "C"].iloc[0]))
    c = float(np.exp(np.median(np.log(chosen))))
    record = json.loads((run / "refit" / "refit.json").read_text())
    assert record["penalty"] == pytest.approx(c)
    table = pd.read_csv(data["csv"], dtype=str)
    paths = [f"{data['features']}/{s}.h5" for s in table["slide_id"]]
    pooled = np.stack([read_features(p).features.astype(np.float64).mean(0) for p in paths])
    z = (pooled - pooled.mean(0)) / pooled.std(0, ddof=1)
    y = (table["label"] == "positive").to_numpy(int)
    expected = LogisticRegression(C=c, max_iter=5000).fit(z, y).predict_proba(z)[:, 1]
    got = Run(run).predict(paths, folds=["refit"])
    np.testing.assert_allclose(got["prob_positive"], expected, atol=2e-3)


def test_evaluate_with_the_refit_model(root, early_run, tmp_path):
    ext = cohort(root, "external", seed=11)
    path = tmp_path / "ext.yaml"
    path.write_text(yaml.safe_dump({"data": ext}))
    summary = evaluate(early_run, path, tmp_path / "eval", n_boot=20, refit=True)
    pred = pd.read_csv(tmp_path / "eval" / "predictions.csv", dtype={"bag_id": str})
    assert (pred["n_folds"] == 1).all() and summary["predictor"] == "refit"
    expected = Run(early_run).predict(
        [f"{ext['features']}/{b}.h5" for b in pred["bag_id"]], folds=["refit"]
    )
    np.testing.assert_allclose(pred["prob_positive"], expected["prob_positive"], atol=1e-6)
    auc = roc_auc_score(pred["label"] == "positive", pred["prob_positive"])
    assert summary["metrics"]["auc"]["value"] == pytest.approx(auc)
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "refit on all" in report and "the median of the epoch counts the folds kept" in report


def test_refit_needs_every_fold_and_evaluate_needs_a_refit(root, data, tmp_path):
    raw = config(
        root, data, {"name": "abmil", "hidden_dim": 8}, {"epochs": 2, "patience": None}, "part"
    )
    cfg = config_from_dict(raw)
    run = run_cv(cfg, tmp_path / "run", folds=[0], progress=False, log=quiet, n_boot=10)
    with pytest.raises(MilError, match="fold 1 is not finished"):
        refit(cfg, run, "cpu", progress=False, log=quiet)
    ext = tmp_path / "ext.yaml"
    ext.write_text(yaml.safe_dump({"data": data}))
    with pytest.raises(MilError, match=r"no refit model .* `mil train CONFIG --out"):
        evaluate(run, ext, tmp_path / "eval", n_boot=10, refit=True)
    assert not (tmp_path / "eval").exists()  # refused before anything was written


def test_refit_of_a_fusion_model_scales_the_tables_on_every_patient(small_cohort, tmp_path):
    """snn on an omics table: the refit's saved scaler is scikit-learn's StandardScaler over
    every patient with omics, and the model reads the table (patients' scores differ)."""
    from sklearn.preprocessing import StandardScaler

    raw = small_cohort
    cases = pd.read_csv(raw["data"]["csv"]).drop_duplicates("case_id")
    rng = np.random.default_rng(1)
    y = (cases["label"] == "positive").to_numpy(float)
    omics = pd.DataFrame(
        {
            "case_id": cases["case_id"],
            "g1": 2 * y + rng.normal(0, 0.5, len(y)),
            "g2": rng.normal(5, 2, len(y)),
        }
    )
    omics = omics[rng.uniform(size=len(y)) > 0.2]
    omics.to_csv(tmp_path / "omics.csv", index=False)
    raw["data"]["tabular"] = [{"name": "omics", "csv": str(tmp_path / "omics.csv")}]
    raw["model"] = {"name": "snn", "hidden_dim": [8]}
    raw["train"].update(epochs=3)
    cfg = config_from_dict(raw)
    run = run_cv(cfg, tmp_path / "run", progress=False, log=quiet, n_boot=10)
    refit(cfg, run, progress=False, log=quiet)
    scaler = Run(run).checkpoint("refit")["standardize"]["tabular"]
    ref = StandardScaler().fit(omics[["g1", "g2"]].to_numpy(float))
    np.testing.assert_allclose(scaler["center"].numpy(), ref.mean_, rtol=1e-5)
    np.testing.assert_allclose(scaler["scale"].numpy(), ref.scale_, rtol=1e-5)
    assert Run(run).checkpoint("refit")["hparams"]["tabular"]  # the layout the model was built with
