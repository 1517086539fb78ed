"""Reliability of the core surfaces on bad input, organised by surface: the cohort CSV, splits,
training, metrics, the run folder and its files, and fold state that must not leak between
folds (the first bad-input probe, shared/reports/reliability-probe.md, F1-F12, each reproduced;
the probe row is named in each section). The second probe's surfaces have files of their own:
``test_reliability_evaluate.py`` (``mil evaluate``), ``test_reliability_tables.py`` (tables and
``mil check``), ``test_reliability_runs.py`` (refit, generalize, compare labels, diagnostics,
CLI messages) and ``test_search_keys.py`` (``search:``)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import threading
import time
import unicodedata
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from sklearn import metrics as skm

from mil.cli import main
from mil.config import config_from_dict
from mil.data.cohort import Cohort, PatientColumnWarning
from mil.data.readers import read_features
from mil.errors import ConfigError, DataError, MilError, MilWarning, SplitError, TrainingError
from mil.io import atomic_path, remove_orphan_temps, run_lock, safe_filename, write_json
from mil.metrics import classification_metrics
from mil.run import Run
from mil.splits import make_splits
from mil.train.runner import load_model, resolve_device, run_cv
from mil.train.summary import format_summary, summarize
from tests.conftest import small_config
from tests.test_survival_task import survival_config


def quiet(*a):
    pass


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_cfg(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def one_slide_cohort(root: Path, n: int, kind: str, dim: int = 8, seed: int = 1) -> dict:
    """``n`` one-slide patients (the probe's build2.py): classes A/B/C in 2:2:1, or time/event."""
    feats = root / "features"
    feats.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n):
        sid = f"Q{p:03d}"
        lab = "ABC"[0 if p % 5 in (0, 1) else 1 if p % 5 in (2, 3) else 2]
        x = rng.normal(0, 1, (int(rng.integers(10, 30)), dim)) + "ABC".index(lab) * 0.5
        with h5py.File(feats / f"{sid}.h5", "w") as f:
            f.create_dataset("features", data=x.astype(np.float32))
        rows.append(
            dict(
                case_id=sid,
                slide_id=sid,
                label=lab,
                time=float(rng.uniform(1, 80)),
                event=int(rng.random() < 0.5),
            )
        )
    pd.DataFrame(rows).to_csv(root / "cohort.csv", index=False)
    task = {"type": "classification"} if kind == "3class" else {"type": "survival"}
    return {
        "name": kind,
        "task": task,
        "data": {"csv": str(root / "cohort.csv"), "features": str(feats)},
        "splits": {"folds": 5, "val_fraction": 0.15},
        "model": {"name": "abmil", "hidden_dim": 8},
        "train": {"epochs": 2, "batch_size": 8, "patience": None},
    }


# ---- cohort CSV: an instance_label of the wrong length (F1) ------------------------------------------------


def test_f1_instance_label_of_wrong_length_is_named_at_read_and_by_check(tmp_path, capsys):
    raw = small_config(tmp_path)
    path = sorted(Path(raw["data"]["features"]).glob("*.h5"))[2]
    with h5py.File(path, "a") as f:
        n = f["features"].shape[0]
        del f["instance_label"]
        f.create_dataset("instance_label", data=np.zeros(n + 3, np.int8))
    with pytest.raises(
        DataError,
        match=rf"{path.name}: instance_label of shape \({n + 3},\) does not match {n} tiles",
    ):
        read_features(path)
    code, out, _ = cli(capsys, "check", write_cfg(tmp_path / "cfg.yaml", raw))
    assert code == 1 and path.stem in out and "instance_label" in out
    with h5py.File(path, "a") as f:  # values other than 0/1 are refused too
        del f["instance_label"]
        f.create_dataset("instance_label", data=np.full(n, 2, np.int8))
    with pytest.raises(DataError, match="instance_label must hold 0/1"):
        read_features(path)


# ---- cohort CSV: a missing or misspelt patient column (F2) ---------------------------------------------


def _rename_patient_column(raw: dict, new: str) -> None:
    df = pd.read_csv(raw["data"]["csv"], dtype=str)
    df.rename(columns={"case_id": new}).to_csv(raw["data"]["csv"], index=False)


