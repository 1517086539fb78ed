"""``mil evaluate``: a run's fold ensemble on an external cohort, checked against ``mil.Run.predict``,
fold models run by hand, scikit-learn and lifelines; bad cohorts are refused before anything
is written."""

from __future__ import annotations

import json
import re
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from lifelines.utils import concordance_index
from sklearn.metrics import roc_auc_score

from mil.cli import main
from mil.config import config_from_dict
from mil.data.batch import Bag, collate_bags
from mil.data.readers import read_features
from mil.data.synthetic import write_synthetic_cohort
from mil.errors import MilError
from mil.evaluate import evaluate
from mil.metrics import bootstrap_ci, unpaired_difference
from mil.models import create
from mil.run import Run
from mil.train.runner import run_cv

# the runs are deliberately short: their diagnostics are not what is tested here
pytestmark = pytest.mark.filterwarnings("ignore::mil.errors.TrainingWarning")

SURVIVAL_DATA = {"time_col": "survival_months", "event_col": "censorship", "censored_value": 1}


def quiet(*a):
    pass


def write_cohort(root, name, kind, seed, offset=0.0, dim=16, sites=False):
    """A small synthetic cohort; ``offset`` is added to every feature (a site's stain shift)."""
    csv, feats = root / f"{name}.csv", root / f"{name}_features"
    df = write_synthetic_cohort(
        kind,
        csv,
        feats,
        seed=seed,
        n_patients=30,
        n_two_slides=0,
        dim=dim,
        min_tiles=20,
        max_tiles=60,
        shift_norm=6.0,
    )
    if offset:
        for path in feats.glob("*.h5"):
            with h5py.File(path, "r+") as f:
                f["features"][...] = (f["features"][()].astype(np.float32) + offset).astype(
                    np.float16
                )
    if sites:
        df["site"] = np.where(df["case_id"].rank(method="dense") % 2 == 0, "A", "B")
        df.to_csv(csv, index=False)
    return {"csv": str(csv), "features": str(feats), "patient_col": "case_id"}


def run_config(root, kind: str, data: dict) -> dict:
    task = {"type": kind} if kind == "classification" else {"type": "survival", "loss": "cox"}
    return {
        "name": f"ev_{kind}",
        "task": task,
        "data": {**data, "standardize": "whiten"},  # each fold model must whiten on its own
        "splits": {"dir": str(root / f"splits_{kind}"), "folds": 3, "val_fraction": 0.2},
        "model": {"name": "abmil", "hidden_dim": 16},
        "train": {"epochs": 3, "batch_size": 8, "patience": None, "seed": 0},
    }


def cohort_yaml(path, data: dict, task: str | None = None):
    raw = {"data": data, **({"task": {"type": task}} if task else {})}
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("evaluate")


@pytest.fixture(scope="module")
def cls_run(root):
    data = write_cohort(root, "train_cls", "classification", seed=0)
    cfg = config_from_dict(run_config(root, "classification", data))
    return run_cv(cfg, root / "run_cls", progress=False, log=quiet, n_boot=20)


@pytest.fixture(scope="module")
def external_cls(root):
    data = write_cohort(root, "ext_cls", "classification", seed=7, offset=0.5, sites=True)
    return {**data, "site_col": "site"}


@pytest.fixture(scope="module")
def cls_eval(root, cls_run, external_cls):
    """The CLI's evaluation of the classification run on the external cohort."""
    config = cohort_yaml(root / "ext_cls.yaml", external_cls)
    out = root / "eval_cls"
    assert (
        main(
            ["evaluate", str(cls_run), str(config), "--out", str(out), "--n-boot", "60", "--quiet"]
        )
        == 0
    )
    return out


def by_hand(run_dir, fold: int, path) -> np.ndarray:
    """A fold model's class probabilities for one feature file, without mil's inference code:
    the fold's saved whitening, then the model."""
    payload = torch.load(run_dir / f"fold_{fold}" / "model.pt", weights_only=True)
    model = create(
        payload["model"], in_dim=payload["in_dim"], n_out=payload["n_out"], **payload["hparams"]
    )
    model.load_state_dict(payload["state_dict"])
    model.eval()
    norm = payload["standardize"]
    x = torch.from_numpy(read_features(path).features.astype(np.float32))
    x = (x - norm["mean"].float()) @ norm["whiten"].float()
    with torch.no_grad():
        logits = model(collate_bags([Bag(bag_id="b", x=x)])).logits.double()
    return torch.softmax(logits, 1)[0].numpy()


