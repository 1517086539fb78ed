"""Searching the preprocessing and every other searchable key end to end: each point trains,
each fold selects by validation loss and records its choice, the report says what the folds
chose, and the average of the points' predictions is scored beside the selection (checked
against scikit-learn and scikit-survival on the points' own prediction files)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import roc_auc_score
from sksurv.metrics import concordance_index_censored

from mil.config import SEARCH_DATA_KEYS, SEARCH_TRAIN_KEYS, config_from_dict
from mil.errors import ConfigError
from mil.models import registry as models
from mil.results import RunFolder
from mil.results.checkpoint import read_checkpoint
from mil.train.search import run_search
from tests.conftest import small_config
from tests.test_survival_task import survival_config


def quiet(*a):
    pass


def kept_losses(out, fold: str) -> dict[str, float]:
    """Each point's validation loss of its kept weights, read here from history.csv by hand:
    the row early stopping marked ``best``, else the last epoch's (fixed epochs)."""
    found = {}
    for d in sorted((out / "search").iterdir()):
        h = pd.read_csv(d / f"fold_{fold}" / "history.csv")
        best = (
            h[h["best"].astype(bool)] if "best" in h and h["best"].astype(bool).any() else h.tail(1)
        )
        found[d.name] = float(best["val_loss"].iloc[0])
    return found


@pytest.fixture(scope="module")
def standardize_search(tmp_path_factory):
    """A classification search over the preprocessing and the learning rate (4 points)."""
    root = tmp_path_factory.mktemp("std_search")
    raw = small_config(root, patience=5, faithfulness=False)
    raw["search"] = {"data.standardize": [False, "whiten"], "train.lr": [1.0e-3, 1.0e-2]}
    cfg = config_from_dict(raw, source="std.yaml")
    out = run_search(cfg, root / "out", progress=False, log=quiet, n_boot=50)
    return cfg, out


def test_a_search_over_the_preprocessing_trains_every_point_and_selects_per_fold(
    standardize_search,
):
    cfg, out = standardize_search
    table = pd.read_csv(out / "search.csv", dtype={"fold": str})
    assert list(table.columns) == [
        "fold",
        "point",
        "data.standardize",
        "train.lr",
        "val_loss",
        "selected",
    ]
    points = sorted(p.name for p in (out / "search").iterdir())
    assert len(points) == 4
    for k in ("0", "1", "2"):
        ref = kept_losses(out, k)
        assert set(ref) == set(points)  # every point trained the fold
        rows = table[table["fold"] == k].set_index("point")
        assert np.allclose(rows.loc[list(ref), "val_loss"], list(ref.values()), atol=1e-6)
        best = min(ref, key=ref.get)
        assert rows.index[rows["selected"]].tolist() == [best]
        # the run's fold is that point's, with that point's preprocessing saved with the model
        chosen = rows.loc[best, "data.standardize"]
        ckpt = read_checkpoint(out / f"fold_{k}" / "model.pt")
        assert (ckpt["standardize"] is None) == (chosen in (False, "False"))
        assert (out / f"fold_{k}" / "predictions.csv").read_bytes() == (
            out / "search" / best / f"fold_{k}" / "predictions.csv"
        ).read_bytes()


def test_the_report_says_the_folds_chose_their_preprocessing(standardize_search):
    _, out = standardize_search
    report = (out / "report.md").read_text()
    methods = report.split("## Methods")[1].split("##")[0]
    assert "Features were whitened" not in methods and "Features were standardised" not in methods
    assert "preprocessing was chosen in each fold" in methods and "raw features" in methods
    assert "`train.lr` was chosen in each fold" in methods
    chosen = pd.read_csv(out / "search.csv", dtype={"fold": str}).query("selected")
    section = report.split("## Hyper-parameter search")[1]
    for r in chosen.itertuples():
        assert f"| {r.fold} | `{r.point}` | {r._3} |" in section  # data.standardize column


