"""The linear baselines (meanpool_linear, bow_linear, proto_linear) against direct scikit-learn /
scikit-survival fits on the same folds, written here from the split files and the
feature files alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import small_config
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss, roc_auc_score
from sklearn.mixture import GaussianMixture
from sksurv.linear_model import CoxPHSurvivalAnalysis
from sksurv.util import Surv

from mil.config import config_from_dict
from mil.data.synthetic import write_synthetic_cohort
from mil.errors import MilWarning
from mil.run import Run
from mil.train.closed_form import ALPHA_GRID, C_GRID
from mil.train.runner import run_cv


def features(root: Path, bag: str) -> np.ndarray:
    with h5py.File(root / "features" / f"{bag}.h5", "r") as f:
        return f["features"][:].astype(np.float64)


def split(run: Path, fold: int) -> dict[str, list[str]]:
    frame = pd.read_csv(run / "splits" / f"splits_{fold}.csv")
    return {p: frame[p].dropna().astype(str).tolist() for p in ("train", "val", "test")}


def standardised(vectors: dict[str, np.ndarray], ids: dict[str, list[str]]):
    tr = np.stack([vectors[b] for b in ids["train"]])
    mu, sd = tr.mean(0), tr.std(0)
    sd[~(sd > 1e-8)] = 1.0
    return {p: (np.stack([vectors[b] for b in ids[p]]) - mu) / sd for p in ids}


def run(raw: dict, out: Path) -> Path:
    return run_cv(config_from_dict(raw), out, progress=False, log=lambda *a: None, n_boot=20)


def test_meanpool_classification_is_sklearn_logistic_regression(tmp_path):
    raw = small_config(tmp_path / "c")
    raw["model"] = {"name": "meanpool_linear"}
    out = run(raw, tmp_path / "run")
    labels = pd.read_csv(tmp_path / "c" / "cohort.csv").set_index("slide_id")["label"]
    y_of = {b: int(v == "positive") for b, v in labels.items()}
    vectors = {b: features(tmp_path / "c", b).mean(0) for b in labels.index}
    for fold in range(3):
        ids = split(out, fold)
        z = standardised(vectors, ids)
        y = {p: np.array([y_of[b] for b in ids[p]]) for p in ids}
        # the penalty: the lowest validation log-loss over the grid, computed independently
        val = [
            log_loss(
                y["val"],
                LogisticRegression(C=c, max_iter=5000)
                .fit(z["train"], y["train"])
                .predict_proba(z["val"]),
                labels=[0, 1],
            )
            for c in C_GRID
        ]
        history = pd.read_csv(out / f"fold_{fold}" / "history.csv")
        np.testing.assert_allclose(history["val_loss"], val, rtol=1e-4, atol=1e-5)
        best = C_GRID[int(np.argmin(val))]
        assert history.loc[history["best"], "C"].item() == pytest.approx(best)
        direct = LogisticRegression(C=best, max_iter=5000).fit(z["train"], y["train"])
        pred = pd.read_csv(out / f"fold_{fold}" / "predictions.csv").set_index("bag_id")
        np.testing.assert_allclose(
            pred.loc[ids["test"], "prob_positive"], direct.predict_proba(z["test"])[:, 1], atol=2e-4
        )
    # no training curve, so no under-training advice; constant predictions say what to read
    findings = [
        f
        for k in range(3)
        for f in json.loads((out / f"fold_{k}" / "metrics.json").read_text())["diagnostics"]
    ]
    assert findings and all(f["kind"] == "constant predictions" for f in findings)
    assert all("penalty grid" in f["message"] and "train.lr" not in f["message"] for f in findings)


def test_bag_of_words_is_kmeans_histograms_and_logistic_regression(tmp_path):
    raw = small_config(tmp_path / "c")
    raw["model"] = {"name": "bow_linear", "words": 8}
    out = run(raw, tmp_path / "run")
    labels = pd.read_csv(tmp_path / "c" / "cohort.csv").set_index("slide_id")["label"]
    ids = split(out, 0)
    x = {b: features(tmp_path / "c", b).astype(np.float32) for b in labels.index}
    km = KMeans(n_clusters=8, n_init=3, random_state=0).fit(
        np.concatenate([x[b] for b in ids["train"]])
    )
    hist = {b: np.bincount(km.predict(x[b]), minlength=8) / len(x[b]) for b in x}
    z = standardised(hist, ids)
    y = {p: np.array([int(labels[b] == "positive") for b in ids[p]]) for p in ids}
    history = pd.read_csv(out / "fold_0" / "history.csv")
    direct = LogisticRegression(C=history.loc[history["best"], "C"].item(), max_iter=5000)
    direct.fit(z["train"], y["train"])
    pred = pd.read_csv(out / "fold_0" / "predictions.csv").set_index("bag_id")
    np.testing.assert_allclose(
        pred.loc[ids["test"], "prob_positive"], direct.predict_proba(z["test"])[:, 1], atol=2e-4
    )


def test_prototypes_are_a_gaussian_mixture_and_logistic_regression(tmp_path):
    """proto_linear: scikit-learn's diagonal GaussianMixture on the training instances; each
    bag the mean of [posteriors, posterior-weighted standardised offsets from each component]."""
    raw = small_config(tmp_path / "c")
    raw["model"] = {"name": "proto_linear", "prototypes": 3}
    out = run(raw, tmp_path / "run")
    labels = pd.read_csv(tmp_path / "c" / "cohort.csv").set_index("slide_id")["label"]
    ids = split(out, 0)
    x = {b: features(tmp_path / "c", b).astype(np.float32) for b in labels.index}
    train_x = np.concatenate([x[b] for b in ids["train"]])
    gmm = GaussianMixture(3, covariance_type="diag", reg_covar=1e-4, max_iter=200, random_state=0)
    gmm.fit(train_x)
    sd = np.sqrt(gmm.covariances_)

    def vector(v: np.ndarray) -> np.ndarray:
        r = gmm.predict_proba(v)
        offsets = r[:, :, None] * (v[:, None, :] - gmm.means_) / sd
        return np.concatenate([r, offsets.reshape(len(v), -1)], axis=1).mean(0)

    z = standardised({b: vector(x[b].astype(np.float64)) for b in x}, ids)
    y = {p: np.array([int(labels[b] == "positive") for b in ids[p]]) for p in ids}
    history = pd.read_csv(out / "fold_0" / "history.csv")
    direct = LogisticRegression(C=history.loc[history["best"], "C"].item(), max_iter=5000)
    direct.fit(z["train"], y["train"])
    pred = pd.read_csv(out / "fold_0" / "predictions.csv").set_index("bag_id")
    np.testing.assert_allclose(
        pred.loc[ids["test"], "prob_positive"], direct.predict_proba(z["test"])[:, 1], atol=1e-3
    )


def test_clinical_linear_is_logistic_regression_on_the_scaled_tables(tmp_path):
    """clinical_linear reads the tables alone: each bag's vector is its patient's values scaled
    with the training fold's present patients (mean, sd), zero where the patient has no row,
    and the row's availability; then the standardised logistic regression, as scikit-learn."""
    raw = small_config(tmp_path / "c")
    cohort = pd.read_csv(raw["data"]["csv"])
    patients = cohort.drop_duplicates("case_id")
    rng = np.random.default_rng(0)
    y = (patients["label"] == "positive").to_numpy(float)
    omics = pd.DataFrame(
        {
            "case_id": patients["case_id"],
            "g1": 2.0 * y + rng.normal(0, 0.7, len(y)),
            "g2": rng.normal(5, 2, len(y)),
        }
    )
    omics = omics[rng.uniform(size=len(y)) > 0.25]
    omics.to_csv(tmp_path / "omics.csv", index=False)
    raw["data"]["tabular"] = [{"name": "omics", "csv": str(tmp_path / "omics.csv")}]
    raw["model"] = {"name": "clinical_linear"}
    out = run(raw, tmp_path / "run")
    patient = cohort.set_index("slide_id")["case_id"]
    table = omics.set_index("case_id")
    for fold in range(3):
        ids = split(out, fold)
        seen = table.loc[table.index.isin(patient[ids["train"]].unique())]
        scaled = (table - seen.mean()) / seen.std(ddof=0)

        vectors = {
            b: np.r_[scaled.loc[p].to_numpy(), 1.0] if p in scaled.index else np.zeros(3)
            for b, p in patient.items()
        }
        z = standardised(vectors, ids)
        labels = cohort.set_index("slide_id")["label"]
        yy = {p: np.array([int(labels[b] == "positive") for b in ids[p]]) for p in ids}
        history = pd.read_csv(out / f"fold_{fold}" / "history.csv")
        direct = LogisticRegression(C=history.loc[history["best"], "C"].item(), max_iter=5000)
        direct.fit(z["train"], yy["train"])
        pred = pd.read_csv(out / f"fold_{fold}" / "predictions.csv").set_index("bag_id")
        np.testing.assert_allclose(
            pred.loc[ids["test"], "prob_positive"], direct.predict_proba(z["test"])[:, 1], atol=2e-4
        )
    pooled = pd.concat(pd.read_csv(p) for p in sorted(out.glob("fold_*/predictions.csv")))
    has = pooled["modalities"] == "slides+omics"
    assert roc_auc_score(pooled.loc[has, "label"], pooled.loc[has, "prob_positive"]) > 0.85