def test_f2_named_patient_column_missing_is_an_error(tmp_path, capsys):
    raw = small_config(tmp_path)
    _rename_patient_column(raw, "patient")
    raw["data"]["patient_col"] = "case_id"
    cfg = write_cfg(tmp_path / "cfg.yaml", raw)
    code, _, err = cli(capsys, "train", cfg, "--out", tmp_path / "run", "--quiet")
    assert code == 2 and "'case_id' (data.patient_col) not in the CSV" in err and "patient" in err
    assert "Traceback" not in err
    code, out, _ = cli(capsys, "check", cfg)
    assert code == 1 and "data.patient_col" in out


def test_f2_default_patient_column_absent_warns_in_check_and_train(tmp_path, capsys):
    raw = small_config(tmp_path, epochs=1)
    _rename_patient_column(raw, "patient")
    del raw["data"]["patient_col"]
    with pytest.warns(PatientColumnWarning, match="every slide counts as its own patient"):
        cohort = Cohort.from_config(config_from_dict(raw))
    assert (cohort.slides["patient_id"] == cohort.slides["slide_id"]).all()
    cfg = write_cfg(tmp_path / "cfg.yaml", raw)
    code, out, _ = cli(capsys, "check", cfg)
    assert code == 0 and "warning" in out and "data.patient_col" in out
    with pytest.warns(PatientColumnWarning, match="data.patient_col"):  # printed as mil: warning:
        run_cv(
            config_from_dict(raw), tmp_path / "run", folds=[0], progress=False, log=quiet, n_boot=20
        )
    # set to the real column, the patients' slides are grouped again and never cross folds
    raw["data"]["patient_col"] = "patient"
    cohort = Cohort.from_config(config_from_dict(raw))
    two = cohort.slides.groupby("patient_id")["slide_id"].count()
    assert (two > 1).sum() == 6


def test_f2_runs_saved_with_the_old_default_resume(tmp_path):
    """A run whose config.yaml says patient_col: case_id (the earlier default) is the same run."""
    raw = small_config(tmp_path, epochs=1)
    del raw["data"]["patient_col"]
    run = run_cv(
        config_from_dict(raw), tmp_path / "run", folds=[0], progress=False, log=quiet, n_boot=20
    )
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["patient_col"] is None
    saved["data"]["patient_col"] = "case_id"
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    run_cv(config_from_dict(raw), run, folds=[1], progress=False, log=quiet, n_boot=20)
    assert (run / "fold_1" / "metrics.json").is_file()


# ---- metrics: three classes, a validation set holding two of them (F3) --------------------------------


def test_f3_auc_over_two_of_three_classes_is_the_binary_auc_of_their_share():
    rng = np.random.default_rng(0)
    prob = rng.dirichlet(np.ones(3), size=20)
    y = np.where(rng.random(20) < 0.5, 0, 2)
    m = classification_metrics(y, prob)
    share = prob[:, 2] / (prob[:, 0] + prob[:, 2])
    assert np.isclose(m["auc"], skm.roc_auc_score(y == 2, share))
    assert np.isclose(m["balanced_accuracy"], skm.balanced_accuracy_score(y, prob.argmax(1)))


def test_f3_three_class_cohort_at_default_splits_trains(tmp_path):
    raw = one_slide_cohort(tmp_path, 30, "3class")  # 12/12/6, folds 5, val_fraction 0.15
    run = run_cv(config_from_dict(raw), tmp_path / "run", progress=False, log=quiet, n_boot=20)
    assert len(list(run.glob("fold_*/metrics.json"))) == 5


# ---- cohort CSV: a survival time of inf (F4) -----------------------------------------------------------------


def test_f4_infinite_survival_time_is_refused_by_check_and_train(tmp_path, capsys):
    raw = survival_config(tmp_path)
    df = pd.read_csv(raw["data"]["csv"], dtype={"slide_id": str})
    df.loc[4, "survival_months"] = np.inf
    df.to_csv(raw["data"]["csv"], index=False)
    slide = df.loc[4, "slide_id"]
    cfg = write_cfg(tmp_path / "cfg.yaml", raw)
    code, out, _ = cli(capsys, "check", cfg)
    assert code == 1 and "finite" in out and slide in out
    code, _, err = cli(capsys, "train", cfg, "--out", tmp_path / "run", "--quiet")
    assert code == 2 and f"slide {slide}: inf" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


