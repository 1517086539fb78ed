"""A new task is one file: a ``Task`` subclass under ``@register``. Nothing in the runner,
summary, report or ``mil.Run`` changes; this one (a single-logit binary classifier with a
Brier score) runs through all of them."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn import metrics as skm

from mil.config import config_from_dict
from mil.metrics import bootstrap_ci
from mil.run import Run
from mil.tasks import Task, register
from mil.tasks.base import as_tensor
from mil.train.runner import run_cv
from tests.conftest import small_config


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

    def predictions(self, bags: pd.DataFrame, logits: np.ndarray) -> pd.DataFrame:
        out = pd.DataFrame({"bag_id": bags["bag_id"].values, "patient_id": bags["patient_id"].values})
        out["label_index"] = bags["label"].to_numpy(int)
        return pd.concat([out, self.outputs(logits)], axis=1)

    def _p(self, pred: pd.DataFrame) -> np.ndarray:
        return pred[f"prob_{self.classes[-1]}"].to_numpy(float)

    def metrics(self, pred: pd.DataFrame, train_pred=None) -> dict[str, Any]:
        return _scores(pred["label_index"].to_numpy(int), self._p(pred))

    def pooled_metrics(self, pred: pd.DataFrame) -> dict[str, float]:
        return self.metrics(pred)

    def pooled_ci(self, pred, n_boot=1000, seed=0):
        y = pred["label_index"].to_numpy(int)
        return bootstrap_ci(_scores, y, self._p(pred), n_boot=n_boot, seed=seed,
                            groups=pred["patient_id"].to_numpy())  # fmt: skip

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
    assert cfg.task.target_kind == "label"
    run_dir = run_cv(cfg, tmp_path / "run", progress=False, log=lambda *a: None, n_boot=50)
    run = Run(run_dir)
    assert run.folds == ["0", "1", "2"] and run.classes == ["negative", "positive"]
    # fold metrics are the task's, against scikit-learn on the saved predictions
    for fold in run.folds:
        pred = run.predictions(fold)
        m = run.metrics(fold)["metrics"]
        assert np.isclose(m["auc"], skm.roc_auc_score(pred["label_index"], pred["prob_positive"]))
        assert np.isclose(m["brier"], skm.brier_score_loss(pred["label_index"], pred["prob_positive"]))
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