def test_a_slide_model_with_a_clinical_member_predicts_with_the_runs_tables(tmp_path):
    """ensemble: [clinical_linear] beside a slide model (a late fusion of linear outputs):
    Run.predict gives each bag of the run's cohort its patient's tables and reproduces the
    fold's saved predictions; a bag from elsewhere is predicted with its tables missing,
    with a warning."""
    raw = small_config(tmp_path / "c", epochs=1)
    patients = pd.read_csv(raw["data"]["csv"]).drop_duplicates("case_id")
    y = (patients["label"] == "positive").to_numpy(float)
    pd.DataFrame({"case_id": patients["case_id"], "g1": 3.0 * y}).to_csv(
        tmp_path / "t.csv", index=False
    )
    raw["data"]["tabular"] = [{"name": "omics", "csv": str(tmp_path / "t.csv")}]
    raw["ensemble"] = ["clinical_linear"]
    out = run(raw, tmp_path / "run")
    r = Run(out)
    saved = r.predictions(0)
    again = r.predict(saved["bag_id"].tolist(), folds=[0])
    np.testing.assert_allclose(again["prob_positive"], saved["prob_positive"], rtol=1e-5)
    member = pd.read_csv(out / "fold_0" / "members" / "clinical_linear" / "predictions.csv")
    assert roc_auc_score(member["label"], member["prob_positive"]) == 1.0  # the tables' signal
    other = tmp_path / "elsewhere.h5"
    shutil.copy(tmp_path / "c" / "features" / f"{saved['bag_id'].iloc[0]}.h5", other)
    with pytest.warns(MilWarning, match="predicted as missing"):
        alone = r.predict([str(other), saved["bag_id"].iloc[1]], folds=[0])
    assert alone["bag_id"].tolist() == ["elsewhere", saved["bag_id"].iloc[1]]
    assert alone["prob_positive"].iloc[1] == pytest.approx(saved["prob_positive"].iloc[1], rel=1e-5)