# ---- splits: small survival cohorts and the inner validation strata (F5) -----------------------------


def test_f5_small_survival_cohort_falls_back_to_event_strata(tmp_path):
    raw = one_slide_cohort(tmp_path, 30, "surv")
    cfg = config_from_dict(raw)
    cohort = Cohort.from_config(cfg)
    splits = make_splits(cohort, folds=5, val_fraction=0.15)
    event = dict(zip(cohort.slides["slide_id"], cohort.slides["event"]))
    for sp in splits:
        assert (
            len(sp.val) > 0 and not set(sp.val) & set(sp.train) and not set(sp.val) & set(sp.test)
        )
        # stratified by event status: the validation set's event share follows the training fold's
        share = np.mean([event[s] for s in sp.val])
        assert abs(share - np.mean([event[s] for s in sp.train + sp.val])) < 0.3
    run = run_cv(cfg, tmp_path / "run", progress=False, log=quiet, n_boot=20)
    assert len(list(run.glob("fold_*/metrics.json"))) == 5


def test_f5_cohort_too_small_for_any_strata_names_the_keys(tmp_path, capsys):
    raw = one_slide_cohort(tmp_path, 12, "surv")
    raw["splits"] = {"folds": 4, "val_fraction": 0.1}  # 10 inner folds over 9 training patients
    cfg = write_cfg(tmp_path / "cfg.yaml", raw)
    code, _, err = cli(capsys, "train", cfg, "--out", tmp_path / "run", "--quiet")
    assert code == 2 and "splits.val_fraction" in err and "Traceback" not in err
    code, out, _ = cli(capsys, "check", cfg)
    assert code == 1 and "splits.val_fraction" in out


def test_f5_more_folds_than_slides_of_every_class_names_splits_folds(tmp_path):
    raw = one_slide_cohort(tmp_path, 20, "3class")  # 8/8/4 slides
    cohort = Cohort.from_config(config_from_dict(raw))
    with pytest.raises(SplitError, match="lower splits.folds"):
        make_splits(cohort, folds=9, val_fraction=0.0)


# ---- run folder: file names made from ids stay in their folder (F6) --------------------------------------


@pytest.mark.parametrize(
    "name",
    ["P00/../../../ESCAPE", "..", "../x", "a\\b", "/etc/passwd", "x\x00y", ".hidden", "a" * 300],
)
def test_f6_safe_filename_stays_in_the_folder(tmp_path, name):
    out = safe_filename(name)
    assert "/" not in out and "\\" not in out and "\x00" not in out
    assert not out.startswith(".") and 0 < len(out) <= 109
    assert (tmp_path / out).resolve().parent == tmp_path.resolve()


def test_f6_plain_ids_keep_their_names_and_distinct_ids_get_distinct_files():
    for name in ("TCGA-05-4244-01Z-00-DX1", "P05 S0", "P05-Ślajd-é", "slide_1.svs"):
        assert safe_filename(name) == name
    assert safe_filename("a/b") != safe_filename("a|b") != safe_filename("a_b")


def test_f6_topk_of_a_patient_id_with_dotdot_writes_inside_the_run(tmp_path, capsys):
    raw = small_config(tmp_path, epochs=1)
    df = pd.read_csv(raw["data"]["csv"], dtype=str)
    pid = df["case_id"].iloc[0]
    evil = f"{pid}/../../../ESCAPE"
    df.loc[df["case_id"] == pid, "case_id"] = evil
    df.to_csv(raw["data"]["csv"], index=False)
    raw["data"]["bag_level"] = "patient"
    run = tmp_path / "deep" / "er" / "run"
    run_cv(config_from_dict(raw), run, progress=False, log=quiet, n_boot=20)
    code, out, _ = cli(capsys, "topk", run, "--slide", evil)
    assert code == 0
    written = Path(out.strip())
    assert written.is_file() and written.resolve().parent == run.resolve()
    assert not list(tmp_path.rglob("ESCAPE*"))


# ---- training: a diverging run (F7) --------------------------------------------------------------------


