"""Regression of a continuous target (``task.type: regression``). References: scikit-learn and
scipy on the saved predictions, a hand computation of the target scaler and its inverse, a
poisoned test fold that must leave the scaler (and the fold's model) unchanged, scikit-learn's
ridge regression on the pooled bags for ``--baseline``, and the folds' own partitions."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy.stats import pearsonr, spearmanr
from sklearn.linear_model import Ridge
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score, roc_auc_score

from mil.check import check_cohort
from mil.cli import main
from mil.config import config_from_dict
from mil.data.cohort import Cohort
from mil.data.readers import index_feature_dir
from mil.data.synthetic import write_synthetic_cohort
from mil.errors import ConfigError, DataError
from mil.metrics.regression import regression_metrics
from mil.results import MODEL
from mil.results.checkpoint import read_checkpoint
from mil.run import Run
from mil.splits import make_splits, read_splits
from mil.tasks import RegressionTask, make_task
from mil.train.inference import FoldModel, bags_of
from mil.train.runner import run_cv

pytestmark = pytest.mark.filterwarnings("ignore::mil.errors.TrainingWarning")


def cohort(root, name: str, seed: int, sites=("A", "B", "C"), n_patients: int = 36) -> dict:
    """A small synthetic regression cohort (target: planted share in percent plus noise)."""
    csv, feats = root / f"{name}.csv", root / f"{name}_features"
    df = write_synthetic_cohort(
        "regression",
        csv,
        feats,
        seed=seed,
        n_patients=n_patients,
        n_two_slides=6,
        dim=12,
        min_tiles=15,
        max_tiles=40,
        shift_norm=6.0,
    )
    rank = df["case_id"].rank(method="dense").astype(int)
    df["site"] = [sites[r % len(sites)] for r in rank]
    df.to_csv(csv, index=False)
    return {
        "csv": str(csv),
        "features": str(feats),
        "patient_col": "case_id",
        "label_col": "planted_percent",
        "bag_level": "patient",
        "site_col": "site",
    }


def config(root, data: dict, **task) -> dict:
    return {
        "name": "reg",
        "task": {"type": "regression", **task},
        "data": data,
        "splits": {"dir": str(root / "splits"), "folds": 3, "val_fraction": 0.25, "seed": 0},
        "model": {"name": "abmil_additive", "hidden_dim": 16},
        "train": {
            "epochs": 6,
            "batch_size": 8,
            "lr": 3e-3,
            "patience": None,
            "seed": 0,
            "threads": 1,
        },
    }


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """``mil generalize`` of a regression config (internal CV, site-preserved CV, an external
    cohort, with the refit), and the internal run's folder."""
    root = tmp_path_factory.mktemp("regression")
    raw = config(root, cohort(root, "internal", 2), cutoff=15.0)
    (root / "reg.yaml").write_text(yaml.safe_dump(raw))
    ext = root / "hospital_x.yaml"
    ext.write_text(
        yaml.safe_dump({"data": cohort(root, "external", 9, sites=("X",), n_patients=20)})
    )
    out = root / "out"
    argv = ["generalize", str(root / "reg.yaml"), "--external", str(ext), "--out", str(out)]
    assert main([*argv, "--n-boot", "50", "--refit", "--quiet"]) == 0
    return root, out, out / "abmil_additive" / "internal"


def test_metrics_equal_sklearn_and_scipy():
    rng = np.random.default_rng(0)
    y = rng.normal(10, 3, 80)
    p = y + rng.normal(0, 2, 80)
    m = regression_metrics(y, p, cutoff=11.0)
    assert m["r2"] == pytest.approx(r2_score(y, p))
    assert m["pearson_r"] == pytest.approx(pearsonr(y, p)[0])
    assert m["spearman_r"] == pytest.approx(spearmanr(y, p)[0])
    assert m["mae"] == pytest.approx(mean_absolute_error(y, p))
    assert m["rmse"] == pytest.approx(np.sqrt(mean_squared_error(y, p)))
    assert m["auc"] == pytest.approx(roc_auc_score(y >= 11.0, p))
    assert np.isnan(regression_metrics(np.ones(5), p[:5])["r2"])  # a constant target


