"""End-to-end cross-validation on a small cohort: outputs, metrics, resume, repeatability."""

import json
import os

import h5py
import numpy as np
import pandas as pd
import torch
from sklearn import metrics as skm

from mil.config import config_from_dict
from mil.train.runner import load_model, run_cv
from mil.train.summary import summarize


def quiet(*a):
    pass


def test_run_writes_contract_and_metrics_match_sklearn(tmp_path, small_cohort):
    cfg = config_from_dict(small_cohort)
    run = run_cv(cfg, tmp_path / "run", progress=False, log=quiet)
    for k in range(3):
        d = run / f"fold_{k}"
        for name in ("history.csv", "metrics.json", "predictions.csv", "attention.h5", "model.pt"):
            assert (d / name).is_file(), name
        pred = pd.read_csv(d / "predictions.csv")
        m = json.loads((d / "metrics.json").read_text())["metrics"]
        y, p = pred["label_index"].to_numpy(), pred[["prob_negative", "prob_positive"]].to_numpy()
        assert np.isclose(m["auc"], skm.roc_auc_score(y, p[:, 1]))
        assert np.isclose(m["balanced_accuracy"], skm.balanced_accuracy_score(y, p.argmax(1)))
        assert np.isclose(m["accuracy"], skm.accuracy_score(y, p.argmax(1)))
        assert np.isclose(m["f1"], skm.f1_score(y, p.argmax(1), average="macro"))
        assert m["confusion_matrix"] == skm.confusion_matrix(y, p.argmax(1)).tolist()
        # the test bags are exactly the split's test slides
        split = pd.read_csv(run / "splits" / f"splits_{k}.csv")
        assert sorted(pred["bag_id"]) == sorted(split["test"].dropna())
        # instance scores: one per tile, beside the coords
        with h5py.File(d / "attention.h5", "r") as f:
            g = f[pred["bag_id"].iloc[0]]
            assert g["scores"].shape[0] == g["coords"].shape[0] > 0
        model, meta = load_model(d / "model.pt")
        assert meta["classes"] == ["negative", "positive"]
    s = json.loads((run / "summary.json").read_text())
    aucs = [
        json.loads((run / f"fold_{k}" / "metrics.json").read_text())["metrics"]["auc"]
        for k in range(3)
    ]
    assert s["metrics"]["auc"]["folds"] == aucs
    assert np.isclose(s["metrics"]["auc"]["mean"], np.mean(aucs))
    assert np.isclose(s["metrics"]["auc"]["sd"], np.std(aucs, ddof=1))
    lo, hi = s["metrics"]["auc"]["ci95_pooled"]
    assert 0 <= lo <= hi <= 1
    table = pd.read_csv(run / "summary.csv")
    assert table["fold"].tolist()[:3] == ["0", "1", "2"] or table["fold"].astype(str).tolist()[
        :3
    ] == ["0", "1", "2"]


def test_resume_skips_finished_folds_and_summarize_rebuilds(tmp_path, small_cohort):
    cfg = config_from_dict(small_cohort)
    run = run_cv(cfg, tmp_path / "run", folds=[0], progress=False, log=quiet)
    first = run / "fold_0" / "metrics.json"
    stamp = first.stat().st_mtime_ns
    os.utime(first, ns=(stamp - 10**9, stamp - 10**9))
    stamp = first.stat().st_mtime_ns
    messages = []
    run_cv(cfg, run, progress=False, log=messages.append)
    assert first.stat().st_mtime_ns == stamp  # fold 0 not retrained
    assert any("fold 0: done earlier" in m for m in messages)
    assert (run / "fold_2" / "metrics.json").is_file()
    (run / "summary.json").unlink()
    s = summarize(run)
    assert s["folds"] == ["0", "1", "2"] and (run / "summary.json").is_file()


def test_resume_refuses_another_config_but_not_one_saved_before_a_new_default(
    tmp_path, small_cohort
):
    import copy

    import pytest
    import yaml

    from mil.errors import ConfigError
    from mil.train.runner import prepare_run_dir

    cfg = config_from_dict(small_cohort)
    run = run_cv(cfg, tmp_path / "run", folds=[0], progress=False, log=quiet)
    saved = run / "config.yaml"
    before = saved.read_text()
    # another learning rate: refused, naming the folder, and nothing is overwritten
    other = copy.deepcopy(small_cohort)
    other["train"]["lr"] = 0.123
    with pytest.raises(ConfigError, match="holds a run of a different config"):
        run_cv(config_from_dict(other), run, progress=False, log=quiet)
    assert saved.read_text() == before
    # a config written by an older mil that lacked keys now filled with their defaults
    old = yaml.safe_load(before)
    old["train"].pop("best_from_epoch")
    old["train"].pop("precision")
    saved.write_text(yaml.safe_dump(old, sort_keys=False))
    prepare_run_dir(cfg, run)  # the same run: accepted
    with pytest.raises(ConfigError, match="different config"):
        prepare_run_dir(config_from_dict(other), run)


