"""Ordinal grading (``task.type: ordinal``). References: the cumulative-link loss computed from
its formula (and ``coral_pytorch``'s, where that package is installed; it is not a dependency),
scikit-learn's ``cohen_kappa_score(weights="quadratic")``, balanced accuracy and AUC on the saved
predictions, the thresholds by hand from the training fold's grades, an independent fit of the
linear cumulative-link baseline, and ``mil train --baseline --refit``, ``mil evaluate`` (with and
without ``--refit``), ``mil heatmap`` and ``Run.predict`` on a synthetic graded cohort."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from scipy.optimize import minimize
from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score, confusion_matrix

from mil.cli import main
from mil.config import config_from_dict
from mil.data.cohort import Cohort
from mil.data.readers import index_feature_dir
from mil.data.synthetic import write_synthetic_cohort
from mil.errors import ConfigError, DataError
from mil.metrics.classification import classification_auc
from mil.results import MODEL
from mil.results.checkpoint import read_checkpoint
from mil.run import Run
from mil.splits import make_splits, read_splits
from mil.tasks import OrdinalTask, make_task
from mil.tasks.ordinal_metrics import (
    class_probabilities,
    decide,
    ordinal_metrics,
    quadratic_weighted_kappa,
)
from mil.train.inference import bags_of
from mil.train.runner import run_cv
from tests.conftest import assert_predict_reproduces, evaluate_both_ways

pytestmark = pytest.mark.filterwarnings("ignore::mil.errors.TrainingWarning")


def cohort(root, name: str, seed: int, n_patients: int = 48) -> dict:
    """A small synthetic graded cohort (grades 1-4 from the planted share, with noise)."""
    csv, feats = root / f"{name}.csv", root / f"{name}_features"
    write_synthetic_cohort(
        "ordinal",
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
    return {
        "csv": str(csv),
        "features": str(feats),
        "patient_col": "case_id",
        "label_col": "grade",
        "bag_level": "patient",
    }


def config(root, data: dict, **task) -> dict:
    return {
        "name": "ord",
        "task": {"type": "ordinal", **task},
        "data": data,
        "splits": {"dir": str(root / "splits"), "folds": 3, "val_fraction": 0.25, "seed": 0},
        "model": {"name": "abmil_additive", "hidden_dim": 16},
        "train": {
            "epochs": 8,
            "batch_size": 8,
            "lr": 3e-3,
            "patience": None,
            "seed": 0,
            "threads": 1,
        },
    }


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """``mil train --baseline meanpool_linear --refit`` of an ordinal config; its folder."""
    root = tmp_path_factory.mktemp("ordinal")
    raw = config(root, cohort(root, "internal", 3))
    (root / "ord.yaml").write_text(yaml.safe_dump(raw))
    run_dir = root / "run"
    argv = ["train", str(root / "ord.yaml"), "--out", str(run_dir), "--quiet"]
    assert main([*argv, "--baseline", "meanpool_linear", "--refit"]) == 0
    return root, run_dir


# ---- the head, its loss and its metrics, by hand --------------------------------------------


def _task(k: int = 4, **options) -> OrdinalTask:
    return OrdinalTask(OrdinalTask.Options(**options), [str(g) for g in range(1, k + 1)])


def test_the_loss_equals_its_formula():
    task = _task(4)
    y = np.array([0, 1, 2, 3, 3, 0, 2])
    task.fit_fold(pd.DataFrame({"label": y}))
    theta = task.thresholds
    s = np.array([-1.3, 0.2, 0.9, 2.5, -0.4, 0.0, 1.1])
    # the formula: -mean_b sum_j [y_b > j] log sigma(s_b - t_j) + [y_b <= j] log(1 - sigma(s_b - t_j))
    sig = 1.0 / (1.0 + np.exp(-(s[:, None] - theta[None, :])))
    bits = (y[:, None] > np.arange(3)[None, :]).astype(float)
    by_hand = -(bits * np.log(sig) + (1 - bits) * np.log(1 - sig)).sum(1).mean()
    logits = torch.tensor(s[:, None], dtype=torch.float64)
    loss = task.loss(logits, task.targets(pd.DataFrame({"label": y})))
    assert float(loss) == pytest.approx(by_hand, rel=1e-12)
    # the marginal thresholds: the training grades' cumulative log-odds (counts + 0.5)
    counts = np.bincount(y, minlength=4) + 0.5
    cum = np.cumsum(counts)[:3] / counts.sum()
    np.testing.assert_allclose(theta, np.log(cum / (1 - cum)))
    # the best constant score: the loss's derivative vanishes there
    c = task.constant_logits(pd.DataFrame({"label": y}))[0]
    assert abs(c) < 0.1
    assert (1 / (1 + np.exp(-(c - theta[None, :]))) - bits).sum() == pytest.approx(0.0, abs=1e-6)


def test_the_loss_equals_coral_pytorchs():
    """``coral_pytorch`` (not a dependency: skipped where it is not installed) on the same batch."""
    coral = pytest.importorskip("coral_pytorch.losses")
    from coral_pytorch.dataset import levels_from_labelbatch

    task = _task(4)
    y = np.array([0, 1, 2, 3, 3, 0, 2])
    task.fit_fold(pd.DataFrame({"label": y}))
    logits = torch.tensor([[-1.3], [0.2], [0.9], [2.5], [-0.4], [0.0], [1.1]], dtype=torch.float64)
    loss = task.loss(logits, task.targets(pd.DataFrame({"label": y})))
    levels = levels_from_labelbatch(torch.as_tensor(y), 4).double()
    theirs = coral.coral_loss(logits - torch.as_tensor(task.thresholds), levels)
    assert float(loss) == pytest.approx(float(theirs), rel=1e-12)


def test_probabilities_are_rank_consistent_and_decided_by_hand():
    theta = np.array([-1.0, 0.0, 1.5])
    s = np.array([-3.0, -0.5, 0.2, 0.9, 4.0])
    prob = class_probabilities(s, theta)
    assert prob.shape == (5, 4) and (prob >= 0).all()
    np.testing.assert_allclose(prob.sum(1), 1.0)
    above = 1.0 / (1.0 + np.exp(-(s[:, None] - theta)))  # P(y > j)
    np.testing.assert_allclose(1.0 - np.cumsum(prob, 1)[:, :3], above)
    assert (np.diff(above, axis=1) <= 0).all()  # never cross
    assert decide(prob, "median").tolist() == (above > 0.5).sum(1).tolist() == [0, 1, 2, 2, 3]
    assert decide(prob, "mode").tolist() == prob.argmax(1).tolist()
    task = _task(4, decision="mode", thresholds="equal")
    np.testing.assert_allclose(task.thresholds, [-1.0, 0.0, 1.0])
    out = task.outputs(s[:, None])
    assert list(out.columns) == ["score", "prob_1", "prob_2", "prob_3", "prob_4", "pred"]
    assert out["pred"].tolist() == [task.classes[i] for i in out.iloc[:, 1:5].to_numpy().argmax(1)]


def test_qwk_equals_scikit_learns():
    rng = np.random.default_rng(0)
    for n, k in ((50, 4), (200, 6), (13, 3), (30, 5)):
        y = rng.integers(0, k, n)
        pred = np.clip(y + rng.integers(-2, 3, n), 0, k - 1)
        ref = cohen_kappa_score(y, pred, weights="quadratic", labels=np.arange(k))
        assert quadratic_weighted_kappa(y, pred, k) == pytest.approx(ref, abs=1e-12)
    # every grade present: the same as scikit-learn's default labels
    y, pred = np.array([0, 1, 2, 3, 2, 1]), np.array([0, 2, 2, 3, 1, 1])
    assert quadratic_weighted_kappa(y, pred, 4) == pytest.approx(
        cohen_kappa_score(y, pred, weights="quadratic")
    )
    assert np.isnan(quadratic_weighted_kappa(np.zeros(4, int), np.zeros(4, int), 3))  # undefined
    # the other metrics of the predicted grade and the probabilities
    prob = rng.dirichlet(np.ones(4), 60)
    y = rng.integers(0, 4, 60)
    p = decide(prob, "median")
    m = ordinal_metrics(y, prob, p)
    assert m["mae"] == pytest.approx(np.abs(p - y).mean())
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p))
    assert m["auc"] == pytest.approx(classification_auc(y, prob))
    assert m["qwk"] == pytest.approx(
        cohen_kappa_score(y, p, weights="quadratic", labels=np.arange(4))
    )


# ---- a run ----------------------------------------------------------------------------------


def test_a_runs_metrics_are_those_of_its_predictions(study):
    _, run_dir = study
    run = Run(run_dir)
    assert run.classes == ["1", "2", "3", "4"]
    for fold in run.folds:
        pred = run.predictions(fold)
        m = run.metrics(fold)["metrics"]
        y = pred["label_index"].to_numpy()
        p = pred["pred"].map(lambda v: run.classes.index(str(v))).to_numpy()
        assert m["qwk"] == pytest.approx(
            cohen_kappa_score(y, p, weights="quadratic", labels=np.arange(4))
        )
        assert m["mae"] == pytest.approx(np.abs(p - y).mean())
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p))
        assert m["confusion_matrix"] == confusion_matrix(y, p, labels=np.arange(4)).tolist()
        prob = pred[[f"prob_{c}" for c in run.classes]].to_numpy()
        np.testing.assert_allclose(prob.sum(1), 1.0, rtol=1e-6)
    summary = run.folder.summary()
    assert summary["task"] == "ordinal"
    for name in ("qwk", "mae", "auc", "balanced_accuracy"):
        lo, hi = summary["metrics"][name]["ci95_pooled"]
        assert lo <= hi
    report = (run_dir / "report.md").read_text()
    assert "ordinal grading of grade" in report and "CORAL" in report and "confusion.png" in report
    table = pd.read_csv(run_dir / "confusion.csv")
    assert table["grade"].astype(str).tolist() == run.classes
    assert int(table.iloc[:, 1:].to_numpy().sum()) == run.predictions()["bag_id"].nunique()


def test_thresholds_come_from_the_training_fold_and_folds_hold_every_grade(study):
    root, run_dir = study
    run = Run(run_dir)
    coh = Cohort.from_config(run.config)
    for k, split in enumerate(read_splits(run.folder.splits_dir, coh, 3)):
        state = read_checkpoint(run.folder.fold_file(k, MODEL))["task_state"]
        train = (
            coh.bags.set_index("bag_id").loc[coh.bags_of_slides(split.train), "label"].to_numpy(int)
        )
        counts = np.bincount(train, minlength=4) + 0.5
        cum = np.cumsum(counts)[:3] / counts.sum()
        np.testing.assert_allclose(state["thresholds"], np.log(cum / (1 - cum)))
        grades = coh.slides.set_index("slide_id").loc[split.test, "label"]
        assert set(grades) == {0, 1, 2, 3}  # stratified by grade


def test_predict_evaluate_refit_and_heatmap(study, tmp_path):
    root, run_dir = study
    run = Run(run_dir)
    saved = run.predictions(1)
    coh = Cohort.from_config(run.config)
    bags = {b: coh.bag_slides[b] for b in saved["bag_id"]}
    assert_predict_reproduces(run, 1, ["score"], bags, rtol=1e-4, atol=1e-6)
    again = run.predict(bags, folds=[1]).set_index("bag_id").loc[saved["bag_id"]]
    assert again["pred"].astype(str).tolist() == saved["pred"].astype(str).tolist()
    # the baseline: the linear cumulative-link model, on the same folds
    base = Run(run_dir / "baselines" / "meanpool_linear")
    assert {"score", "prob_1", "pred"} <= set(base.predictions().columns)
    assert (run_dir / "refit" / "model.pt").is_file()
    external = cohort(tmp_path, "external", 11, n_patients=20)
    for ev, metrics in evaluate_both_ways(run_dir, external, tmp_path / "ev"):
        assert len(ev) == 20 and np.allclose(ev[[f"prob_{g}" for g in range(1, 5)]].sum(1), 1.0)
        assert set(metrics) >= {"qwk", "mae", "auc"}
    # heatmaps: the tile's signed share of the score; --top-n ranks by the score
    top = run.top_slides(1)
    oof = run.predictions().sort_values(["score", "bag_id"], ascending=[False, True])
    assert top[0].startswith(oof["bag_id"].iloc[0] + "-S")
    assert run.scores(top[0]).attrs["kind"].startswith("contribution")
    assert main(["heatmap", str(run_dir), "--top-n", "1", "--out", str(tmp_path / "png")]) == 0
    assert len(list((tmp_path / "png").glob("*.png"))) == 1


def test_the_baseline_is_the_linear_cumulative_link_model(tmp_path):
    """``meanpool_linear`` on an ordinal task: the penalised cumulative-link model on the
    standardised mean-pooled training bags, refitted here independently (BFGS on the formula)."""
    data = cohort(tmp_path, "c", 8, n_patients=36)
    raw = config(tmp_path, data)
    raw["data"]["standardize"] = False
    raw["model"] = {"name": "meanpool_linear"}
    run_dir = run_cv(
        config_from_dict(raw),
        tmp_path / "lin",
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
    C = float(history.loc[history["best"], "C"].iloc[0])
    theta = np.asarray(read_checkpoint(run.folder.fold_file(0, MODEL))["task_state"]["thresholds"])
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
    z = (f_tr - mu) / sd
    y = coh.bags.set_index("bag_id").loc[train, "label"].to_numpy(int)

    def nll(v):
        s = z @ v[:-1] + v[-1]
        p = 1 / (1 + np.exp(-(s[:, None] - theta)))
        bits = y[:, None] > np.arange(len(theta))
        return -np.where(bits, np.log(p), np.log1p(-p)).sum() + v[:-1] @ v[:-1] / (2 * C)

    v = minimize(nll, np.zeros(z.shape[1] + 1), method="BFGS", options={"gtol": 1e-8}).x
    by_hand = ((f_te - mu) / sd) @ v[:-1] + v[-1]
    np.testing.assert_allclose(run.predictions(0)["score"], by_hand, rtol=1e-3, atol=2e-3)


def test_grades_need_an_order(tmp_path):
    data = cohort(tmp_path, "c", 6, n_patients=16)
    df = pd.read_csv(data["csv"])
    df["grade"] = df["grade"].map({1: "low", 2: "mid", 3: "high", 4: "high"})
    df.to_csv(data["csv"], index=False)
    with pytest.raises(DataError, match="list them lowest first in data.classes"):
        Cohort.from_config(config_from_dict(config(tmp_path, data)))
    ordered = config(tmp_path, {**data, "classes": ["low", "mid", "high"]})
    coh = Cohort.from_config(config_from_dict(ordered))
    assert coh.classes == ["low", "mid", "high"]
    splits = make_splits(coh, 3, 0.2, seed=0)
    assert len(splits) == 3


def test_options_are_checked():
    base = {"data": {"csv": "x.csv", "features": "f"}}
    with pytest.raises(ConfigError, match="task.thresholds = 'learned'; expected one of"):
        config_from_dict({**base, "task": {"type": "ordinal", "thresholds": "learned"}})
    with pytest.raises(ConfigError, match=r"unknown key 'task.class_weight' for task 'ordinal'"):
        config_from_dict({**base, "task": {"type": "ordinal", "class_weight": "balanced"}})
    cfg = config_from_dict({**base, "task": {"type": "ordinal"}})
    task = make_task(cfg, ["1", "2", "3"])
    assert task.n_out == 1 and task.headline() == "qwk"
    assert cfg.to_dict()["task"] == {
        "type": "ordinal",
        "thresholds": "marginal",
        "decision": "median",
    }


def test_ordinal_vs_nominal_benchmark_smoke(tmp_path):
    """benchmarks/ordinal_vs_nominal.py --smoke: each figure against scikit-learn on the two
    runs' pooled out-of-fold predictions (the same folds), the difference their difference."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import ordinal_vs_nominal

    row = ordinal_vs_nominal.main(["--out", str(tmp_path), "--smoke"]).iloc[0]
    runs = {k: tmp_path / "runs" / f"{k}_seed0" for k in ("ordinal", "classification")}
    preds = {
        k: pd.concat(
            pd.read_csv(p).assign(fold_dir=p.parent.name)
            for p in sorted(d.glob("fold_*/predictions.csv"))
        ).sort_values(["fold_dir", "bag_id"], ignore_index=True)
        for k, d in runs.items()
    }
    assert preds["ordinal"]["bag_id"].tolist() == preds["classification"]["bag_id"].tolist()
    for key, kind in (("ordinal", "ordinal"), ("nominal", "classification")):
        p = preds[kind]
        y, grade = p["label_index"].to_numpy(), p["pred"].astype(int).to_numpy() - 1
        prob = p[[f"prob_{g}" for g in range(1, 5)]].to_numpy()
        assert row[f"{key}_qwk"] == pytest.approx(
            cohen_kappa_score(y, grade, weights="quadratic", labels=np.arange(4))
        )
        assert row[f"{key}_mae"] == pytest.approx(np.abs(grade - y).mean())
        assert row[f"{key}_auc"] == pytest.approx(classification_auc(y, prob))
        assert row[f"{key}_balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, grade))
    for metric in ("qwk", "mae", "auc", "balanced_accuracy"):
        assert row[f"delta_{metric}"] == pytest.approx(
            row[f"ordinal_{metric}"] - row[f"nominal_{metric}"]
        )
        lo, hi = row[f"delta_{metric}_ci"]
        assert lo <= hi


def test_mil_compare_pits_the_ordinal_head_against_nominal_classes(tmp_path):
    """A compare entry with ``task: {type: classification}`` runs the grades as nominal classes
    on the same split files; the paired column scores both runs with the ordinal task: qwk
    of each run's predicted grade (scikit-learn's quadratic kappa on the saved predictions)."""
    from mil.compare import entries, run_compare

    raw = config(tmp_path, cohort(tmp_path, "cmp", 5, n_patients=36))
    raw["train"]["epochs"] = 3
    raw["compare"] = [
        {"model": dict(raw["model"]), "label": "ordinal"},
        {"model": dict(raw["model"]), "label": "nominal", "task": {"type": "classification"}},
    ]
    cfg = config_from_dict(raw)
    quiet = dict(progress=False, log=lambda *a: None, reference="ordinal", n_boot=50)
    table = run_compare(cfg, tmp_path / "cmp", **quiet)
    row = table.set_index("model").loc["nominal"]
    assert (
        yaml.safe_load((tmp_path / "cmp" / "nominal" / "config.yaml").read_text())["task"]["type"]
        == "classification"
    )

    def qwk(label: str) -> float:
        p = pd.concat(
            pd.read_csv(f)
            for f in sorted((tmp_path / "cmp" / label).glob("fold_*/predictions.csv"))
        )
        y, grade = p["label_index"].to_numpy(), p["pred"].astype(int).to_numpy() - 1
        return cohen_kappa_score(y, grade, weights="quadratic", labels=np.arange(4))

    assert row["qwk_pooled"] == pytest.approx(qwk("nominal"))
    assert row["delta"] == pytest.approx(qwk("nominal") - qwk("ordinal"))
    bad = config_from_dict({**raw, "compare": [{"model": raw["model"], "task": "classification"}]})
    with pytest.raises(ConfigError, match="task must be a task section"):
        entries(bad)
