"""What ``mil evaluate`` promises on bad or surprising input (the evaluate rows of the second
reliability probe, issue 29), one section per promise:

- OUT is a folder of its own: never a run folder, a fold, its refit or anything inside a run;
- it removes only files an earlier evaluation of its own wrote there;
- damaged run files are refused before anything is written, with advice that fits the file
  (a device it cannot use is not called a damaged checkpoint), and only the files it uses
  are read;
- the folds it counts are the folds it uses (ensemble, threshold and internal figure), and the
  internal figure is the run's own pooled one;
- the external cohort is checked against the training one (the same slides, another kind of
  feature, encoder names differing in case);
- outcomes too thin to score are named in one ``mil: warning:`` line, not a library's;
- OUT is locked while it is written;
- the CLI answers each damaged input with one ``mil: error:`` line, never a traceback.

Every run is tiny (3 folds, 2 epochs, hidden_dim 8), trained once per module.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import warnings
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from mil.cli import main
from mil.config import config_from_dict
from mil.data.synthetic import write_synthetic_cohort
from mil.errors import ConfigError, DataError, MilError, MilWarning
from mil.evaluate import evaluate
from mil.io import run_lock
from mil.results.checkpoint import read_checkpoint
from mil.run import Run
from mil.train.external_checks import MIN_EVENTS, check_feature_kind
from mil.train.refit import refit
from mil.train.runner import run_cv

# the runs are deliberately short: their diagnostics are not what is tested here
pytestmark = pytest.mark.filterwarnings("ignore::mil.errors.TrainingWarning")

SURVIVAL_DATA = {"time_col": "survival_months", "event_col": "censorship", "censored_value": 1}


def quiet(*a):
    pass


def cohort(root, name, kind="classification", seed=0, n=18):
    """A small synthetic cohort (D = 8) and its ``data:`` section."""
    csv, feats = root / f"{name}.csv", root / f"{name}_features"
    write_synthetic_cohort(
        kind,
        csv,
        feats,
        seed=seed,
        n_patients=n,
        n_two_slides=2,
        dim=8,
        min_tiles=10,
        max_tiles=30,
        shift_norm=6.0,
    )
    data = {"csv": str(csv), "features": str(feats), "patient_col": "case_id"}
    return {**data, **SURVIVAL_DATA} if kind == "survival" else data


def train(root, name, data, kind="classification", **splits):
    task = {"type": kind} if kind == "classification" else {"type": "survival", "loss": "cox"}
    cfg = config_from_dict(
        {
            "name": name,
            "task": task,
            "data": data,
            "splits": {
                "dir": str(root / f"splits_{name}"),
                "folds": 3,
                "val_fraction": 0.2,
                "seed": 0,
                **splits,
            },
            "model": {"name": "abmil", "hidden_dim": 8},
            "train": {
                "epochs": 2,
                "batch_size": 8,
                "patience": None,
                "seed": 0,
                "threads": 1,
                "faithfulness": False,
            },
        }
    )
    return cfg, run_cv(cfg, root / name, progress=False, log=quiet, n_boot=10)


def cohort_yaml(path, data, task=None):
    path.write_text(yaml.safe_dump({"data": data, **({"task": {"type": task}} if task else {})}))
    return path


def md5s(folder) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def cli(*args) -> int:
    return main(["evaluate", *map(str, args), "--n-boot", "10", "--quiet"])


def one_error(capsys, *needles: str) -> str:
    """stderr is one ``mil: error:`` line (no traceback) holding every needle."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("mil: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("reliability_evaluate")


@pytest.fixture(scope="module")
def run(root):
    """A finished classification run with its refit."""
    cfg, path = train(root, "run", cohort(root, "train"))
    refit(cfg, path, "cpu", progress=False, log=quiet)
    return path


@pytest.fixture(scope="module")
def ext(root):
    return cohort_yaml(root / "ext.yaml", cohort(root, "ext", seed=7))


def copy_run(run, dst):
    shutil.copytree(run, dst)
    return dst


# ---- OUT is a folder of its own ----------------------------------------------------------------