def test_f7_diverging_training_names_fold_epoch_and_lr(tmp_path, capsys):
    raw = small_config(tmp_path)
    cfg = write_cfg(tmp_path / "cfg.yaml", raw)
    run_cv(config_from_dict(raw), tmp_path / "run", folds=[0], progress=False, log=quiet, n_boot=20)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "fold_0").iterdir()}
    code, _, err = cli(
        capsys,
        "train",
        cfg,
        "--out",
        tmp_path / "run",
        "--quiet",
        "--set",
        "train.lr=1e6",
        "--set",
        "train.optimizer=sgd",
        "--set",
        "train.weight_decay=0",
    )
    assert code == 2 and "Traceback" not in err
    assert "holds a run of a different config" in err  # the finished run is protected first
    code, _, err = cli(
        capsys,
        "train",
        cfg,
        "--out",
        tmp_path / "run2",
        "--quiet",
        "--set",
        "train.lr=1e6",
        "--set",
        "train.optimizer=sgd",
    )
    assert code == 2 and "Traceback" not in err
    assert "fold 0, epoch" in err and "diverged" in err and "train.lr" in err
    assert not (tmp_path / "run2" / "fold_0" / "metrics.json").exists()
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "fold_0").iterdir()} == before


def test_f7_survival_divergence_is_caught_too(tmp_path):
    raw = survival_config(tmp_path, lr=1e30, optimizer="sgd", patience=None)
    raw["splits"]["val_fraction"] = 0.0
    with pytest.raises(TrainingError, match=r"fold 0, epoch \d+: .*train.lr \(now 1e\+30\)"):
        run_cv(config_from_dict(raw), tmp_path / "run", progress=False, log=quiet)