def test_the_average_of_the_points_is_scored_beside_the_selection(standardize_search):
    """The averaged predictions equal the mean of the points' P(positive) per bag; their
    AUCs (per fold and pooled) and the paired difference agree with scikit-learn."""
    _, out = standardize_search
    summary = json.loads((out / "summary.json").read_text())["search"]
    avg_rows, sel_rows = [], []
    for k in ("0", "1", "2"):
        probs = [
            pd.read_csv(d / f"fold_{k}" / "predictions.csv").set_index("bag_id")["prob_positive"]
            for d in sorted((out / "search").iterdir())
        ]
        by_hand = pd.concat(probs, axis=1).mean(axis=1)
        saved = pd.read_csv(out / "search_average" / f"fold_{k}" / "predictions.csv").set_index(
            "bag_id"
        )
        assert np.allclose(saved.loc[by_hand.index, "prob_positive"], by_hand, atol=1e-12)
        y = saved.loc[by_hand.index, "label_index"]
        record = json.loads((out / "search_average" / f"fold_{k}" / "metrics.json").read_text())
        assert record["metrics"]["auc"] == pytest.approx(roc_auc_score(y, by_hand))
        avg_rows.append(pd.DataFrame({"y": y, "p": by_hand}))
        sel = (
            pd.read_csv(out / f"fold_{k}" / "predictions.csv")
            .set_index("bag_id")
            .loc[by_hand.index]
        )
        sel_rows.append(pd.DataFrame({"y": sel["label_index"], "p": sel["prob_positive"]}))
    avg, sel = pd.concat(avg_rows), pd.concat(sel_rows)
    assert summary["average"]["value"] == pytest.approx(roc_auc_score(avg["y"], avg["p"]))
    assert summary["selected"]["value"] == pytest.approx(roc_auc_score(sel["y"], sel["p"]))
    d = summary["average_minus_selected"]
    assert d["delta"] == pytest.approx(summary["average"]["value"] - summary["selected"]["value"])
    assert d["ci_low"] <= d["delta"] <= d["ci_high"]
    assert len(summary["points"]) == 4 and summary["folds"] == ["0", "1", "2"]
    assert "average minus selected" in (out / "report.md").read_text()


def test_a_finished_search_with_its_average_writes_nothing_when_rerun(standardize_search):
    cfg, out = standardize_search
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    run_search(cfg, out, progress=False, log=quiet, n_boot=50)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_survival_points_are_averaged_on_standardised_risks(tmp_path):
    """Cox risks of a raw and a whitened point have different scales: each is standardised by
    its own training predictions before averaging (checked by hand, C-index by
    scikit-survival)."""
    raw = survival_config(tmp_path, patience=2, faithfulness=False)
    raw["search"] = {"data.standardize": [False, "whiten"]}
    out = run_search(config_from_dict(raw), tmp_path / "out", progress=False, log=quiet, n_boot=20)
    for k in ("0", "1", "2"):
        z = []
        for d in sorted((out / "search").iterdir()):
            test = pd.read_csv(d / f"fold_{k}" / "predictions.csv").set_index("bag_id")
            train = pd.read_csv(d / f"fold_{k}" / "predictions_train.csv")["risk"]
            z.append((test["risk"] - train.mean()) / train.std(ddof=1))
        by_hand = pd.concat(z, axis=1).mean(axis=1)
        saved = pd.read_csv(out / "search_average" / f"fold_{k}" / "predictions.csv").set_index(
            "bag_id"
        )
        assert np.allclose(saved.loc[by_hand.index, "risk"], by_hand, atol=1e-10)
        event = saved.loc[by_hand.index, "event"].astype(bool)
        time = saved.loc[by_hand.index, "time"]
        record = json.loads((out / "search_average" / f"fold_{k}" / "metrics.json").read_text())
        ref = concordance_index_censored(event.to_numpy(), time.to_numpy(), by_hand.to_numpy())[0]
        assert record["metrics"]["c_index"] == pytest.approx(ref)
    assert "c_index" == json.loads((out / "summary.json").read_text())["search"]["metric"]


# ---- every searchable key runs end to end ------------------------------------------------------

#: two values of every key search: accepts (the default model's keys, abmil here, and its name)
VALUES = {
    "train.epochs": [1, 2],
    "train.batch_size": [4, 8],
    "train.lr": [1.0e-3, 1.0e-2],
    "train.weight_decay": [0.0, 1.0e-2],
    "train.optimizer": ["adamw", "sgd"],
    "train.patience": [None, 1],
    "train.min_epochs": [0, 1],
    "train.min_steps": [None, 6],
    "train.schedule": ["constant", "cosine"],
    "train.warmup_steps": [0, 2],
    "train.best_from_epoch": [0, 1],
    "train.subsample": [None, 8],
    "train.precision": ["fp32", "bf16"],
    "train.grad_clip": [None, 1.0],
    "train.sampler": ["random", "balanced"],
    "data.standardize": [False, True],
    "model.name": ["abmil", "mean"],
    "model.hidden_dim": [8, 16],
    "model.attn_dim": [None, 4],
    "model.gated": [True, False],
    "model.dropout": [0.0, 0.25],
}