@pytest.fixture(scope="module")
def survival_cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("surv")
    write_synthetic_cohort(
        "survival",
        root / "cohort.csv",
        root / "features",
        n_patients=60,
        n_two_slides=0,
        dim=16,
        min_tiles=20,
        max_tiles=60,
    )
    return root


def survival_config(root: Path, loss: str) -> dict:
    return {
        "task": {"type": "survival", "loss": loss, "bins": 3},
        "data": {
            "csv": str(root / "cohort.csv"),
            "features": str(root / "features"),
            "patient_col": "case_id",
            "time_col": "survival_months",
            "event_col": "censorship",
            "censored_value": 1,
        },
        "splits": {"dir": str(root / "splits"), "folds": 3, "val_fraction": 0.2, "seed": 0},
        "model": {"name": "meanpool_linear"},
    }


@pytest.mark.parametrize("loss", ["cox", "nll"])
def test_meanpool_survival_is_scikit_survival_ridge_cox(survival_cohort, tmp_path, loss):
    out = run(survival_config(survival_cohort, loss), tmp_path / "run")
    cohort = pd.read_csv(survival_cohort / "cohort.csv").set_index("slide_id")
    vectors = {b: features(survival_cohort, b).mean(0) for b in cohort.index}
    ids = split(out, 1)
    z = standardised(vectors, ids)
    part = cohort.loc[ids["train"]]
    y = Surv.from_arrays(part["censorship"].to_numpy() == 0, part["survival_months"].to_numpy())
    history = pd.read_csv(out / "fold_1" / "history.csv")
    alpha = history.loc[history["best"], "alpha"].item()
    assert alpha in ALPHA_GRID
    cox = CoxPHSurvivalAnalysis(alpha=alpha, ties="efron", n_iter=200).fit(z["train"], y)
    pred = pd.read_csv(out / "fold_1" / "predictions.csv").set_index("bag_id").loc[ids["test"]]
    if loss == "cox":
        np.testing.assert_allclose(pred["risk"], cox.predict(z["test"]), rtol=1e-3, atol=1e-4)
        return
    # discrete-time: survival after bin k is the Cox model's S(cut_k | x) (Breslow baseline)
    cuts = json.loads((out / "fold_1" / "metrics.json").read_text())["metrics"]["bin_cuts"]
    curves = cox.predict_survival_function(z["test"])
    for k, cut in enumerate(cuts):
        expected = [
            fn(min(max(cut, fn.x[0]), fn.x[-1])) if cut >= fn.x[0] else 1.0 for fn in curves
        ]
        np.testing.assert_allclose(pred[f"surv_{k}"], expected, atol=2e-3)