def test_a_runs_summary_holds_the_metrics_of_its_predictions(study):
    _, _, run_dir = study
    run = Run(run_dir)
    for fold in run.folds:
        pred = run.predictions(fold)
        m = run.metrics(fold)["metrics"]
        y, p = pred["target"].to_numpy(), pred["prediction"].to_numpy()
        assert m["r2"] == pytest.approx(r2_score(y, p))
        assert m["mae"] == pytest.approx(mean_absolute_error(y, p))
        assert m["pearson_r"] == pytest.approx(pearsonr(y, p)[0])
    summary = run.folder.summary()
    assert summary["task"] == "regression"
    oof = run.predictions()
    for name in ("r2", "pearson_r", "spearman_r", "mae", "rmse", "auc"):
        entry = summary["metrics"][name]
        folds = [run.metrics(f)["metrics"][name] for f in run.folds]
        assert entry["mean"] == pytest.approx(np.mean(folds))
        lo, hi = entry["ci95_pooled"]
        assert lo <= hi
    pooled = regression_metrics(oof["target"], oof["prediction"], 15.0)
    assert (
        summary["metrics"]["r2"]["ci95_pooled"][0]
        <= pooled["r2"]
        <= summary["metrics"]["r2"]["ci95_pooled"][1]
    )
    report = (run_dir / "report.md").read_text()
    assert "regression of planted_percent" in report and "pred_vs_true.png" in report
    assert "residuals.png" in report and (run_dir / "residuals.png").is_file()  # by site


def test_predictions_come_back_on_the_original_scale(study):
    """Hand computation: the scaler is the training bags' mean and sd (population), and a
    prediction is the head's output times the sd plus the mean (averaged over the fold's
    ensemble: the model and its two ridge members, each with the same saved scaler)."""
    _, _, run_dir = study
    run = Run(run_dir)
    cfg = run.config
    coh = Cohort.from_config(cfg)
    split = read_splits(run.folder.splits_dir, coh, 3)[0]
    state = read_checkpoint(run.folder.fold_file(0, MODEL))["task_state"]
    train = (
        coh.bags.set_index("bag_id").loc[coh.bags_of_slides(split.train), "target"].to_numpy(float)
    )
    assert state["target_scaling"] == "standard"
    assert state["center"] == pytest.approx(train.mean())
    assert state["scale"] == pytest.approx(train.std())
    saved = run.predictions(0)
    bags = {b: coh.bag_slides[b] for b in saved["bag_id"].head(3)}
    index = index_feature_dir(cfg.data.features)[0]
    bag_slides, store = bags_of(bags, index, cfg.data.features)
    fm = FoldModel(run.folder.fold_file(0, MODEL), cfg, "0")
    assert len(fm.members) == 2  # ensemble: auto, meanpool_linear and bow_linear beside the model
    values = []
    for part in [fm, *fm.members]:  # each member's output through its own saved scaler, averaged
        s = part.payload["task_state"]
        assert (s["center"], s["scale"]) == (state["center"], state["scale"])
        values.append(
            part.forward(bag_slides, store).logits[:, 0].numpy() * s["scale"] + s["center"]
        )
    by_hand = np.mean(values, axis=0)
    np.testing.assert_allclose(saved["prediction"].head(3), by_hand, rtol=1e-4)
    again = run.predict(bags, folds=[0])  # Run.predict: the same path
    np.testing.assert_allclose(again["prediction"], by_hand, rtol=1e-4)