def test_the_tested_keys_are_the_searchable_ones():
    """A key added to the accepted list without an end-to-end run here fails this test."""
    searchable = {f"train.{k}" for k in SEARCH_TRAIN_KEYS} | set(SEARCH_DATA_KEYS)
    searchable |= {f"model.{k}" for k in models.hyperparameters("abmil")} | {"model.name"}
    assert set(VALUES) == searchable


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    raw = small_config(root, epochs=2, faithfulness=False)
    raw["model"]["hidden_dim"] = 8
    return root, raw


@pytest.mark.parametrize("key", list(VALUES))
def test_every_searchable_key_runs_end_to_end(tiny, key):
    root, raw = tiny
    out = root / key
    cfg = config_from_dict({**raw, "search": {key: VALUES[key]}}, source=f"{key}.yaml")
    run_search(cfg, out, folds=[0], progress=False, log=quiet, n_boot=10)
    section, _, sub = key.partition(".")
    table = pd.read_csv(out / "search.csv", dtype={"fold": str})
    assert len(table) == 2 and table["selected"].sum() == 1
    for point, value in zip(sorted((out / "search").iterdir()), VALUES[key]):
        saved = RunFolder(point).read_config()  # the value reached the point's run
        got = (
            saved.model_name
            if key == "model.name"
            else (
                saved.model.get(sub)
                if section == "model"
                else getattr(getattr(saved, section), sub)
            )
        )
        assert got == value
        assert RunFolder(point).fold_state("0") == "done"
    assert RunFolder(out).fold_state("0") == "done"
    assert (out / "search_average" / "fold_0" / "metrics.json").is_file()


# ---- what cannot be searched, and the verbs that run no search -----------------------------------


@pytest.mark.parametrize("key", ["train.seed", "train.device", "train.threads", "model.tabular"])
def test_keys_that_select_nothing_are_refused_with_the_searchable_list(tmp_path, key):
    with pytest.raises(ConfigError, match="searchable keys: train.{epochs.*data.standardize"):
        config_from_dict({**small_config(tmp_path), "search": {key: [1, 2]}}, source="s.yaml")


def test_a_model_without_hyper_parameters_says_so(tmp_path):
    raw = {**small_config(tmp_path), "search": {"model.name": ["abmil", "meanpool_linear"]}}
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw, source="s.yaml")
    assert "meanpool_linear" in str(err.value) and "takes no model keys but name" in str(err.value)


def test_a_large_grid_is_warned_about_before_it_trains(tmp_path, monkeypatch):
    from mil.train import search

    raw = {
        **small_config(tmp_path),
        "search": {"train.lr": [1e-3, 1e-2], "model.hidden_dim": [8, 16]},
    }
    monkeypatch.setattr(search, "LARGE_GRID", 3)
    monkeypatch.setattr(search, "run_cv", lambda *a, **k: None)  # no training: the warning only
    monkeypatch.setattr(search, "select_folds", lambda *a, **k: [])
    with pytest.warns(
        UserWarning, match="4 points, each trained on every outer fold \\(12 fold trainings\\)"
    ):
        run_search(config_from_dict(raw), tmp_path / "o", progress=False, log=quiet)


@pytest.mark.parametrize("verb", ["compare", "generalize"])
def test_compare_and_generalize_refuse_a_search_in_one_line(tmp_path, capsys, verb):
    from mil.cli import main

    raw = {**small_config(tmp_path), "search": {"data.standardize": [False, "whiten"]}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    args = [verb, str(path), "--out", str(tmp_path / "o")]
    if verb == "generalize":
        ext = tmp_path / "ext.yaml"
        ext.write_text(yaml.safe_dump({"data": raw["data"]}))
        args += ["--external", str(ext)]
    assert main(args) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("mil: error:") == 1
    assert "cannot run its search: block" in err and "mil train" in err
    assert not (tmp_path / "o").exists()