def test_instance_scores_average_to_the_bag_logit(tmp_path):
    """The baselines are additive: a bag's saved instance scores average to its logit of
    the positive class against the negative one, less the bias; and mil.Run.predict
    reproduces the saved predictions from model.pt."""
    from mil import Run

    raw = small_config(tmp_path / "c")
    raw["model"] = {"name": "meanpool_linear"}
    out = run(raw, tmp_path / "run")
    r = Run(out)
    model = r.model(0)
    pred = pd.read_csv(out / "fold_0" / "predictions.csv")
    for _, row in pred.head(4).iterrows():
        scores = r.scores(row["bag_id"], kind=None, fold=0)["score"].to_numpy()
        logit = np.log(row["prob_positive"] / row["prob_negative"])
        bias = float(model.bias[1] - model.bias[0])
        # the scores use the positive row of the head; the negative row is 0 (binary)
        assert float(model.weight[0].abs().max()) == 0.0
        assert scores.mean() == pytest.approx(logit - bias, abs=1e-4)
    again = r.predict(pred["bag_id"].tolist(), folds=[0]).set_index("bag_id")
    np.testing.assert_allclose(
        again.loc[pred["bag_id"], "prob_positive"], pred["prob_positive"], atol=1e-5
    )


def test_train_with_baseline_reports_the_paired_difference(tmp_path):
    """``mil train --baseline``: the baseline runs on the run's own split files; baselines.csv
    holds both pooled AUCs (sklearn's, on the saved out-of-fold predictions) and their
    difference; report.md shows it; a rerun writes nothing."""
    import yaml
    from sklearn.metrics import roc_auc_score

    from mil.cli import main

    raw = small_config(tmp_path / "c")
    raw["splits"].pop("dir")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    assert (
        main(["train", str(tmp_path / "cfg.yaml"), "--out", str(out), "--baseline", "--quiet"]) == 0
    )
    base = out / "baselines" / "meanpool_linear"
    for k in range(3):
        assert (base / "splits" / f"splits_{k}.csv").read_bytes() == (
            out / "splits" / f"splits_{k}.csv"
        ).read_bytes()

    def pooled_auc(run):
        pred = pd.concat(pd.read_csv(run / f"fold_{k}" / "predictions.csv") for k in range(3))
        return roc_auc_score(pred["label"] == "positive", pred["prob_positive"])

    row = pd.read_csv(out / "baselines.csv").iloc[0]
    assert row["baseline"] == "meanpool_linear"
    assert row["baseline_value"] == pytest.approx(pooled_auc(base))
    assert row["model_value"] == pytest.approx(pooled_auc(out))
    assert row["delta"] == pytest.approx(pooled_auc(out) - pooled_auc(base))
    assert row["delta_ci_low"] <= row["delta"] <= row["delta_ci_high"]
    assert "## Against linear baselines" in (out / "report.md").read_text()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert (
        main(["train", str(tmp_path / "cfg.yaml"), "--out", str(out), "--baseline", "--quiet"]) == 0
    )
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_a_penalty_whose_fit_diverges_is_skipped_and_all_failing_is_named(tmp_path, monkeypatch):
    """A solver failure at one penalty (scikit-survival's 'search direction contains NaN' on a
    wide, ill-conditioned basis) leaves that row empty and the grid goes on; at every penalty
    it is a DataError naming the model."""
    from mil.errors import DataError
    from mil.tasks.classification import ClassificationTask

    real = ClassificationTask.fit_linear

    def flaky(self, z, bags, penalty, seed):
        if penalty < threshold:
            raise ValueError("search direction contains NaN or infinite values")
        return real(self, z, bags, penalty, seed)

    monkeypatch.setattr(ClassificationTask, "fit_linear", flaky)
    raw = small_config(tmp_path / "c")
    raw["model"] = {"name": "meanpool_linear"}
    threshold = 1e-2
    out = run(raw, tmp_path / "run")
    history = pd.read_csv(out / "fold_0" / "history.csv")
    failed = history["C"] < threshold
    assert failed.any() and history.loc[failed, "val_loss"].isna().all()
    assert not history.loc[history["best"], "C"].lt(threshold).any()
    assert history.loc[~failed, "val_loss"].notna().all()
    threshold = 1e9
    raw["splits"]["dir"] = str(tmp_path / "splits2")
    with pytest.raises(
        DataError, match="meanpool_linear.*failed at every penalty.*search direction"
    ):
        run(raw, tmp_path / "run2")