def test_runs_are_repeatable(tmp_path, small_cohort):
    """Two runs of one config predict the same; skipping the deletion/insertion passes
    (train.faithfulness: false) drops their metrics and changes nothing else."""
    cfg = config_from_dict(small_cohort)
    a = run_cv(cfg, tmp_path / "a", folds=[1], progress=False, log=quiet)
    raw = {**small_cohort, "train": {**small_cohort["train"], "faithfulness": False}}
    b = run_cv(config_from_dict(raw), tmp_path / "b", folds=[1], progress=False, log=quiet)
    pa = pd.read_csv(a / "fold_1" / "predictions.csv")
    pb = pd.read_csv(b / "fold_1" / "predictions.csv")
    pd.testing.assert_frame_equal(pa, pb)
    ma, mb = (json.loads((r / "fold_1" / "metrics.json").read_text())["metrics"] for r in (a, b))
    assert {k for k in ma if k.startswith(("deletion_", "insertion_"))} >= {
        "deletion_main",
        "deletion_random",
    }
    assert not [k for k in mb if k.startswith(("deletion_", "insertion_"))]
    assert (ma["auc"], ma["witness_auc"]) == (mb["auc"], mb["witness_auc"])


def test_early_stopping_restores_best_checkpoint(tmp_path, small_cohort):
    raw = dict(small_cohort)
    raw["train"] = {**raw["train"], "epochs": 12, "patience": 3, "lr": 3e-3}
    cfg = config_from_dict(raw)
    run = run_cv(cfg, tmp_path / "run", folds=[0], progress=False, log=quiet)
    hist = pd.read_csv(run / "fold_0" / "history.csv")
    best = hist.loc[hist["best"]]
    assert len(best) == 1 and best["val_loss"].iloc[0] == hist["val_loss"].min()
    # the restored model reproduces the best epoch's validation loss
    from mil.data.cohort import Cohort
    from mil.data.dataset import BagDataset, FeatureStore
    from mil.tasks import make_task
    from mil.train.loop import predict

    model, meta = load_model(run / "fold_0" / "model.pt")
    cohort = Cohort.from_config(cfg)
    split = pd.read_csv(run / "splits" / "splits_0.csv")
    val = cohort.bags[cohort.bags["bag_id"].isin(split["val"].dropna())].reset_index(drop=True)
    from mil.data.transforms import Standardizer

    norm = Standardizer.from_state(meta["standardize"])  # the fold's own (default) whitening
    data = BagDataset(cohort.bag_slides, FeatureStore.from_dir(cfg.data.features)).with_transform(
        norm.apply
    )
    task = make_task(cfg, cohort.classes)
    task.setup_fold(val)
    fwd = predict(model, data, val["bag_id"].tolist(), 8192, torch.device("cpu"))
    assert np.isclose(
        float(task.loss(fwd.logits, task.targets(val))), best["val_loss"].iloc[0], atol=1e-5
    )


def test_best_from_epoch_skips_early_checkpoints(tmp_path, small_cohort):
    raw = dict(small_cohort)
    raw["train"] = {**raw["train"], "epochs": 12, "patience": 3, "lr": 3e-3}
    run = run_cv(config_from_dict(raw), tmp_path / "a", folds=[0], progress=False, log=quiet)
    first = pd.read_csv(run / "fold_0" / "history.csv")
    k = int(first.loc[first["val_loss"].idxmin(), "epoch"]) + 1  # the run's best is now too early
    raw["train"]["best_from_epoch"] = k
    run = run_cv(config_from_dict(raw), tmp_path / "b", folds=[0], progress=False, log=quiet)
    hist = pd.read_csv(run / "fold_0" / "history.csv")
    # the same training up to where the first run stopped (seeded), a later checkpoint
    n = min(len(first), len(hist))
    np.testing.assert_allclose(hist["val_loss"][:n], first["val_loss"][:n], rtol=1e-6)
    best = hist.loc[hist["best"]]
    eligible = hist[hist["epoch"] >= k]
    assert len(best) == 1 and int(best["epoch"].iloc[0]) >= k
    assert best["val_loss"].iloc[0] == eligible["val_loss"].min()
    assert len(hist) >= min(12, k + 3)  # patience counts from epoch k