def test_log_scaling_by_hand():
    task = RegressionTask(RegressionTask.Options(target_scaling="log"), [])
    y = np.array([1.0, 10.0, 100.0, 1000.0])
    task.fit_fold(pd.DataFrame({"target": y}))
    logs = np.log(y)
    assert task.state()["center"] == pytest.approx(logs.mean())
    assert task.state()["scale"] == pytest.approx(logs.std())
    out = task.outputs(np.array([[0.0], [1.0]]))["prediction"].to_numpy()
    np.testing.assert_allclose(out, np.exp([logs.mean(), logs.mean() + logs.std()]))
    # the constant prediction of the diagnostics: the training mean (of the scaled target)
    assert task.constant_logits(pd.DataFrame({"target": y}))[0] == pytest.approx(0.0, abs=1e-12)
    plain = RegressionTask(RegressionTask.Options(target_scaling="none"), [])
    plain.fit_fold(pd.DataFrame({"target": y}))
    assert plain.constant_logits(pd.DataFrame({"target": y}))[0] == pytest.approx(y.mean())


def test_the_scaler_ignores_the_test_fold(tmp_path):
    """Poisoning: the test fold's targets set to 1e6 leave the fold's target scaler, and so its
    model and its predictions of the training bags, unchanged."""
    data = cohort(tmp_path, "c", 4)
    raw = config(tmp_path, data)
    raw["train"]["faithfulness"] = False
    clean = run_cv(
        config_from_dict(raw),
        tmp_path / "clean",
        folds=[0],
        progress=False,
        log=lambda *a: None,
        n_boot=10,
    )
    coh = Cohort.from_config(config_from_dict(raw))
    test = read_splits(tmp_path / "splits", coh, 3)[0].test
    df = pd.read_csv(data["csv"])
    df.loc[df["slide_id"].isin(test), "planted_percent"] = 1e6
    df.to_csv(data["csv"], index=False)
    poisoned = run_cv(
        config_from_dict(raw),
        tmp_path / "poisoned",
        folds=[0],
        progress=False,
        log=lambda *a: None,
        n_boot=10,
    )
    a = read_checkpoint(Run(clean).folder.fold_file(0, MODEL))
    b = read_checkpoint(Run(poisoned).folder.fold_file(0, MODEL))
    assert a["task_state"] == b["task_state"]
    for k in a["state_dict"]:
        np.testing.assert_allclose(
            a["state_dict"][k].numpy(), b["state_dict"][k].numpy(), rtol=1e-5, atol=1e-6
        )
    pa, pb = Run(clean).predictions(0), Run(poisoned).predictions(0)
    np.testing.assert_allclose(pa["prediction"], pb["prediction"], rtol=1e-5)
    assert (pb["target"] == 1e6).all() and not (pa["target"] == 1e6).any()


def test_folds_are_stratified_on_target_quantiles_by_patient_and_by_site(tmp_path):
    data = cohort(tmp_path, "c", 5, sites=("A", "B", "C", "D"), n_patients=48)
    cfg = config_from_dict(config(tmp_path, data))
    coh = Cohort.from_config(cfg)
    splits = make_splits(coh, 4, 0.2, seed=0)
    patient = dict(zip(coh.slides["slide_id"], coh.slides["patient_id"]))
    quart = pd.qcut(coh.slides["target"].rank(method="first"), 4, labels=False)
    quart = dict(zip(coh.slides["slide_id"], quart))
    for sp in splits:
        parts = [{patient[s] for s in sp.part(p)} for p in ("train", "val", "test")]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        assert {quart[s] for s in sp.test} == {0, 1, 2, 3}  # every quartile in every test fold
    site = dict(zip(coh.slides["slide_id"], coh.slides["site"]))
    by_site = make_splits(coh, 4, 0.2, seed=0, site_col="site")
    for sp in by_site:
        test_sites = {site[s] for s in sp.test}
        assert not test_sites & {site[s] for s in sp.train + sp.val}


