"""Class-specific instance scores through a run: attention.h5, metrics.json, mil.Run, the CLI.

Independent references: scikit-learn's ROC AUC over the saved scores and the feature
files' instance labels; the saved predictions' log-odds (and Cox risks), which the
saved contributions must add up to with the fold model's bias.
"""

from __future__ import annotations

import json

import h5py
import matplotlib
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from mil.cli import main
from mil.config import config_from_dict
from mil.data.synthetic import write_synthetic_cohort
from mil.models.base import DEFAULT_SCORE_KIND
from mil.run import Run
from mil.train.runner import run_cv
from tests.conftest import small_config

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    cfg = config_from_dict(small_config(root, epochs=6, lr=3e-3))
    return run_cv(cfg, root / "run", progress=False, log=lambda *a: None, n_boot=20)


def saved(run_dir, fold: int, kind: str) -> dict[str, np.ndarray]:
    with h5py.File(run_dir / f"fold_{fold}" / "attention.h5", "r") as f:
        return {g.attrs["bag_id"]: g[f"scores_{kind}"][()] for g in f.values()}


def instance_labels(run_dir, bag_id: str) -> np.ndarray:
    feats = Run(run_dir).config.data.features
    with h5py.File(f"{feats}/{bag_id}.h5", "r") as f:
        return f["instance_label"][()]


def test_witness_metrics_per_kind_match_sklearn(run_dir):
    for k in range(3):
        m = json.loads((run_dir / f"fold_{k}" / "metrics.json").read_text())["metrics"]
        pred = pd.read_csv(run_dir / f"fold_{k}" / "predictions.csv", dtype={"bag_id": str})
        logits = saved(run_dir, k, "instance_logits")
        y = np.concatenate([instance_labels(run_dir, b) for b in logits])
        s = np.concatenate([v[:, -1] for v in logits.values()])
        assert m["witness_auc_pooled_instance_logits"] == pytest.approx(roc_auc_score(y, s))
        contrib = saved(run_dir, k, "contribution")
        within = [
            roc_auc_score(instance_labels(run_dir, b), contrib[b][:, -1])
            for b in pred.loc[pred["label"] == "positive", "bag_id"]
            if len(np.unique(instance_labels(run_dir, b))) == 2
        ]
        assert m["witness_auc_contribution"] == pytest.approx(np.mean(within))
        assert "witness_auc_pooled_contribution" not in m  # not comparable across bags
        for key in (
            "deletion_main",
            f"deletion_{DEFAULT_SCORE_KIND}",
            "deletion_random",
            "insertion_random",
        ):
            assert 0.0 <= m[key] <= 1.0, key


def test_saved_contributions_add_up_to_the_predicted_log_odds(run_dir):
    run = Run(run_dir)
    for k in range(3):
        bias = run.model(k).head.bias.detach().numpy()
        pred = pd.read_csv(run_dir / f"fold_{k}" / "predictions.csv", dtype={"bag_id": str})
        contrib = saved(run_dir, k, "contribution")
        for row in pred.itertuples():
            c = contrib[row.bag_id]  # centred over the two classes: column 1 = -column 0
            np.testing.assert_allclose(c[:, 0], -c[:, 1], atol=1e-6)
            log_odds = np.log(row.prob_positive / row.prob_negative)
            assert 2 * c[:, 1].sum() + bias[1] - bias[0] == pytest.approx(log_odds, abs=1e-4)


def test_score_option_of_topk_and_the_default(run_dir, tmp_path):
    run = Run(run_dir)
    slide = run.top_slides(1)[0]
    out = tmp_path / "top.csv"
    argv = ["topk", str(run_dir), "--slide", slide, "--k", "4", "--score", "instance_logits"]
    assert main([*argv, "--out", str(out)]) == 0
    expected = run.scores(slide, kind="instance_logits")
    np.testing.assert_allclose(pd.read_csv(out)["score"], np.sort(expected["score"])[::-1][:4])
    assert expected.attrs["kind"] == "instance_logits[positive]"
    assert run.scores(slide).attrs["kind"] == f"{DEFAULT_SCORE_KIND}[positive]"  # the default
    assert run.scores(slide, kind=None).attrs["kind"] == "score"  # the model's attention


def test_survival_contributions_are_signed_shares_of_the_risk(tmp_path):
    csv, feats = tmp_path / "cohort.csv", tmp_path / "features"
    write_synthetic_cohort(
        "survival", csv, feats, n_patients=40, n_two_slides=0, dim=16, min_tiles=20, max_tiles=60
    )
    raw = {
        "name": "surv",
        "task": {"type": "survival"},
        "data": {
            "csv": str(csv),
            "features": str(feats),
            "patient_col": "case_id",
            "time_col": "survival_months",
            "event_col": "censorship",
            "censored_value": 1,
        },
        "splits": {"dir": str(tmp_path / "splits"), "folds": 2, "val_fraction": 0.2, "seed": 0},
        "model": {"name": "abmil", "hidden_dim": 16},
        "train": {"epochs": 2, "batch_size": 16, "patience": None, "seed": 0},
        "ensemble": [],  # predictions.csv holds the model's own risks
    }
    run_dir = run_cv(
        config_from_dict(raw), tmp_path / "run", progress=False, log=lambda *a: None, n_boot=20
    )
    run = Run(run_dir)
    bias = float(run.model(0).head.bias.detach()[0])
    pred = pd.read_csv(run_dir / "fold_0" / "predictions.csv", dtype={"bag_id": str})
    contrib = saved(run_dir, 0, "contribution")
    signs = set()
    for row in pred.itertuples():
        assert contrib[row.bag_id].sum() + bias == pytest.approx(row.risk, abs=1e-4)
        signs |= set(np.sign(contrib[row.bag_id][:, 0]).tolist())
    assert {-1.0, 1.0} <= signs  # tiles that raise and tiles that lower the risk
    fig = run.heatmap(pred["bag_id"].iloc[0], top_k=0)
    image = fig.axes[0].images[0]
    assert image.get_cmap().name.startswith("RdBu_r") and image.get_clim() == (-1.0, 1.0)


def test_fold_scores_of_attention_equal_the_saved_main_scores(run_dir):
    run = Run(run_dir)
    slide = run.predictions(fold=1)["bag_id"].iloc[0]
    fresh = run.fold_scores(slide, folds=[1], kind="attention")
    np.testing.assert_allclose(fresh["fold_1"], run.scores(slide, kind=None)["score"], atol=1e-5)