@pytest.mark.parametrize(
    "key, value",
    [
        ("train.lr", ".inf"),
        ("train.lr", ".nan"),
        ("train.weight_decay", "-1"),
        ("train.threads", "-2"),
        ("train.subsample", "0"),
        ("train.device", "banana"),
        ("train.grad_clip", "0"),
        ("data.cache_gb", ".inf"),
        ("train.min_epochs", "-1"),
    ],
)
def test_config_ranges_name_the_key(small_cohort, key, value):
    from mil.config import apply_override

    raw = dict(small_cohort)
    apply_override(raw, f"{key}={value}")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict(raw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_device_on_a_cpu_machine_is_a_config_error():
    with pytest.raises(ConfigError, match="train.device = 'cuda'"):
        resolve_device("cuda")


# ---- metrics: every fold's log-rank p undefined (F8) --------------------------------------------------


def test_f8_report_and_summary_with_all_log_rank_p_undefined(tmp_path, capsys):
    raw = survival_config(tmp_path)
    run = run_cv(config_from_dict(raw), tmp_path / "run", progress=False, log=quiet, n_boot=20)
    for path in run.glob("fold_*/metrics.json"):
        record = json.loads(path.read_text())
        record["metrics"]["logrank_p"] = float("nan")
        write_json(path, record)
    (run / "report.md").unlink()
    summary = summarize(run, n_boot=20)
    assert "undefined in every fold" in (run / "report.md").read_text()
    assert "logrank_p" in format_summary(summary)
    code, out, err = cli(capsys, "summarize", run)
    assert code == 0 and "Traceback" not in err


def test_every_json_of_a_run_is_strict(tmp_path):
    """Survival folds hold undefined statistics; they are written as null, never as bare NaN."""
    raw = survival_config(tmp_path)
    run = run_cv(config_from_dict(raw), tmp_path / "run", progress=False, log=quiet, n_boot=20)

    def refuse(constant):
        raise ValueError(f"bare {constant} in JSON")

    files = list(run.rglob("*.json"))
    assert len(files) >= 4
    for path in files:
        json.loads(path.read_text(), parse_constant=refuse)
    record = json.loads((run / "fold_0" / "metrics.json").read_text())
    record["metrics"]["c_index"] = float("nan")
    write_json(run / "fold_0" / "metrics.json", record)
    assert json.loads((run / "fold_0" / "metrics.json").read_text())["metrics"]["c_index"] is None
    summary = summarize(run, n_boot=20)
    assert np.isnan(summary["metrics"]["c_index"]["folds"][0] or np.nan)
    saved = json.loads((run / "summary.json").read_text(), parse_constant=refuse)
    assert saved["metrics"]["c_index"]["folds"][0] is None


# ---- run folder: damaged run files are named (F9-F12) -----------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("finished")
    raw = small_config(root)
    raw["data"]["standardize"] = True
    run = run_cv(config_from_dict(raw), root / "run", progress=False, log=quiet, n_boot=20)
    return raw, run


def _copy_run(finished, tmp_path) -> Path:
    return Path(shutil.copytree(finished[1], tmp_path / "run"))


def test_f9_truncated_attention_file_is_named(finished, tmp_path, capsys):
    run = _copy_run(finished, tmp_path)
    path = run / "fold_1" / "attention.h5"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    slide = pd.read_csv(run / "splits" / "splits_1.csv", dtype=str)["test"].dropna().iloc[0]
    with pytest.raises(DataError, match=f"{path}: cannot read fold 1's instance scores"):
        Run(run).scores(slide)
    for command in (["heatmap", run, "--slide", slide], ["topk", run, "--slide", slide]):
        code, _, err = cli(capsys, *command)
        assert code == 2 and str(path) in err and "Traceback" not in err


def test_f10_predict_on_features_of_another_dimension_names_the_file(finished, tmp_path):
    path = tmp_path / "d48.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=np.ones((50, 48), np.float32))
    with pytest.raises(
        MilError, match=r"d48\.h5: features of dimension 48, but fold 0's model was trained on 16"
    ):
        Run(finished[1]).predict([path])


def test_f11_truncated_checkpoint_is_named(finished, tmp_path):
    run = _copy_run(finished, tmp_path)
    path = run / "fold_0" / "model.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    slide = pd.read_csv(run / "splits" / "splits_0.csv", dtype=str)["test"].dropna().iloc[0]
    for call in (
        lambda: Run(run).predict([slide]),
        lambda: Run(run).model(0),
        lambda: load_model(path),
    ):
        with pytest.raises(DataError, match=f"{path}: cannot read this checkpoint"):
            call()


def test_f12_damaged_fold_record_is_named_left_out_and_retrained(finished, tmp_path, capsys):
    raw, original = finished
    run = _copy_run(finished, tmp_path)
    raw = {**raw, "splits": {**raw["splits"]}}
    (run / "fold_1" / "metrics.json").write_text('{"fold": "1", ')
    with pytest.warns(MilWarning, match=f"{run / 'fold_1' / 'metrics.json'} is damaged"):
        summary = summarize(run, n_boot=20)
    assert summary["folds"] == ["0", "2"] and "2/3 folds" in format_summary(summary)
    with pytest.warns(MilWarning, match="fold 1 is trained again"):
        run_cv(config_from_dict(raw), run, progress=False, log=quiet, n_boot=20)
    # the retrained fold is the fold it was (seeded), and the summary has all three again
    again = pd.read_csv(run / "fold_1" / "predictions.csv")
    before = pd.read_csv(original / "fold_1" / "predictions.csv")
    np.testing.assert_allclose(again["prob_positive"], before["prob_positive"], rtol=1e-5)
    assert len(json.loads((run / "summary.json").read_text())["folds"]) == 3


# ---- fold state: a fold's result does not depend on the folds before it ----------------------


def test_fold_alone_equals_fold_of_full_run_with_feature_graph_and_standardize(tmp_path):
    raw = small_config(tmp_path, epochs=2)
    raw["data"]["standardize"] = True
    raw["model"] = {
        "name": "patchgcn",
        "hidden_dim": 16,
        "num_layers": 1,
        "graph": "feature",
        "graph_k": 4,
    }
    cfg = config_from_dict(raw)
    full = run_cv(cfg, tmp_path / "full", progress=False, log=quiet, n_boot=20)
    alone = run_cv(cfg, tmp_path / "alone", folds=[2], progress=False, log=quiet, n_boot=20)
    a = pd.read_csv(full / "fold_2" / "predictions.csv")
    b = pd.read_csv(alone / "fold_2" / "predictions.csv")
    np.testing.assert_array_equal(a["bag_id"], b["bag_id"])
    np.testing.assert_allclose(a["prob_positive"], b["prob_positive"], rtol=1e-6, atol=1e-7)
    # and the saved fold model reproduces its saved test predictions from the feature files
    run = Run(full)
    for k in range(3):
        saved = pd.read_csv(full / f"fold_{k}" / "predictions.csv", dtype={"bag_id": str})
        again = run.predict(saved["bag_id"].tolist(), folds=[k])
        np.testing.assert_allclose(
            again["prob_positive"], saved["prob_positive"], rtol=1e-5, atol=1e-6
        )


def test_fold_views_never_share_feature_graphs_or_transforms(small_cfg):
    from mil.data.dataset import BagDataset, FeatureStore
    from mil.data.graph import bag_graph

    cohort = Cohort.from_config(small_cfg)
    store = FeatureStore.from_dir(small_cfg.data.features)
    root = BagDataset(
        cohort.bag_slides,
        store,
        graph_fn=lambda b: bag_graph(b, "feature", 3),
        graph_uses_features=True,
    )
    bag = cohort.bag_ids[0]
    x = store.get(cohort.bag_slides[bag][0])[0].float()
    one = root.with_transform(lambda t: t.float() * 2.0)
    two = root.with_transform(
        lambda t: t.float() + torch.linspace(0, 50, t.shape[1]) * torch.arange(t.shape[0])[:, None]
    )
    torch.testing.assert_close(one[bag].x, x * 2.0)
    assert root.transform is None and root[bag].x.dtype == x.dtype
    e1, e2 = one[bag].edge_index, two[bag].edge_index
    assert not torch.equal(e1, e2)  # each fold's graph follows its own features
    assert torch.equal(one[bag].edge_index, bag_graph(one[bag], "feature", 3))
    spatial = BagDataset(
        cohort.bag_slides,
        store,
        graph_fn=lambda b: bag_graph(b, "spatial", 3),
        graph_uses_features=False,
    )
    a, b = spatial.with_transform(lambda t: t * 2), spatial.with_transform(lambda t: t * 3)
    assert a[bag].edge_index is b[bag].edge_index  # coordinates alone: built once, shared


# ---- run folder, CSV and CLI: the first probe's weak points ----------------------------------------------------------------


def test_result_files_follow_the_umask_and_no_temp_is_left(tmp_path):
    mask = os.umask(0)
    os.umask(mask)
    with atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("x")
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_orphan_temps_of_dead_processes_are_removed(tmp_path):
    import socket
    import subprocess
    import sys

    host = "".join(c for c in socket.gethostname() if c.isalnum())[:32] or "host"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    (tmp_path / "fold_0").mkdir()
    orphan = tmp_path / "fold_0" / f".attention.h5.{host}-{pid}.abc123.tmp"
    live = tmp_path / f".summary.json.{host}-{os.getpid()}.def456.tmp"
    foreign = tmp_path / f".model.pt.otherhost-{pid}.ghi789.tmp"
    old_foreign = tmp_path / f".report.md.otherhost-{pid}.jkl000.tmp"
    for p in (orphan, live, foreign, old_foreign):
        p.write_text("half")
    past = time.time() - 2 * 24 * 3600
    os.utime(old_foreign, (past, past))
    removed = remove_orphan_temps(tmp_path)
    assert sorted(removed) == sorted([orphan, old_foreign])
    assert live.exists() and foreign.exists()


def test_run_lock_excludes_a_second_holder(tmp_path):
    entered = threading.Event()

    def second():
        with run_lock(tmp_path / "run"):
            entered.set()

    with run_lock(tmp_path / "run"):
        t = threading.Thread(target=second)
        t.start()
        assert not entered.wait(0.3)
    assert entered.wait(5)
    t.join()
    assert list((tmp_path / "run").iterdir()) == []  # the lock leaves no file behind


def test_a_finished_run_rerun_writes_nothing(finished, tmp_path):
    raw, _ = finished
    run = _copy_run(finished, tmp_path)

    def snapshot():
        return {p: p.stat().st_mtime_ns for p in run.rglob("*")}

    before = snapshot()
    run_cv(config_from_dict(raw), run, progress=False, log=quiet, n_boot=20)
    assert snapshot() == before
    (run / "summary.json").unlink()  # a missing summary is rebuilt, nothing else is touched
    run_cv(config_from_dict(raw), run, progress=False, log=quiet, n_boot=20)
    after = snapshot()
    assert (run / "summary.json").is_file()
    changed = {p.name for p in after if after[p] != before.get(p)}
    summary_files = {
        "summary.json",
        "summary.csv",
        "report.md",
        "roc.png",
        "roc.csv",
        "calibration.png",
        "calibration.csv",
    }
    assert changed <= summary_files


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"", "empty"),
        (b"slide_id,case_id,label\n", "no rows"),
        (b"slide_id,label\n\xff\xfe\x00A,\x81\n", "UTF-8"),
    ],
)
def test_check_reads_bad_csvs_without_a_traceback(tmp_path, capsys, content, needle):
    raw = small_config(tmp_path)
    Path(raw["data"]["csv"]).write_bytes(content)
    cfg = write_cfg(tmp_path / "cfg.yaml", raw)
    code, out, err = cli(capsys, "check", cfg)
    assert code == 1 and needle in out and "Traceback" not in err
    code, _, err = cli(capsys, "train", cfg, "--out", tmp_path / "run", "--quiet")
    assert code == 2 and needle in err