@pytest.mark.parametrize(
    ("value", "options", "needle"),
    [
        ("high", {}, "finite numbers"),
        (float("inf"), {}, "finite numbers"),
        (0.0, {"target_scaling": "log"}, "needs positive targets"),
    ],
)
def test_mil_check_refuses_bad_targets_naming_the_slide(tmp_path, value, options, needle):
    data = cohort(tmp_path, "c", 6, n_patients=12)
    df = pd.read_csv(data["csv"])
    df["planted_percent"] = df["planted_percent"].abs() + 1.0
    df["planted_percent"] = df["planted_percent"].astype(object)
    df.loc[3, "planted_percent"] = value
    df.to_csv(data["csv"], index=False)
    problems, _ = check_cohort(config_from_dict(config(tmp_path, data, **options)))
    errors = [p.what for p in problems if p.severity == "error"]
    assert any(needle in e and df.loc[3, "slide_id"] in e for e in errors), errors


def test_too_few_distinct_targets_are_refused(tmp_path):
    data = cohort(tmp_path, "c", 7, n_patients=12)
    df = pd.read_csv(data["csv"])
    df["planted_percent"] = (df.index % 2).astype(float)
    df.to_csv(data["csv"], index=False)
    problems, _ = check_cohort(config_from_dict(config(tmp_path, data)))
    assert any("2 distinct value(s)" in p.what and "classification" in p.what for p in problems)
    with pytest.raises(DataError, match="at least 3"):
        Cohort.from_config(config_from_dict(config(tmp_path, data)))


def test_task_options_are_checked():
    base = {"data": {"csv": "x.csv", "features": "f"}}
    with pytest.raises(ConfigError, match="task.loss = 'cox'; expected one of"):
        config_from_dict({**base, "task": {"type": "regression", "loss": "cox"}})
    with pytest.raises(ConfigError, match="task.cutoff must be a finite number"):
        config_from_dict({**base, "task": {"type": "regression", "cutoff": float("nan")}})
    cfg = config_from_dict({**base, "task": {"type": "regression"}})
    task = make_task(cfg, [])
    assert task.stop_criterion("auto") == ("val_loss", -1)  # early stopping on the validation loss
    from mil.models import get as get_model

    assert task.default_ensemble(get_model("abmil")) == ["meanpool_linear", "bow_linear"]
    assert task.default_ensemble(get_model("meanpool_linear")) == []
    assert cfg.to_dict()["task"] == {
        "type": "regression",
        "loss": "mse",
        "target_scaling": "standard",
        "cutoff": None,
    }


def test_heatmaps_draw_the_signed_contribution(study, tmp_path):
    _, _, run_dir = study
    run = Run(run_dir)
    top = run.top_slides(2)  # patient bags: the slides of the highest predictions
    oof = run.predictions().sort_values(["prediction", "bag_id"], ascending=[False, True])
    assert top[0].startswith(oof["bag_id"].iloc[0] + "-S")
    scores = run.scores(top[0])
    assert scores.attrs["kind"].startswith("contribution")
    assert (scores["score"] < 0).any() or (scores["score"] > 0).all()
    fig = run.heatmap(top[0])
    assert fig is not None
    assert main(["heatmap", str(run_dir), "--top-n", "2", "--out", str(tmp_path / "png")]) == 0
    assert len(list((tmp_path / "png").glob("*.png"))) == 2


def test_generalize_and_evaluate_score_on_the_original_scale(study):
    root, out, run_dir = study
    table = pd.read_csv(out / "generalization.csv")
    r2 = table[table["metric"] == "r2"].set_index("setting")
    assert list(r2.index) == ["internal CV", "site-preserved CV", "external"]
    ext = pd.read_csv(out / "abmil_additive" / "external" / "hospital_x" / "predictions.csv")
    assert r2.loc["external", "value"] == pytest.approx(
        r2_score(ext["target"], ext["prediction"]), abs=1e-12
    )
    truth = pd.read_csv(root / "external.csv").groupby("case_id")["planted_percent"].first()
    assert np.allclose(ext.set_index("patient_id").loc[truth.index, "target"], truth)
    summary = json.loads(
        (out / "abmil_additive" / "external" / "hospital_x" / "summary.json").read_text()
    )
    assert set(summary["metrics"]) >= {"r2", "pearson_r", "spearman_r", "mae", "rmse", "auc"}
    assert (run_dir / "refit" / "model.pt").is_file()


