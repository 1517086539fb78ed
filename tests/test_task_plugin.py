"""A new task is one file: a ``Task`` subclass under ``@register``. Nothing in the runner,
summary, report or ``mil.Run`` changes; a single-logit binary classifier with a Brier score
runs through all of them, and a Poisson regression of counts (a new kind of target, read from
a column its own option names) through ``mil train --baseline --refit``, ``mil evaluate``,
``mil heatmap`` and ``Run.predict``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from scipy.stats import spearmanr
from sklearn import metrics as skm

from mil.config import config_from_dict
from mil.data.synthetic import write_synthetic_cohort
from mil.data.targets import Targets, finite_numbers
from mil.errors import ConfigError, DataError
from mil.metrics import bootstrap_ci
from mil.run import Run
from mil.tasks import Task, register
from mil.tasks.base import as_tensor
from mil.tasks.targets import LabelTargets
from mil.train.runner import run_cv
from tests.conftest import assert_predict_reproduces, evaluate_both_ways, small_config


def _scores(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    auc = skm.roc_auc_score(y, p) if len(np.unique(y)) == 2 else float("nan")
    return {"auc": float(auc), "brier": float(skm.brier_score_loss(y, p))}


@register("binary_logit")
class BinaryLogitTask(Task):
    """One logit per bag, binary cross-entropy; the positive class is the last."""

    headline_metrics = ("auc",)
    report_metrics = ("auc", "brier")
    outcome_columns = ("label_index",)

    @property
    def n_out(self) -> int:
        return 1

    def targets(self, bags: pd.DataFrame) -> dict[str, torch.Tensor]:
        return {"label": as_tensor(bags["label"].to_numpy(float), torch.float32)}

    def loss(self, logits, targets):
        return F.binary_cross_entropy_with_logits(logits[:, 0], targets["label"].to(logits.device))

    def outputs(self, logits: np.ndarray) -> pd.DataFrame:
        p = 1.0 / (1.0 + np.exp(-np.asarray(logits, float)[:, 0]))
        return pd.DataFrame({f"prob_{self.classes[-1]}": p})

    def row_targets(self, bags: pd.DataFrame) -> dict[str, Any]:
        return {"label_index": bags["label"].to_numpy(int)}

    def _p(self, pred: pd.DataFrame) -> np.ndarray:
        return pred[f"prob_{self.classes[-1]}"].to_numpy(float)

    def metrics(self, pred: pd.DataFrame, train_pred=None) -> dict[str, Any]:
        return _scores(pred["label_index"].to_numpy(int), self._p(pred))

    def pooled_metrics(self, pred: pd.DataFrame) -> dict[str, float]:
        return self.metrics(pred)

    def pooled_ci(self, pred, n_boot=1000, seed=0):
        y = pred["label_index"].to_numpy(int)
        return bootstrap_ci(
            _scores,
            y,
            self._p(pred),
            n_boot=n_boot,
            seed=seed,
            groups=pred["patient_id"].to_numpy(),
        )

    def score_column(self) -> str:
        return f"prob_{self.classes[-1]}"

    def title(self) -> str:
        return "binary classification with one logit"

    def methods(self) -> str:
        return "Loss: binary cross-entropy of one logit. Metrics: ROC AUC and the Brier score."


def test_a_registered_task_runs_through_runner_summary_report_and_run(tmp_path):
    raw = small_config(tmp_path, epochs=2)
    raw["task"] = {"type": "binary_logit"}
    cfg = config_from_dict(raw)
    assert isinstance(cfg.task.targets, LabelTargets)  # a task reads class labels by default
    run_dir = run_cv(cfg, tmp_path / "run", progress=False, log=lambda *a: None, n_boot=50)
    run = Run(run_dir)
    assert run.folds == ["0", "1", "2"] and run.classes == ["negative", "positive"]
    # fold metrics are the task's, against scikit-learn on the saved predictions
    for fold in run.folds:
        pred = run.predictions(fold)
        m = run.metrics(fold)["metrics"]
        assert np.isclose(m["auc"], skm.roc_auc_score(pred["label_index"], pred["prob_positive"]))
        assert np.isclose(
            m["brier"], skm.brier_score_loss(pred["label_index"], pred["prob_positive"])
        )
    summary = run.folder.summary()
    assert summary["task"] == "binary_logit" and set(summary["metrics"]) >= {"auc", "brier"}
    lo, hi = summary["metrics"]["auc"]["ci95_pooled"]
    assert 0 <= lo <= hi <= 1
    report = (run_dir / "report.md").read_text()
    assert "binary classification with one logit" in report and "Brier score" in report
    # a saved fold model reproduces its test predictions through the task's outputs
    saved = run.predictions(1)
    again = run.predict(saved["bag_id"].tolist(), folds=[1])
    np.testing.assert_allclose(again["prob_positive"], saved["prob_positive"], rtol=1e-5)
    # heatmaps' --top-n ranks by the task's score column
    oof = run.predictions().sort_values(["prob_positive", "bag_id"], ascending=[False, True])
    assert run.top_slides(3) == oof["bag_id"].head(3).tolist()


# ---- a task with a new kind of target: counts, read from a column the task's own option names ----


class CountTargets(Targets):
    """``count`` (a non-negative whole number) from the column ``task.count_col`` names; folds
    stratified on none / some."""

    columns = ("count",)
    reserved = ("rate",)

    def __init__(self, count_col: str) -> None:
        self.count_col = count_col

    def source_columns(self, data) -> dict[str, str]:
        return {self.count_col: "task.count_col"}

    def read(self, df, slide_ids, data, source):
        y = finite_numbers(df[self.count_col], slide_ids, self.count_col, source, "counts")
        bad = (y < 0) | (y != np.round(y))
        if bad.any():
            raise DataError(f"{source}: slide {slide_ids[bad.to_numpy()].iloc[0]}: not a count")
        return pd.DataFrame({"count": y.to_numpy(float)}, index=df.index), []

    def strata(self, slides):
        return [("some", (slides["count"].to_numpy() > 0).astype(int))]


def _count_scores(y: np.ndarray, rate: np.ndarray) -> dict[str, float]:
    return {
        "spearman_r": float(spearmanr(y, rate)[0]) if np.ptp(y) > 0 else float("nan"),
        "deviance": float(skm.mean_poisson_deviance(y, rate)),
    }


@dataclass
class CountOptions:
    count_col: str = "count"
    max_rate: float = 1e4

    def __post_init__(self) -> None:
        if not self.max_rate > 0:
            raise ValueError("task.max_rate must be positive")


@register("poisson_count")
class PoissonCountTask(Task):
    """Poisson regression of a count: one output, the log-rate; options of its own."""

    Options = CountOptions
    headline_metrics = ("spearman_r",)
    report_metrics = ("spearman_r", "deviance")
    outcome_columns = ("count",)
    score_order = ("contribution", "instance_logits")
    linear_penalty = ("alpha", (0.01, 1.0))

    @classmethod
    def target_reader(cls, options: CountOptions) -> CountTargets:
        return CountTargets(options.count_col)

    @property
    def n_out(self) -> int:
        return 1

    def targets(self, bags):
        return {"count": as_tensor(bags["count"].to_numpy(float), torch.float32)}

    def loss(self, logits, targets):
        return F.poisson_nll_loss(logits[:, 0], targets["count"].to(logits.device), log_input=True)

    def outputs(self, logits):
        rate = np.exp(np.clip(np.asarray(logits, float)[:, 0], None, np.log(self.options.max_rate)))
        return pd.DataFrame({"rate": rate})

    def row_targets(self, bags):
        return {"count": bags["count"].to_numpy(float)}

    def metrics(self, pred, train_pred=None):
        return _count_scores(pred["count"].to_numpy(float), pred["rate"].to_numpy(float))

    def pooled_metrics(self, pred):
        return self.metrics(pred)

    def pooled_ci(self, pred, n_boot=1000, seed=0):
        return bootstrap_ci(
            _count_scores,
            pred["count"].to_numpy(float),
            pred["rate"].to_numpy(float),
            n_boot=n_boot,
            seed=seed,
            groups=pred["patient_id"].to_numpy(),
        )

    def fit_linear(self, z, bags, penalty, seed):
        from sklearn.linear_model import PoissonRegressor

        fit = PoissonRegressor(alpha=penalty, max_iter=1000).fit(z, bags["count"].to_numpy(float))
        return fit.coef_[None, :], np.array([fit.intercept_]), None

    def score_column(self) -> str:
        return "rate"

    def describe(self, row) -> str:
        return f"count {row['count']:.0f}, rate {row['rate']:.2f}"

    def title(self) -> str:
        return "Poisson regression of witness counts"


def _count_cohort(root: Path, seed: int) -> dict:
    """A small synthetic cohort with ``n_witness``: each slide's number of planted tiles / 4."""
    csv, feats = root / "cohort.csv", root / "features"
    df = write_synthetic_cohort(
        "classification",
        csv,
        feats,
        seed=seed,
        n_patients=24,
        n_two_slides=4,
        dim=16,
        min_tiles=20,
        max_tiles=60,
        shift_norm=6.0,
    )
    counts = []
    for sid in df["slide_id"]:
        with h5py.File(feats / f"{sid}.h5", "r") as f:
            counts.append(int(f["instance_label"][()].sum()) // 4)
    df.drop(columns="label").assign(n_witness=counts).to_csv(csv, index=False)
    return {"csv": str(csv), "features": str(feats), "patient_col": "case_id"}


def test_a_task_with_a_new_kind_of_target_runs_through_train_evaluate_heatmap_and_predict(tmp_path):
    """One file (this one) adds a task that reads counts from a column its own option names:
    ``mil train --baseline --refit``, ``mil evaluate``, ``mil heatmap`` and ``Run.predict``
    run it, with nothing edited elsewhere."""
    from mil.cli import main

    data = _count_cohort(tmp_path / "own", seed=3)
    raw = {
        "name": "counts",
        "task": {"type": "poisson_count", "count_col": "n_witness"},
        "data": data,
        "splits": {"dir": str(tmp_path / "splits"), "folds": 3, "val_fraction": 0.2},
        "model": {"name": "abmil_additive", "hidden_dim": 16},
        "train": {"epochs": 2, "batch_size": 8, "threads": 1},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "run"
    argv = ["train", str(tmp_path / "cfg.yaml"), "--out", str(run_dir), "--quiet"]
    assert main([*argv, "--baseline", "meanpool_linear", "--refit"]) == 0
    run = Run(run_dir)
    summary = run.folder.summary()
    assert summary["task"] == "poisson_count" and set(summary["metrics"]) >= {
        "spearman_r",
        "deviance",
    }
    pred = run.predictions()
    assert set(pred["count"]) == set(pd.read_csv(data["csv"])["n_witness"].astype(float))
    # the fold metrics are the task's, against scikit-learn / scipy on the saved predictions
    for fold in run.folds:
        p = run.predictions(fold)
        m = run.metrics(fold)["metrics"]
        assert np.isclose(m["deviance"], skm.mean_poisson_deviance(p["count"], p["rate"]))
    # the baseline, fitted in closed form by the task's own estimator (Poisson regression)
    base = Run(run_dir / "baselines" / "meanpool_linear")
    assert set(base.predictions().columns) >= {"count", "rate"}
    assert (run_dir / "baselines.csv").is_file() and (run_dir / "refit" / "model.pt").is_file()
    # a saved fold model reproduces its test predictions
    saved = run.predictions(0)
    assert_predict_reproduces(run, 0, ["rate"], rtol=1e-4)
    # heatmaps: --top-n ranks by the task's score column, the default kind is the task's
    assert main(["heatmap", str(run_dir), "--top-n", "2", "--out", str(tmp_path / "png")]) == 0
    assert len(list((tmp_path / "png").glob("*.png"))) == 2
    assert run.scores(saved["bag_id"].iloc[0]).attrs["kind"].startswith("contribution")
    # an external cohort: the fold ensemble's rates, and the refit's
    external = _count_cohort(tmp_path / "ext", seed=11)
    for ev, _ in evaluate_both_ways(run_dir, external, tmp_path / "ev"):
        assert len(ev) == 28 and (ev["rate"] > 0).all()
    # the task's options are typed and checked like a config section
    with pytest.raises(ConfigError, match="task.max_rate must be positive"):
        config_from_dict({**raw, "task": {"type": "poisson_count", "max_rate": -1}})
    with pytest.raises(
        ConfigError, match=r"unknown key 'task.count_column' for task 'poisson_count'"
    ):
        config_from_dict({**raw, "task": {"type": "poisson_count", "count_column": "n"}})