@pytest.mark.parametrize(
    "args",
    [
        ["heatmap", "--top-n", "0"],
        ["heatmap", "--top-n", "-2"],
        ["topk", "--slide", "x", "--k", "-3"],
    ],
)
def test_counts_on_the_command_line_are_range_checked(finished, capsys, args):
    with pytest.raises(SystemExit) as exc:
        main([args[0], str(finished[1]), *args[1:]])
    assert exc.value.code == 2 and "must be at least" in capsys.readouterr().err


def test_check_warns_on_integer_features_and_a_censorship_column_read_as_events(tmp_path, capsys):
    raw = survival_config(tmp_path)
    path = sorted(Path(raw["data"]["features"]).glob("*.h5"))[0]
    with h5py.File(path, "a") as f:
        x = f["features"][()]
        del f["features"]
        f.create_dataset("features", data=x.astype(np.int32))
    raw["data"]["censored_value"] = None
    df = pd.read_csv(raw["data"]["csv"])
    df["censorship"] = 1 - df["censorship"]  # now 1 = event, as the config reads it
    df.to_csv(raw["data"]["csv"], index=False)
    code, out, _ = cli(capsys, "check", write_cfg(tmp_path / "cfg.yaml", raw))
    assert code == 0
    assert "int32 features" in out and path.stem in out
    assert "censored_value" in out and "'censorship'" in out