def test_baseline_is_ridge_regression_on_pooled_bags(tmp_path):
    """``--baseline meanpool_linear``: scikit-learn's Ridge on the standardised mean-pooled bags
    (of the training fold), at the penalty the validation loss chose, predicts the test bags."""
    data = cohort(tmp_path, "c", 8)
    raw = config(tmp_path, data)
    raw["data"]["standardize"] = False
    raw["model"] = {"name": "meanpool_linear"}
    run_dir = run_cv(
        config_from_dict(raw),
        tmp_path / "ridge",
        folds=[0],
        progress=False,
        log=lambda *a: None,
        n_boot=10,
    )
    run = Run(run_dir)
    cfg = run.config
    coh = Cohort.from_config(cfg)
    sp = read_splits(tmp_path / "splits", coh, 3)[0]
    history = pd.read_csv(run.folder.fold_file(0, "history.csv"))
    alpha = float(history.loc[history["best"], "alpha"].iloc[0])
    index = index_feature_dir(cfg.data.features)[0]
    bag_slides, store = bags_of(coh.bag_slides, index, cfg.data.features)

    def pooled(bags):
        return np.stack(
            [
                np.concatenate([store.get(s)[0] for s in bag_slides[b]]).astype(float).mean(0)
                for b in bags
            ]
        )

    train = coh.bags_of_slides(sp.train)
    test = run.predictions(0)["bag_id"].tolist()
    f_tr, f_te = pooled(train), pooled(test)
    mu, sd = f_tr.mean(0), f_tr.std(0)
    y = coh.bags.set_index("bag_id").loc[train, "target"].to_numpy(float)
    ridge = Ridge(alpha=alpha).fit((f_tr - mu) / sd, (y - y.mean()) / y.std())
    by_hand = ridge.predict((f_te - mu) / sd) * y.std() + y.mean()
    np.testing.assert_allclose(run.predictions(0)["prediction"], by_hand, rtol=1e-3, atol=1e-3)


def test_regression_targets_benchmark_smoke(tmp_path):
    """benchmarks/regression_targets.py --smoke: its table against scikit-learn's R² of the
    run's out-of-fold predictions: the default average, each member's own, and the model
    averaged with bow_linear by hand."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import regression_targets

    table = regression_targets.main(["--out", str(tmp_path), "--smoke"])
    row = table.iloc[0]
    run_dir = tmp_path / "runs" / "demo_regression"

    def pooled(pattern):
        return pd.concat(pd.read_csv(p) for p in sorted(run_dir.glob(pattern))).sort_values(
            "bag_id"
        )

    average = pooled("fold_*/predictions.csv")
    assert row["r2"] == pytest.approx(r2_score(average["target"], average["prediction"]))
    members = {
        "model": "abmil_additive",
        "meanpool_linear": "meanpool_linear",
        "bow_linear": "bow_linear",
    }
    preds = {key: pooled(f"fold_*/members/{name}/predictions.csv") for key, name in members.items()}
    for key, p in preds.items():
        assert row[f"{key}_r2"] == pytest.approx(r2_score(p["target"], p["prediction"]))
        assert row[f"avg_minus_{key}"] == pytest.approx(row["r2"] - row[f"{key}_r2"])
    # the default average is the mean of the three members' predictions
    mean = np.mean([p["prediction"].to_numpy() for p in preds.values()], axis=0)
    np.testing.assert_allclose(average["prediction"], mean, rtol=1e-6)
    pair = (
        preds["model"]["prediction"].to_numpy() + preds["bow_linear"]["prediction"].to_numpy()
    ) / 2
    assert row["model+bow_linear_r2"] == pytest.approx(r2_score(preds["model"]["target"], pair))