def test_survival_auto_ensemble_adds_the_tables_linear_risk(survival_cohort, tmp_path):
    """ensemble: auto on a survival run with data.tabular: the slide model is averaged with
    meanpool_linear and clinical_linear (a late fusion of risks); without tables, with a model
    that reads the tables itself, or for classification, not."""
    from mil.config import config_from_dict

    table = tmp_path / "t.csv"
    ids = pd.read_csv(survival_cohort / "cohort.csv")["case_id"].drop_duplicates()
    pd.DataFrame({"case_id": ids, "g1": np.arange(len(ids), dtype=float)}).to_csv(
        table, index=False
    )
    data = {
        "csv": str(survival_cohort / "cohort.csv"),
        "features": str(survival_cohort / "features"),
        "patient_col": "case_id",
        "time_col": "survival_months",
        "event_col": "censorship",
        "censored_value": 1,
    }
    tables = [{"name": "omics", "csv": str(table), "id_col": "case_id"}]

    def members(task: str, model: str | None = None, with_tables: bool = True) -> list[str]:
        raw = {
            "task": {"type": task},
            "data": {**data, **({"tabular": tables} if with_tables else {})},
        }
        if model:
            raw["model"] = {"name": model}
        return config_from_dict(raw).members

    assert members("survival") == ["meanpool_linear", "clinical_linear"]
    assert members("survival", with_tables=False) == ["meanpool_linear"]
    assert members("survival", "late_fusion") == []
    assert members("survival", "meanpool_linear") == []