def test_out_inside_a_run_is_refused_and_the_run_is_unchanged(run, ext, tmp_path, capsys):
    before = md5s(run)
    elsewhere = copy_run(run / "fold_0", tmp_path / "a_fold_copy")  # holds metrics.json, model.pt
    for out in (
        run / "fold_0",  # E9: would overwrite the fold's out-of-fold predictions
        run / "refit",
        run / "splits",
        run / "external",  # a new folder inside the run
        run / "fold_1" / "deeper",
        run,
        elsewhere,
    ):
        with pytest.raises(MilError, match=r"--out .*(run folder|fold \(or refit\) folder)"):
            evaluate(run, ext, out, n_boot=10)
        assert cli(run, ext, "--out", out) == 2
        one_error(capsys, f"--out {out}", "a folder of its own", f"{run.name}_on_ext")
    assert md5s(run) == before
    assert not (run / "external").exists() and not (run / "fold_1" / "deeper").exists()


# ---- only its own files are removed -------------------------------------------------------------


def test_a_folder_of_someone_elses_files_is_refused_and_left_alone(run, ext, tmp_path):
    """E10b: a foreign summary.json naming a user's file; E10: the user's own predictions.csv
    and report.md. Refused before anything is written; every file kept byte for byte."""
    for name, files in (
        ("e10b", {"notes.txt": "keep me", "summary.json": json.dumps({"files": ["notes.txt"]})}),
        ("e10", {"predictions.csv": "mine\n1\n", "report.md": "# my notes\n"}),
    ):
        out = tmp_path / name
        out.mkdir()
        for f, text in files.items():
            (out / f).write_text(text)
        with pytest.raises(MilError, match="no finished `mil evaluate` wrote"):
            evaluate(run, ext, out, n_boot=10)
        assert {p.name: p.read_text() for p in out.iterdir()} == files


