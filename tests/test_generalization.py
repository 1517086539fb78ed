"""``mil generalize``: internal CV, site-preserved CV and external cohorts in one table per
model. References: scikit-learn's AUC on each run's own predictions, the runs' folds (a site
never in two partitions), ``mil evaluate``'s summary, and a paired bootstrap that must give a
zero-width interval for identical predictors where an unpaired one would not."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from mil.cli import main
from mil.data.synthetic import write_synthetic_cohort
from mil.metrics import unpaired_difference
from mil.tasks import make_task
from mil.train.gaps import paired_setting_difference

pytestmark = pytest.mark.filterwarnings("ignore::mil.errors.TrainingWarning")


def cohort(root, name, seed, sites):
    csv, feats = root / f"{name}.csv", root / f"{name}_features"
    df = write_synthetic_cohort(
        "classification",
        csv,
        feats,
        seed=seed,
        n_patients=36,
        n_two_slides=0,
        dim=12,
        min_tiles=15,
        max_tiles=40,
        shift_norm=6.0,
    )
    rank = df["case_id"].rank(method="dense").astype(int)
    df["site"] = [sites[r % len(sites)] for r in rank]
    df.to_csv(csv, index=False)
    return {"csv": str(csv), "features": str(feats), "patient_col": "case_id", "site_col": "site"}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("generalize")
    raw = {
        "name": "gen",
        "task": {"type": "classification"},
        "data": cohort(root, "internal", 2, ["A", "B", "C"]),
        "splits": {"folds": 3, "val_fraction": 0.25},
        "model": {"name": "abmil", "hidden_dim": 16},
        "train": {"epochs": 8, "batch_size": 8, "patience": None, "seed": 0},
    }
    config = root / "gen.yaml"
    config.write_text(yaml.safe_dump(raw))
    ext = root / "hospital_x.yaml"
    ext.write_text(yaml.safe_dump({"data": cohort(root, "external", 9, ["X"])}))
    out = root / "out"
    argv = ["generalize", str(config), "--external", str(ext), "--out", str(out)]
    assert main([*argv, "--n-boot", "50", "--refit", "--quiet"]) == 0
    return out


def oof_auc(run_dir) -> float:
    pred = pd.concat(pd.read_csv(p) for p in sorted(run_dir.glob("fold_*/predictions.csv")))
    return roc_auc_score(pred["label"] == "positive", pred["prob_positive"])


def test_one_row_per_setting_each_scored_like_sklearn(study):
    table = pd.read_csv(study / "generalization.csv")
    table[["cohort", "pairing"]] = table[["cohort", "pairing"]].fillna("")
    auc = table[table["metric"] == "auc"].set_index("setting")
    assert list(auc.index) == ["internal CV", "site-preserved CV", "external"]
    internal, site = oof_auc(study / "abmil" / "internal"), oof_auc(study / "abmil" / "site")
    assert auc.loc["internal CV", "value"] == pytest.approx(internal, abs=1e-12)
    assert auc.loc["site-preserved CV", "value"] == pytest.approx(site, abs=1e-12)
    assert auc.loc["site-preserved CV", "delta"] == pytest.approx(site - internal, abs=1e-12)
    ext = pd.read_csv(study / "abmil" / "external" / "hospital_x" / "predictions.csv")
    ext_auc = roc_auc_score(ext["label"] == "positive", ext["prob_positive"])
    assert auc.loc["external", "value"] == pytest.approx(ext_auc, abs=1e-12)
    assert auc.loc["external", "delta"] == pytest.approx(ext_auc - internal, abs=1e-12)
    assert auc.loc["site-preserved CV", "pairing"].startswith("paired")
    assert auc.loc["external", "pairing"].startswith("unpaired")
    for r in auc.itertuples():
        assert r.ci_low <= r.value <= r.ci_high
    md = (study / "generalization.md").read_text()
    assert "## abmil" in md and "| external: hospital_x | auc |" in md
    summary = json.loads((study / "abmil" / "external" / "hospital_x" / "summary.json").read_text())
    assert (
        summary["predictor"] == "refit"
        and (study / "abmil" / "internal" / "refit" / "model.pt").is_file()
    )


def test_site_preserved_folds_never_test_a_site_they_trained_on(study):
    data = pd.read_csv(study.parent / "internal.csv", dtype=str)
    site_of = dict(zip(data["slide_id"], data["site"]))
    for path in sorted((study / "splits_site").glob("splits_?.csv")):
        s = pd.read_csv(path, dtype=str)
        test = {site_of[x] for x in s["test"].dropna()}
        train = {site_of[x] for x in s["train"].dropna()}
        assert test and not test & train
    internal = pd.read_csv(study / "splits_internal" / "splits_0.csv", dtype=str)
    test = {site_of[x] for x in internal["test"].dropna()}
    assert len(test) > 1  # patient-level folds mix the sites


def test_the_site_difference_is_paired_on_patients(tmp_path):
    """Two identical predictors: the paired interval is exactly 0, the unpaired one is not."""
    rng = np.random.default_rng(0)
    n = 60
    y = rng.integers(0, 2, n)
    p = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.25, n), 0, 1)
    pred = pd.DataFrame(
        {
            "bag_id": [f"b{i}" for i in range(n)],
            "patient_id": [f"p{i // 2}" for i in range(n)],
            "label": np.where(y == 1, "pos", "neg"),
            "label_index": y,
            "prob_neg": 1 - p,
            "prob_pos": p,
            "fold_dir": "fold_0",
        }
    )
    from mil.config import config_from_dict

    cfg = config_from_dict(
        {"name": "t", "task": {"type": "classification"}, "data": {"csv": "x.csv", "features": "f"}}
    )
    task = make_task(cfg, ["neg", "pos"])
    shuffled = pred.sample(frac=1.0, random_state=1).reset_index(drop=True)
    d = paired_setting_difference(task, shuffled, pred, n_boot=200)["auc"]
    assert d["delta"] == 0 and d["ci_low"] == 0 and d["ci_high"] == 0

    def score(frame):
        def auc(rows):
            return {
                "auc": roc_auc_score(frame["label_index"].iloc[rows], frame["prob_pos"].iloc[rows])
            }

        return auc

    u = unpaired_difference(score(pred), n, score(pred), n, n_boot=200)["auc"]
    assert u["ci_high"] - u["ci_low"] > 0.05
    worse = pred.assign(prob_pos=rng.random(n))
    d = paired_setting_difference(task, worse, pred, n_boot=200)["auc"]
    expected = roc_auc_score(y, worse["prob_pos"]) - roc_auc_score(y, p)
    assert (
        d["delta"] == pytest.approx(expected, abs=1e-12)
        and d["ci_low"] <= d["delta"] <= d["ci_high"]
    )