def test_predictions_are_the_fold_ensembles_and_auc_is_sklearns(cls_eval, cls_run, external_cls):
    pred = pd.read_csv(cls_eval / "predictions.csv", dtype={"bag_id": str, "patient_id": str})
    cohort = pd.read_csv(external_cls["csv"], dtype=str)
    assert sorted(pred["bag_id"]) == sorted(cohort["slide_id"]) and (pred["n_folds"] == 3).all()
    assert {"patient_id", "label", "label_index", "site"} <= set(pred.columns)
    feats = external_cls["features"]
    expected = Run(cls_run).predict([f"{feats}/{b}.h5" for b in pred["bag_id"]])
    for c in ("prob_negative", "prob_positive"):
        np.testing.assert_allclose(pred[c], expected[c], atol=1e-6, rtol=0)
    for i in range(3):  # independent of mil's inference: mean of the folds run by hand
        hand = np.mean(
            [by_hand(cls_run, k, f"{feats}/{pred['bag_id'][i]}.h5") for k in range(3)], 0
        )
        np.testing.assert_allclose(
            pred.loc[i, ["prob_negative", "prob_positive"]].to_numpy(float), hand, atol=1e-5
        )
    summary = json.loads((cls_eval / "summary.json").read_text())
    auc = roc_auc_score(pred["label"] == "positive", pred["prob_positive"])
    assert summary["metrics"]["auc"]["value"] == pytest.approx(auc, abs=1e-12)
    lo, hi = summary["metrics"]["auc"]["ci95_pooled"]
    assert lo <= auc <= hi
    assert summary["run"] == str(cls_run) and summary["cohort"] == external_cls["csv"]
    assert summary["n_bags"] == len(cohort) and summary["n_patients"] == cohort["case_id"].nunique()


def test_gap_is_external_minus_the_runs_pooled_out_of_fold_auc(cls_eval, cls_run):
    summary = json.loads((cls_eval / "summary.json").read_text())
    oof = Run(cls_run).predictions()
    internal = roc_auc_score(oof["label"] == "positive", oof["prob_positive"])
    gap = summary["gap"]["auc"]
    assert gap["internal"] == pytest.approx(internal, abs=1e-12)
    assert gap["external"] == pytest.approx(summary["metrics"]["auc"]["value"], abs=1e-12)
    assert gap["difference"] == pytest.approx(gap["external"] - internal, abs=1e-12)
    assert gap["ci95"][0] <= gap["difference"] <= gap["ci95"][1] and 0 < gap["p"] <= 1
    report = (cls_eval / "report.md").read_text()
    assert "## Generalization gap" in report
    line = re.search(
        r"auc: internal (\d\.\d{3}) \(pooled out-of-fold\), external (\d\.\d{3}); difference "
        r"([+-]\d\.\d{3}) \[([+-]\d\.\d{3}), ([+-]\d\.\d{3})\] \(p [=<] ",
        report,
    )
    assert line is not None
    assert float(line[3]) == pytest.approx(gap["difference"], abs=1e-3)
    assert float(line[4]) == pytest.approx(gap["ci95"][0], abs=1e-3)
    assert float(line[5]) == pytest.approx(gap["ci95"][1], abs=1e-3)


def test_folder_holds_the_runs_files_and_the_library_call_agrees(
    cls_eval, cls_run, root, external_cls
):
    names = {p.name for p in cls_eval.iterdir()}
    assert {"predictions.csv", "predictions_patient.csv", "summary.json", "report.md"} <= names
    assert {"roc.png", "roc.csv", "subgroups.csv"} <= names
    assert not [n for n in names if n.startswith(".")]  # no temporary file left
    sub = pd.read_csv(cls_eval / "subgroups.csv", dtype={"value": str})
    assert set(sub.loc[sub["column"] == "site", "value"]) == {"A", "B"}
    patients = pd.read_csv(cls_eval / "predictions_patient.csv")
    assert patients["patient_id"].is_unique
    summary = evaluate(cls_run, root / "ext_cls.yaml", root / "eval_lib", n_boot=20)
    a = pd.read_csv(cls_eval / "predictions.csv")
    b = pd.read_csv(root / "eval_lib" / "predictions.csv")
    pd.testing.assert_frame_equal(a, b)
    assert summary["gap"]["auc"]["external"] == pytest.approx(summary["metrics"]["auc"]["value"])