def test_a_listed_user_file_is_never_deleted(run, ext, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    evaluate(run, ext, out, n_boot=10)
    assert (out / "notes.txt").read_text() == "keep me"
    # an evaluation's own summary.json, edited to list a user's file: not one evaluate writes
    summary = json.loads((out / "summary.json").read_text())
    summary["files"].append("notes.txt")
    (out / "summary.json").write_text(json.dumps(summary))
    evaluate(run, ext, out, n_boot=10)
    assert (out / "notes.txt").read_text() == "keep me"


def test_a_file_an_earlier_evaluation_wrote_is_removed(run, root, tmp_path):
    data = cohort(root, "ext", seed=7)
    df = pd.read_csv(data["csv"])
    df["site"] = np.where(np.arange(len(df)) % 2, "A", "B")
    df.to_csv(tmp_path / "sites.csv", index=False)
    sites = cohort_yaml(
        tmp_path / "sites.yaml", {**data, "csv": str(tmp_path / "sites.csv"), "site_col": "site"}
    )
    out = tmp_path / "ev"
    evaluate(run, sites, out, n_boot=10)
    assert (out / "subgroups.csv").is_file()
    evaluate(run, cohort_yaml(tmp_path / "plain.yaml", data), out, n_boot=10)
    assert not (out / "subgroups.csv").exists()
    assert "subgroups.csv" not in json.loads((out / "summary.json").read_text())["files"]


# ---- damaged run files: refused first, with advice that fits --------------------------------


def test_a_refit_json_that_is_not_an_object_is_refused_before_writing(run, ext, tmp_path):
    bad = copy_run(run, tmp_path / "run")
    for text, problem in (("[1, 2]", "list"), ('{"n_bags": 3}', "n_patients")):  # E13f
        (bad / "refit" / "refit.json").write_text(text)
        with pytest.raises(DataError, match=rf"refit\.json: .*{problem}.*--refit"):
            evaluate(bad, ext, tmp_path / "ev", n_boot=10, refit=True)
        assert not (tmp_path / "ev").exists()


def test_a_damaged_refit_model_is_advised_to_refit_and_refitting_repairs_it(run, ext, tmp_path):
    bad = copy_run(run, tmp_path / "run")
    model = bad / "refit" / "model.pt"
    model.write_bytes(model.read_bytes()[:200])  # E13e
    with pytest.raises(DataError) as err:
        evaluate(bad, ext, tmp_path / "ev", n_boot=10, refit=True)
    message = str(err.value)
    assert "metrics.json" not in message and f"Delete {bad / 'refit'} and run" in message
    assert "--refit" in message and not (tmp_path / "ev").exists()
    model.unlink()  # a refit.json without its model: the same advice
    with pytest.raises(MilError, match=r"model\.pt: the refit model is missing; delete .*refit"):
        evaluate(bad, ext, tmp_path / "ev", n_boot=10, refit=True)
    shutil.rmtree(bad / "refit")  # the advice, followed
    refit(Run(bad).config, bad, "cpu", progress=False, log=quiet)
    summary = evaluate(bad, ext, tmp_path / "ev", n_boot=10, refit=True)
    assert summary["predictor"] == "refit"


def test_refit_evaluation_reads_no_fold_model(run, ext, tmp_path):
    bad = copy_run(run, tmp_path / "run")
    model = bad / "fold_1" / "model.pt"
    model.write_bytes(model.read_bytes()[:200])  # E7c: a fold model --refit does not use
    summary = evaluate(bad, ext, tmp_path / "ev", n_boot=10, refit=True)
    pred = pd.read_csv(tmp_path / "ev" / "predictions.csv")
    assert summary["predictor"] == "refit" and (pred["n_folds"] == 1).all()
    with pytest.raises(DataError, match=r"fold_1/model\.pt: cannot read .*fold_1/metrics\.json"):
        evaluate(bad, ext, tmp_path / "ev2", n_boot=10)  # the ensemble does use it
    assert not (tmp_path / "ev2").exists()


def test_a_device_it_cannot_use_is_not_a_damaged_checkpoint(run, ext, tmp_path, capsys):
    bad_devices = ["banana"] + ([] if torch.cuda.is_available() else ["cuda"])  # X7
    for device in bad_devices:
        with pytest.raises(ConfigError, match=rf"--device {device}"):
            evaluate(run, ext, tmp_path / "ev", n_boot=10, device=device)
        assert cli(run, ext, "--out", tmp_path / "ev", "--device", device) == 2
        line = one_error(capsys, f"--device {device}")
        assert "damaged" not in line and "metrics.json" not in line
        with pytest.raises(ConfigError, match=rf"device '{device}'"):
            read_checkpoint(run / "fold_0" / "model.pt", map_location=device)
    assert not (tmp_path / "ev").exists()


# ---- the folds it counts are the folds it uses ----------------------------------------------


def test_a_damaged_fold_record_leaves_that_fold_out_of_everything_warned_once(
    run, ext, root, tmp_path
):
    bad = copy_run(run, tmp_path / "run")
    (bad / "fold_1" / "metrics.json").write_text('{"metr')  # F12e
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = evaluate(bad, ext, tmp_path / "ev", n_boot=10)
    about = [w for w in caught if "fold_1/metrics.json" in str(w.message)]
    assert len(about) == 1 and issubclass(about[0].category, MilWarning)
    assert summary["folds"] == ["0", "2"] and summary["internal"]["folds"] == ["0", "2"]
    pred = pd.read_csv(tmp_path / "ev" / "predictions.csv", dtype={"bag_id": str})
    assert (pred["n_folds"] == 2).all()
    feats = cohort(root, "ext", seed=7)["features"]
    expected = Run(run).predict([f"{feats}/{b}.h5" for b in pred["bag_id"]], folds=[0, 2])
    np.testing.assert_allclose(pred["prob_positive"], expected["prob_positive"], atol=1e-6)
    oof = pd.concat([pd.read_csv(bad / f"fold_{k}" / "predictions.csv") for k in (0, 2)])
    assert summary["internal"]["n_bags"] == len(oof)
    thresholds = [json.loads((bad / f"fold_{k}" / "metrics.json").read_text()) for k in (0, 2)]
    median = np.median([t["metrics"]["threshold"] for t in thresholds])
    assert summary["metrics"]["threshold"]["value"] == pytest.approx(median)


def test_an_unfinished_run_or_search_is_warned_with_its_fold_count(run, ext, tmp_path):
    part = copy_run(run, tmp_path / "run")
    shutil.rmtree(part / "fold_2")  # E11: as after `mil train --folds 0,1`
    with pytest.warns(MilWarning, match=r"uses 2 of its 3 folds \(fold 2: not finished\)"):
        summary = evaluate(part, ext, tmp_path / "ev", n_boot=10)
    assert summary["folds"] == ["0", "1"]
    (part / "search.csv").write_text("fold,point,selected\n")  # a search, fold 2 not selected
    with pytest.warns(MilWarning, match=r"fold 2: not selected by the search yet"):
        evaluate(part, ext, tmp_path / "ev", n_boot=10)
    with warnings.catch_warnings(record=True) as caught:  # the whole run: no such warning
        warnings.simplefilter("always")
        evaluate(run, ext, tmp_path / "ev_full", n_boot=10)
    assert not [w for w in caught if "of its 3 folds" in str(w.message)]


def test_the_internal_figure_is_the_runs_own_pooled_one_with_repeats(root, ext, tmp_path):
    _, rep = train(root, "repeats", cohort(root, "train"), repeats=2)  # RP
    summary = evaluate(rep, ext, tmp_path / "ev", n_boot=10)
    own = json.loads((rep / "summary.json").read_text())
    assert summary["gap"]["auc"]["internal"] == pytest.approx(own["auc_pooled"], abs=1e-12)
    assert summary["internal"]["folds"] == ["0", "1", "2"] and len(summary["folds"]) == 6
    n_bags = pd.read_csv(cohort(root, "train")["csv"])["slide_id"].nunique()
    assert summary["internal"]["n_bags"] == n_bags  # every bag once
    assert "of the first repeat" in (tmp_path / "ev" / "report.md").read_text()


# ---- the external cohort against the training one --------------------------------------------


def test_the_training_cohort_itself_is_warned_as_not_external(run, root, tmp_path):
    data = cohort(root, "train")
    with pytest.warns(MilWarning, match=r"of \d+ slides .* are slides the run was trained on"):
        evaluate(run, cohort_yaml(tmp_path / "same.yaml", data), tmp_path / "ev", n_boot=10)
    copied = shutil.copytree(data["features"], tmp_path / "copied")  # E17: a copy of the files
    config = cohort_yaml(tmp_path / "copy.yaml", {**data, "features": str(copied)})
    with pytest.warns(MilWarning, match=r"the cohort is the run's training cohort"):
        evaluate(run, config, tmp_path / "ev2", n_boot=10)


def test_a_real_external_cohort_gets_no_such_warning(run, ext, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluate(run, ext, tmp_path / "ev", n_boot=10)
    texts = [str(w.message) for w in caught]
    assert not [t for t in texts if "trained on" in t or "of its 3 folds" in t], texts


def set_encoder(folder, name):
    for path in folder.glob("*.h5"):
        with h5py.File(path, "r+") as f:
            f.attrs["encoder"] = name


def test_encoder_names_differing_in_case_are_one_encoder(run, root, tmp_path):
    data = cohort(root, "ext", seed=7)
    feats = shutil.copytree(data["features"], tmp_path / "feats")
    set_encoder(feats, "Synthetic")  # E12c: the run's files say "synthetic"
    config = cohort_yaml(tmp_path / "case.yaml", {**data, "features": str(feats)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluate(run, config, tmp_path / "ev", n_boot=10)
    about = [str(w.message) for w in caught if "encoder" in str(w.message)]
    assert len(about) == 1 and "differ only in letter case" in about[0]
    set_encoder(feats, "Synthetic_v2")  # another name is still another encoder
    with pytest.raises(DataError, match=r"made by encoder Synthetic_v2"):
        evaluate(run, config, tmp_path / "ev2", n_boot=10)


def embeddings_of(data, folder):
    """The cohort as slide embeddings ([D] per file: the mean tile), same D and attributes."""
    folder.mkdir()
    for path in sorted(Path(data["features"]).glob("*.h5")):
        with h5py.File(path) as f, h5py.File(folder / path.name, "w") as g:
            g["features"] = f["features"][()].astype(np.float32).mean(0)
            g.attrs.update(dict(f.attrs))
    return {**data, "features": str(folder)}


def test_slide_embeddings_for_a_tile_run_are_refused(run, root, tmp_path):
    emb = embeddings_of(cohort(root, "ext", seed=7), tmp_path / "emb")  # S5
    config = cohort_yaml(tmp_path / "emb.yaml", emb)
    with pytest.raises(DataError, match=r"slide/patient embeddings .* trained on tile features"):
        evaluate(run, config, tmp_path / "ev", n_boot=10)
    assert not (tmp_path / "ev").exists()
    with pytest.warns(MilWarning, match=r"embeddings .* tile features"):
        evaluate(run, config, tmp_path / "ev", n_boot=10, any_encoder=True)
    # and the reverse: a run of embeddings given tile features
    run_cfg = config_from_dict({"task": {"type": "classification"}, "data": emb})
    tiles = config_from_dict(
        {"task": {"type": "classification"}, "data": cohort(root, "ext", seed=7)}
    )
    with pytest.raises(DataError, match=r"holds tile features .* trained on slide/patient"):
        check_feature_kind(run_cfg, tiles, allowed=False)


# ---- thin outcomes: named once, in mil's words -----------------------------------------------


def test_a_one_slide_cohort_warns_in_mils_words_only(run, root, tmp_path, capsys):
    data = cohort(root, "ext", seed=7)
    pd.read_csv(data["csv"]).iloc[:1].to_csv(tmp_path / "one.csv", index=False)  # E16
    config = cohort_yaml(tmp_path / "one.yaml", {**data, "csv": str(tmp_path / "one.csv")})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluate(run, config, tmp_path / "ev", n_boot=10)
    foreign = [w for w in caught if not issubclass(w.category, MilWarning)]
    assert not foreign, [str(w.message) for w in foreign]
    assert any("is of class" in str(w.message) for w in caught)
    assert cli(run, config, "--out", tmp_path / "ev_cli") == 0
    err = capsys.readouterr().err
    assert "UserWarning" not in err and "warnings.warn" not in err
    assert all(line.startswith("mil: warning:") for line in err.splitlines() if line.strip())


def test_a_survival_cohort_with_few_events_is_warned(root, tmp_path):
    _, surv = train(root, "surv", cohort(root, "surv_train", "survival", seed=1), "survival")
    data = cohort(root, "surv_ext", "survival", seed=8, n=30)
    df = pd.read_csv(data["csv"])
    df["censorship"] = 1
    df.loc[0, "censorship"] = 0  # SV5: one event
    df.to_csv(tmp_path / "one_event.csv", index=False)
    config = cohort_yaml(
        tmp_path / "sv.yaml", {**data, "csv": str(tmp_path / "one_event.csv")}, "survival"
    )
    with pytest.warns(MilWarning, match=r"has 1 event among \d+ patients; its C-index"):
        evaluate(surv, config, tmp_path / "ev", n_boot=10)
    full = pd.read_csv(data["csv"]).groupby("case_id")["censorship"].min()
    assert (full == 0).sum() >= MIN_EVENTS  # the whole cohort has enough events: no warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluate(
            surv, cohort_yaml(tmp_path / "full.yaml", data, "survival"), tmp_path / "ev2", n_boot=10
        )
    assert not [w for w in caught if "C-index and confidence interval" in str(w.message)]


# ---- OUT is locked while it is written ---------------------------------------------------------


def test_an_evaluation_waits_for_the_lock_on_its_out_folder(run, ext, tmp_path):
    out = tmp_path / "ev"
    done = threading.Event()
    errors = []

    def job():
        try:
            evaluate(run, ext, out, n_boot=10)
        except Exception as exc:  # reported below
            errors.append(exc)
        done.set()

    with run_lock(out):  # race-2: another evaluation is writing there
        worker = threading.Thread(target=job)
        worker.start()
        waited = done.wait(timeout=20)
        assert not waited and not (out / "summary.json").exists()
    worker.join(timeout=120)
    assert done.is_set() and not errors and (out / "summary.json").is_file()


# ---- the CLI: one error line per damaged input --------------------------------------------------


def test_the_cli_answers_each_damaged_input_with_one_error_line(run, ext, tmp_path, capsys):
    bad = copy_run(run, tmp_path / "run")
    cases = []
    (bad / "refit" / "refit.json").write_text("[1, 2]")
    cases.append((["--refit"], "refit.json"))
    model = bad / "fold_2" / "model.pt"
    model.write_bytes(model.read_bytes()[:100])
    cases.append(([], "fold_2/model.pt"))
    cases.append((["--device", "banana"], "--device banana"))
    for extra, needle in cases:
        out = tmp_path / "ev"
        assert cli(bad, ext, "--out", out, *extra) == 2
        one_error(capsys, needle)
        assert not out.exists()
    before = md5s(bad)
    assert cli(bad, ext, "--out", bad / "fold_0") == 2
    one_error(capsys, "fold_0")
    assert md5s(bad) == before