def test_patient_level_bags(tmp_path, small_cohort):
    raw = dict(small_cohort)
    raw["data"] = {**raw["data"], "bag_level": "patient"}
    raw["splits"] = {**raw["splits"], "dir": str(tmp_path / "psplits")}
    cfg = config_from_dict(raw)
    run = run_cv(cfg, tmp_path / "run", folds=[0], progress=False, log=quiet)
    pred = pd.read_csv(run / "fold_0" / "predictions.csv")
    assert (pred["bag_id"] == pred["patient_id"]).all()
    cohort = pd.read_csv(raw["data"]["csv"])
    two = cohort["case_id"].value_counts()
    two = two[two == 2].index
    with h5py.File(run / "fold_0" / "attention.h5", "r") as f:
        for bag in pred["bag_id"]:
            if bag in two:
                g = f[bag]
                assert (
                    len(g.attrs["slides"]) == 2 and g["scores"].shape[0] == g.attrs["slide_ptr"][-1]
                )


def test_witness_auc_equals_sklearn_on_saved_scores(tmp_path, small_cohort):
    cfg = config_from_dict(small_cohort)
    run = run_cv(cfg, tmp_path / "run", folds=[0], progress=False, log=quiet, n_boot=20)
    m = json.loads((run / "fold_0" / "metrics.json").read_text())["metrics"]
    pred = pd.read_csv(run / "fold_0" / "predictions.csv")
    aucs = []
    with h5py.File(run / "fold_0" / "attention.h5", "r") as f:
        for bag in pred.loc[pred["label"] == "positive", "bag_id"]:
            with h5py.File(f"{small_cohort['data']['features']}/{bag}.h5", "r") as g:
                truth = g["instance_label"][()]
            aucs.append(skm.roc_auc_score(truth, f[bag]["scores"][()]))
    assert np.isclose(m["witness_auc"], np.mean(aucs))


def test_out_of_fold_roc_matches_sklearn(tmp_path, small_cohort):
    cfg = config_from_dict(small_cohort)
    run = run_cv(cfg, tmp_path / "run", progress=False, log=quiet)
    pred = pd.concat(pd.read_csv(run / f"fold_{k}" / "predictions.csv") for k in range(3))
    curves = pd.read_csv(run / "roc.csv", dtype={"fold": str})
    assert set(curves["class"]) == {"positive"} and set(curves["fold"]) == {"0", "1", "2", "pooled"}
    pooled = curves[curves["fold"] == "pooled"]
    fpr, tpr, _ = skm.roc_curve(pred["label_index"], pred["prob_positive"])
    np.testing.assert_allclose(pooled["fpr"], fpr)
    np.testing.assert_allclose(pooled["tpr"], tpr)
    s = json.loads((run / "summary.json").read_text())
    assert s["auc_pooled"] == skm.roc_auc_score(pred["label_index"], pred["prob_positive"])
    assert (run / "roc.png").stat().st_size > 1000


def test_out_of_fold_roc_multiclass_one_vs_rest(tmp_path, small_cohort):
    csv = pd.read_csv(small_cohort["data"]["csv"])
    third = csv["case_id"].isin(csv["case_id"].drop_duplicates().iloc[::3])
    csv.loc[third, "label"] = "other"  # by patient, so a patient keeps one label
    path = tmp_path / "three.csv"
    csv.to_csv(path, index=False)
    small_cohort["data"]["csv"] = str(path)
    small_cohort["splits"]["dir"] = str(tmp_path / "splits3")
    run = run_cv(config_from_dict(small_cohort), tmp_path / "run", progress=False, log=quiet)
    pred = pd.concat(pd.read_csv(run / f"fold_{k}" / "predictions.csv") for k in range(3))
    s = json.loads((run / "summary.json").read_text())
    classes = sorted(csv["label"].unique())
    assert sorted(s["auc_pooled"]) == classes
    for k, c in enumerate(classes):
        y = pred["label_index"] == k
        assert s["auc_pooled"][c] == skm.roc_auc_score(y, pred[f"prob_{c}"])