def test_survival_c_index_is_lifelines(root, tmp_path):
    data = {**write_cohort(root, "train_surv", "survival", seed=1), **SURVIVAL_DATA}
    run = run_cv(
        config_from_dict(run_config(root, "survival", data)),
        root / "run_surv",
        progress=False,
        log=quiet,
        n_boot=20,
    )
    ext = {**write_cohort(root, "ext_surv", "survival", seed=8, offset=0.3), **SURVIVAL_DATA}
    config = cohort_yaml(tmp_path / "ext.yaml", ext, task="survival")
    out = tmp_path / "eval"
    assert (
        main(["evaluate", str(run), str(config), "--out", str(out), "--n-boot", "40", "--quiet"])
        == 0
    )
    pred = pd.read_csv(out / "predictions.csv")
    summary = json.loads((out / "summary.json").read_text())
    expected = concordance_index(pred["time"], -pred["risk"], pred["event"])  # higher risk, shorter
    assert summary["metrics"]["c_index"]["value"] == pytest.approx(expected, abs=1e-9)
    cohort = pd.read_csv(ext["csv"])
    assert pred["event"].sum() == (cohort["censorship"] == 0).sum()
    assert {"km.png", "risk_groups.csv"} <= {p.name for p in out.iterdir()}
    assert np.isfinite(summary["metrics"]["c_index_uno"]["value"])  # censoring from the run's bags
    assert "c_index: internal" in (out / "report.md").read_text()
    # a classification cohort for this survival run is refused, naming both tasks
    bad = cohort_yaml(
        tmp_path / "cls.yaml", {"csv": ext["csv"], "features": ext["features"]}, "classification"
    )
    with pytest.raises(MilError, match=r"task.type is 'classification', but .* is a survival run"):
        evaluate(run, bad, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def refused(run, config, out, match: str, capsys) -> None:
    """The library raises a MilError matching ``match``; the CLI prints it on one line."""
    with pytest.raises(MilError, match=match):
        evaluate(run, config, out)
    assert main(["evaluate", str(run), str(config), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mil: error:") and "\n" not in err and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


def test_bad_cohorts_are_refused_before_anything_is_written(
    cls_run, root, external_cls, tmp_path, capsys
):
    narrow = write_cohort(tmp_path, "narrow", "classification", seed=3, dim=8)
    config = cohort_yaml(tmp_path / "narrow.yaml", narrow)
    refused(
        cls_run,
        config,
        tmp_path / "o1",
        r"narrow_features/.+\.h5: features of dimension 8, .* 16-dimensional",
        capsys,
    )

    df = pd.read_csv(external_cls["csv"])
    df.loc[3, "label"] = "uncertain"
    df.to_csv(tmp_path / "relabelled.csv", index=False)
    config = cohort_yaml(
        tmp_path / "relabelled.yaml", {**external_cls, "csv": str(tmp_path / "relabelled.csv")}
    )
    slide = df.loc[3, "slide_id"]
    refused(
        cls_run,
        config,
        tmp_path / "o2",
        rf"class 'uncertain' \(column 'label', slide {slide}\) .* \['negative', 'positive'\]",
        capsys,
    )

    feats = tmp_path / "some_features"
    shutil.copytree(external_cls["features"], feats)
    (feats / f"{slide}.h5").unlink()
    config = cohort_yaml(tmp_path / "missing.yaml", {**external_cls, "features": str(feats)})
    refused(
        cls_run,
        config,
        tmp_path / "o3",
        rf"1 slides of .* have no feature file in .*: {slide}",
        capsys,
    )

    config = cohort_yaml(tmp_path / "surv.yaml", {**external_cls, **SURVIVAL_DATA}, task="survival")
    refused(
        cls_run,
        config,
        tmp_path / "o4",
        r"task.type is 'survival', but .* is a classification run",
        capsys,
    )

    config = cohort_yaml(tmp_path / "ok.yaml", external_cls)
    before = {p.name: p.stat().st_mtime_ns for p in cls_run.iterdir()}
    with pytest.raises(MilError, match=r"a run folder"):  # never over the run's own files
        evaluate(cls_run, config, cls_run)
    assert {p.name: p.stat().st_mtime_ns for p in cls_run.iterdir()} == before


def test_unpaired_difference_resamples_each_sample_on_its_own():
    """Against a constant second sample the CI is the first sample's own bootstrap CI."""
    rng = np.random.default_rng(0)
    y, s = rng.integers(0, 2, 80), rng.normal(size=80)
    groups = np.repeat(np.arange(40), 2)

    def auc(rows):
        return {"auc": roc_auc_score(y[rows], s[rows])}

    d = unpaired_difference(
        lambda rows: auc(rows), 80, lambda rows: {"auc": 0.5}, 10, n_boot=200, groups_a=groups
    )
    ci = bootstrap_ci(lambda r: auc(r), np.arange(80), n_boot=200, groups=groups)["auc"]
    assert d["auc"]["delta"] == pytest.approx(roc_auc_score(y, s) - 0.5)
    assert d["auc"]["ci_low"] == pytest.approx(ci[0] - 0.5) and d["auc"][
        "ci_high"
    ] == pytest.approx(ci[1] - 0.5)
    assert d["auc"]["n_resamples"] == 200