def test_unicode_ids_match_across_normal_forms(tmp_path):
    raw = small_config(tmp_path, epochs=1)
    feats = Path(raw["data"]["features"])
    df = pd.read_csv(raw["data"]["csv"], dtype=str)
    old = df["slide_id"].iloc[0]
    nfc = unicodedata.normalize("NFC", f"{old}-Ślajd")
    (feats / f"{old}.h5").rename(feats / f"{unicodedata.normalize('NFD', nfc)}.h5")
    df.loc[0, "slide_id"] = nfc
    df.to_csv(raw["data"]["csv"], index=False)
    run = run_cv(
        config_from_dict(raw), tmp_path / "run", folds=[0], progress=False, log=quiet, n_boot=20
    )
    assert (run / "fold_0" / "metrics.json").is_file()


def test_cli_prints_user_warnings_as_one_line(tmp_path):
    import subprocess
    import sys

    raw = small_config(tmp_path)
    _rename_patient_column(raw, "patient")
    del raw["data"]["patient_col"]
    raw["splits"]["dir"] = str(tmp_path / "splits")
    cfg = write_cfg(tmp_path / "cfg.yaml", raw)
    done = subprocess.run(
        [sys.executable, "-m", "mil", "splits", str(cfg)], capture_output=True, text=True
    )
    assert done.returncode == 0
    assert done.stderr.startswith("mil: warning:") and "data.patient_col" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_user_warnings_print_as_one_line(tmp_path, capsys):
    import warnings

    from mil.cli import _format_warning

    line = _format_warning(MilWarning("look here"), MilWarning, "x.py", 1)
    assert line == "mil: warning: look here\n"
    assert "UserWarning" in _format_warning(UserWarning("other"), UserWarning, "x.py", 1)
    assert warnings.formatwarning is not _format_warning  # main() restores Python's
