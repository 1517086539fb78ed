"""Reliability of the run-level surfaces on damaged or hostile input (issue 29, the second
bad-input probe): ``mil train --refit``, ``mil generalize``, ``compare:`` labels, the training
diagnostics, and what the CLI prints (one ``mil: error:`` or ``mil: warning:`` line, never a
traceback). Organised by surface; each test is a probe row's reproduction on a tiny cohort.

- refit: a fold ``history.csv`` that is empty, lacks ``best`` or is missing is named with how
  to retrain the fold (R6, R6b); a damaged refit (model or record, or a pickled payload) is
  made again, identical to the first (E13g, SEC3); ``--folds`` with ``--refit`` is refused
  before anything trains (R1).
- generalize: everything ``mil evaluate`` or site-preserved CV would refuse after training is
  refused before it (G2, G3, SEC1, G5c); ``--any-encoder`` lets another encoder through.
- compare: a label is a plain folder name; nothing is written outside ``--out`` (X1).
- diagnostics: a finite but diverging loss is divergence, with the advice to lower the
  learning rate, not under-training (F7b).
- CLI messages: library warnings print as one ``mil: warning:`` line (E16); a pickled ``.pt``
  is refused without torch's advice to load it unsafely (SEC3/SEC4).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import h5py
import pandas as pd
import pytest
import torch
import yaml

import mil
from mil.cli import _format_warning, main
from mil.compare import entries
from mil.config import config_from_dict
from mil.data.readers import read_features
from mil.data.synthetic import write_synthetic_cohort
from mil.errors import DataError, MilWarning
from mil.results.checkpoint import read_checkpoint
from mil.schema import TrainConfig
from mil.train.diagnostics import diagnose
from mil.train.refit import read_refit

pytestmark = pytest.mark.filterwarnings("ignore::mil.errors.TrainingWarning")


def cohort(root: Path, name: str, seed: int, n: int = 24, dim: int = 16) -> dict:
    """A small classification cohort (as the probe's build.py) with three sites, one per patient,
    and a ``hospital`` column that names a single site; returns its ``data:`` section."""
    csv, feats = root / f"{name}.csv", root / f"{name}_features"
    df = write_synthetic_cohort(
        "classification",
        csv,
        feats,
        seed=seed,
        n_patients=n,
        n_two_slides=4,
        dim=dim,
        min_tiles=10,
        max_tiles=40,
        shift_norm=6.0,
    )
    rank = df["case_id"].rank(method="dense").astype(int)
    df["site"] = [f"S{r % 3}" for r in rank]
    df["hospital"] = "H1"
    df.to_csv(csv, index=False)
    return {"csv": str(csv), "features": str(feats), "patient_col": "case_id"}


def dump(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability_runs")
    raw = {
        "name": "rel",
        "task": {"type": "classification"},
        "data": cohort(root, "base", 0),
        "splits": {"folds": 3, "val_fraction": 0.2, "seed": 0},
        "model": {"name": "abmil", "hidden_dim": 8},
        "train": {
            "epochs": 2,
            "batch_size": 8,
            "patience": None,
            "threads": 1,
            "faithfulness": False,
        },
    }
    ext = cohort(root, "ext", 5, n=10)
    return SimpleNamespace(
        root=root,
        raw=raw,
        cfg=dump(root / "cfg.yaml", raw),
        ext=dump(root / "ext.yaml", {"data": ext}),
    )


@pytest.fixture(scope="module")
def finished(study):
    """A finished run with its refit, copied by the tests that damage it."""
    run = study.root / "run"
    assert main(["train", str(study.cfg), "--out", str(run), "--refit", "--quiet"]) == 0
    return run


def copy_run(run: Path, tmp_path: Path, refit: bool = True) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    if not refit:
        shutil.rmtree(out / "refit")
    return out


def one_error(capsys) -> str:
    """stderr is one ``mil: error:`` line and no traceback; returns the line."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("mil: error: "), err
    return lines[0]


class Payload:
    """Pickles as a call of ``os.system``: what a hostile ``.pt`` file holds."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---- refit ----------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["empty", "no best column", "missing"])
def test_refit_names_a_damaged_fold_history_and_how_to_train_the_fold_again(
    finished, study, tmp_path, capsys, damage
):
    run = copy_run(finished, tmp_path, refit=False)
    history = run / "fold_1" / "history.csv"
    if damage == "empty":
        history.write_text("")
    elif damage == "no best column":
        pd.read_csv(history).drop(columns="best").to_csv(history, index=False)
    else:
        history.unlink()
    capsys.readouterr()
    assert main(["train", str(study.cfg), "--out", str(run), "--refit", "--quiet"]) == 2
    line = one_error(capsys)
    assert str(history) in line and f"Delete {run / 'fold_1' / 'metrics.json'}" in line
    assert not (run / "refit").exists()
    if damage == "empty":  # the advice repairs it
        (run / "fold_1" / "metrics.json").unlink()
        assert main(["train", str(study.cfg), "--out", str(run), "--refit", "--quiet"]) == 0
        assert "best" in pd.read_csv(history).columns
        assert read_refit(run)["n_bags"] == len(pd.read_csv(study.raw["data"]["csv"]))


@pytest.mark.parametrize("damage", ["truncated model", "record not an object", "pickled model"])
def test_a_damaged_refit_is_made_again_as_it_was(finished, study, tmp_path, capsys, damage):
    run = copy_run(finished, tmp_path)
    model, record, marker = (
        run / "refit" / "model.pt",
        run / "refit" / "refit.json",
        tmp_path / "ran",
    )
    if damage == "truncated model":
        model.write_bytes(model.read_bytes()[:100])
    elif damage == "record not an object":
        record.write_text("[1, 2]\n")
        with pytest.raises(DataError, match="not a refit record"):
            read_refit(run)
    else:
        torch.save({"state_dict": Payload(marker)}, model)
    capsys.readouterr()
    assert main(["train", str(study.cfg), "--out", str(run), "--refit", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "of the earlier refit cannot be read; making the refit again" in out
    assert not marker.exists()
    again, first = read_checkpoint(model), read_checkpoint(finished / "refit" / "model.pt")
    for name, weights in first["state_dict"].items():
        assert torch.equal(again["state_dict"][name], weights), name
    assert read_refit(run)["epochs"] == read_refit(finished)["epochs"]


def test_refit_with_some_folds_is_refused_before_anything_trains(study, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(study.cfg), "--out", str(out), "--folds", "0", "--refit"]) == 2
    assert "--refit with --folds" in one_error(capsys)
    assert not out.exists()


# ---- generalize -----------------------------------------------------------------------------


def external_variant(
    study, tmp_path: Path, name: str, encoder: str | None = None, drop: int = 0
) -> Path:
    """A copy of the external cohort whose files name ``encoder``, or with ``drop`` files gone."""
    data = yaml.safe_load(study.ext.read_text())["data"]
    feats = tmp_path / f"{name}_features"
    shutil.copytree(data["features"], feats)
    for i, path in enumerate(sorted(feats.glob("*.h5"))):
        if i < drop:
            path.unlink()
        elif encoder is not None:
            with h5py.File(path, "a") as f:
                f.attrs["encoder"] = encoder
    return dump(tmp_path / f"{name}.yaml", {"data": {**data, "features": str(feats)}})


def bad_generalize_input(study, tmp_path: Path, case: str) -> tuple[Path, list[Path], str]:
    """(config, externals, what the error says) of one input generalize refuses."""
    sites = dump(
        tmp_path / "sites.yaml", {**study.raw, "data": {**study.raw["data"], "site_col": "site"}}
    )
    ext = yaml.safe_load(study.ext.read_text())
    if case == "one site":
        cfg = dump(
            tmp_path / "one.yaml",
            {**study.raw, "data": {**study.raw["data"], "site_col": "hospital"}},
        )
        return cfg, [study.ext], "needs at least 3 sites .* has 1: H1. Drop data.site_col"
    if case == "another task":
        bad = dump(tmp_path / "surv.yaml", {"task": {"type": "survival"}, **ext})
        return sites, [study.ext, bad], "surv.yaml: task.type is 'survival'"
    if case == "no label column":
        bad = dump(tmp_path / "nolabel.yaml", {"data": {**ext["data"], "label_col": "grade"}})
        return sites, [bad], "'grade'"
    if case == "malformed yaml":
        (bad := tmp_path / "broken.yaml").write_text("data: [unclosed\n")
        return sites, [bad], "broken.yaml: not valid YAML"
    if case == "python tag":
        (bad := tmp_path / "tag.yaml").write_text(
            f"data: !!python/object/apply:os.system ['touch {tmp_path / 'ran'}']\n"
        )
        return sites, [bad], "tag.yaml: not valid YAML"
    if case == "another encoder":
        bad = external_variant(study, tmp_path, "uni", encoder="uni_v1")
        return sites, [study.ext, bad], "encoder uni_v1.* by synthetic.*--any-encoder"
    if case == "missing feature file":
        return sites, [external_variant(study, tmp_path, "gone", drop=1)], "no feature file"
    small = cohort(tmp_path, "wide", 3, n=6, dim=32)
    return sites, [dump(tmp_path / "wide.yaml", {"data": small})], "dimension 32"


@pytest.mark.parametrize(
    "case",
    [
        "one site",
        "another task",
        "no label column",
        "malformed yaml",
        "python tag",
        "another encoder",
        "missing feature file",
        "another dimension",
    ],
)
def test_generalize_refuses_before_anything_trains(study, tmp_path, capsys, case):
    cfg, externals, said = bad_generalize_input(study, tmp_path, case)
    out = tmp_path / "gen"
    argv = ["generalize", str(cfg), "--external", *map(str, externals), "--out", str(out)]
    capsys.readouterr()
    assert main([*argv, "--quiet", "--n-boot", "20"]) == 2
    line = one_error(capsys)
    assert re.search(said, line), line
    assert "splits.by_site: false" not in line  # advice for mil train, not for generalize
    assert not out.exists()  # nothing trained, nothing written
    assert not (tmp_path / "ran").exists()


def test_generalize_any_encoder_evaluates_another_encoder_with_a_warning(study, tmp_path):
    other = external_variant(study, tmp_path, "uni", encoder="uni_v1")
    out = tmp_path / "gen"
    argv = [
        "generalize",
        str(study.cfg),
        "--external",
        str(study.ext),
        str(other),
        "--out",
        str(out),
    ]
    with pytest.warns(MilWarning, match="provenance differs .* in encoder"):
        assert main([*argv, "--any-encoder", "--quiet", "--n-boot", "20"]) == 0
    table = pd.read_csv(out / "generalization.csv")
    assert sorted(table["cohort"].dropna().unique()) == ["ext", "uni"]
    summary = yaml.safe_load((out / "abmil" / "external" / "uni" / "summary.json").read_text())
    assert summary["provenance"]["cohort"]["encoder"] == {"uni_v1": 10 + 4}


# ---- compare labels -------------------------------------------------------------------------


@pytest.mark.parametrize("verb", ["compare", "generalize"])
def test_a_compare_label_cannot_name_a_folder_outside_out(study, tmp_path, capsys, verb):
    entry = {"model": {"name": "abmil", "hidden_dim": 8}, "label": "../../escaped_label"}
    cfg = dump(tmp_path / "cmp.yaml", {**study.raw, "compare": [entry]})
    before = sorted(tmp_path.rglob("*"))
    capsys.readouterr()
    assert main([verb, str(cfg), "--out", str(tmp_path / "gen" / "nest" / "g7"), "--quiet"]) == 2
    line = one_error(capsys)
    assert "compare[0]: label '../../escaped_label' is not a plain folder name" in line
    assert sorted(tmp_path.rglob("*")) == before


def test_plain_compare_labels_are_kept_as_they_are(study):
    labels = ["abmil small", "abmil-8_v2.1", "ABMIL"]
    raw = {**study.raw, "compare": [{"model": {"name": "abmil"}, "label": x} for x in labels]}
    assert [e["label"] for e in entries(config_from_dict(raw))] == labels
    for bad in ["a/b", "..", ".hidden", "", "x\\y"]:
        raw = {**study.raw, "compare": [{"model": {"name": "abmil"}, "label": bad}]}
        with pytest.raises(mil.errors.ConfigError, match="not a plain folder name"):
            entries(config_from_dict(raw))


# ---- training diagnostics -------------------------------------------------------------------


def history(train: list[float], constant: float = 0.683) -> pd.DataFrame:
    n = len(train)
    h = pd.DataFrame(
        {"epoch": range(n), "train_loss": train, "constant_loss": constant, "steps": 2}
    )
    h["best"] = [i == n - 1 for i in range(n)]
    return h


def findings(h: pd.DataFrame, lr: float = 1.0, reason: str | None = None) -> dict[str, str]:
    cfg = TrainConfig(epochs=len(h), lr=lr)
    return {f["kind"]: f["message"] for f in diagnose(h, cfg, reason, "0")}


def test_a_diverging_finite_loss_is_divergence_not_under_training():
    probe = findings(
        history([3.03e9, 1.7e25]), lr=1e6, reason="every test bag was predicted 'positive'"
    )
    assert set(probe) == {"divergence", "constant predictions"}
    assert (
        "training diverged" in probe["divergence"]
        and "Lower train.lr (now 1e+06)" in probe["divergence"]
    )
    assert "train.grad_clip" in probe["divergence"] and "4.44e+09 times" in probe["divergence"]
    assert "raise" not in probe["constant predictions"].lower()
    # a loss that grows past the constant one's, though not tenfold
    grew = findings(history([0.5, 0.9, 1.6]))
    assert (
        list(grew) == ["divergence"] and "rising from 0.5 in epoch 1 to 1.6" in grew["divergence"]
    )
    # still under-training, and a run that learned: unchanged
    assert list(findings(history([0.70, 0.69, 0.68, 0.67]))) == ["under-training"]
    assert findings(history([0.70, 0.60, 0.50, 0.40])) == {}
    assert findings(history([0.30, 0.62])) == {}  # rose, but stayed below the constant loss


def test_sgd_at_lr_1e6_is_diagnosed_as_divergence(study, tmp_path):
    out = tmp_path / "run"
    argv = ["train", str(study.cfg), "--out", str(out), "--folds", "0", "--quiet"]
    assert main([*argv, "--set", "train.lr=1e6", "--set", "train.optimizer=sgd"]) == 0
    h = pd.read_csv(out / "fold_0" / "history.csv")
    assert h["train_loss"].iloc[-1] > 1e6 * h["constant_loss"].iloc[-1]  # the probe's case: finite
    record = yaml.safe_load((out / "fold_0" / "metrics.json").read_text())
    kinds = {d["kind"]: d["message"] for d in record["diagnostics"]}
    assert "divergence" in kinds and "under-training" not in kinds
    assert "Lower train.lr (now 1e+06)" in kinds["divergence"]
    assert all("Raise" not in m and "raise train.lr" not in m for m in kinds.values())


# ---- CLI messages ---------------------------------------------------------------------------

LIBRARY_WARNINGS = """
import sys, warnings
from mil import cli

def noisy(args):
    from sklearn.metrics import roc_auc_score
    roc_auc_score([1, 1], [0.2, 0.3])  # only one class: sklearn warns
    warnings.warn_explicit("a message\\nover two lines", FutureWarning,
                           "/x/site-packages/pandas/core/frame.py", 1)
    return 0

cli.cmd_summarize = noisy
sys.exit(cli.main(["summarize", "run"]))
"""


def test_library_warnings_print_as_one_mil_warning_line_each():
    done = subprocess.run(
        [sys.executable, "-c", LIBRARY_WARNINGS], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("mil: warning: ") for line in lines), lines
    assert lines[0].startswith("mil: warning: UndefinedMetricWarning (sklearn): Only one class")
    assert lines[1] == "mil: warning: FutureWarning (pandas): a message over two lines"
    mine = _format_warning(RuntimeWarning("x"), RuntimeWarning, mil.cli.__file__, 1)
    assert mine == "mil: warning: RuntimeWarning (mil): x\n"


def test_pickled_pt_files_are_refused_without_torchs_unsafe_advice(tmp_path):
    marker = tmp_path / "ran"
    for name, obj in [
        ("slide.pt", {"features": torch.zeros(3, 4), "x": Payload(marker)}),
        ("model.pt", {"state_dict": Payload(marker)}),
    ]:
        torch.save(obj, tmp_path / name)
    for read, name in [(read_features, "slide.pt"), (read_checkpoint, "model.pt")]:
        with pytest.raises(DataError) as err:
            read(tmp_path / name)
        message = str(err.value)
        assert (
            f"{tmp_path / name}: cannot read it: it holds Python objects other than tensors"
            in message
        )
        assert "(posix.system)" in message
        assert "for safety" in message
        assert "weights_only" not in message and "Re-running" not in message
    assert not marker.exists()
    with pytest.raises(DataError, match="cannot read feature file"):  # damaged, not pickled
        (tmp_path / "cut.pt").write_bytes((tmp_path / "slide.pt").read_bytes()[:60])
        read_features(tmp_path / "cut.pt")


# ---- config values a task ignores ----------------------------------------------------------------


def test_an_operating_point_on_a_survival_task_is_warned_as_ignored(tmp_path):
    """OP-s: task.operating_point means a decision threshold; survival has none."""
    from mil.train.experiment import Experiment
    from tests.test_survival_task import survival_config

    raw = survival_config(tmp_path)
    raw["task"]["operating_point"] = 0.9
    with pytest.warns(MilWarning, match=r"task.operating_point = 0.9 is ignored: a survival task"):
        Experiment(config_from_dict(raw), tmp_path / "run", progress=False)
    raw["task"].pop("operating_point")
    with warnings.catch_warnings():
        warnings.simplefilter("error", MilWarning)
        Experiment(config_from_dict(raw), tmp_path / "run2", progress=False)
