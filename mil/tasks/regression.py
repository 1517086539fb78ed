"""Regression of a continuous target (an HRD score, tumour mutational burden, an expression
signature): one output, a training-fold target scaler, predictions on the target's own scale.

``task: {type: regression, loss: mse|huber|l1, target_scaling: standard|log|none, cutoff: X}``
with a numeric ``data.label_col``. The head predicts the *scaled* target (``standard``: z-scores
of the training fold's targets; ``log``: z-scores of their logarithm; ``none``: as they are);
the scaler is fitted on each training fold only, saved in ``model.pt`` (the task state) and
inverted for every prediction, so ``predictions.csv`` and the metrics are on the original
scale. Metrics: R², MAE, RMSE (scikit-learn), Pearson's and Spearman's r (scipy), and with a
cutoff the ROC AUC of the prediction for "target >= cutoff". Folds are stratified on target
quantiles; heatmaps draw the signed ``contribution`` (each tile's share of the prediction, on
the scaled target); ``--baseline`` fits ridge regression on the pooled bag vectors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from mil.data.targets import Targets, finite_numbers, no_missing, quantile_strata
from mil.errors import DataError
from mil.metrics import bootstrap_ci
from mil.metrics.regression import regression_metrics, residuals_by_group
from mil.models.base import DEFAULT_SCORE_KIND, SURVIVAL_SCORE_KIND
from mil.tasks.base import Artifacts, FoldTables, LinearHead, Task, TaskRun, as_tensor
from mil.tasks.registry import register

#: a target with fewer distinct values is refused (a class label, not a quantity)
MIN_DISTINCT = 3
#: ridge penalties of the closed-form baseline (on standardised bag vectors)
RIDGE_GRID = tuple(10.0**k for k in range(-2, 5))
#: columns of predictions.csv besides the ids
ID_COLUMNS = ("bag_id", "patient_id", "fold")


@dataclass
class RegressionOptions:
    """``loss`` on the scaled target (``huber``: delta 1, one training-fold sd under
    ``standard``); ``target_scaling``: what the head predicts; ``cutoff``: also report the AUC of
    the prediction for "target >= cutoff" (so a regression can be set beside a classifier
    trained at that cutoff)."""

    loss: Literal["mse", "huber", "l1"] = "mse"
    target_scaling: Literal["standard", "log", "none"] = "standard"
    cutoff: float | None = None

    def __post_init__(self) -> None:
        if self.cutoff is not None and not math.isfinite(self.cutoff):
            raise ValueError(f"task.cutoff must be a finite number, found {self.cutoff!r}")


class NumericTargets(Targets):
    """``target`` from the numeric ``data.label_col``: finite numbers (positive for ``log``
    scaling), at least :data:`MIN_DISTINCT` distinct values; folds stratified on its quartiles
    (then halves, then none)."""

    columns = ("target",)
    reserved = ("prediction",)

    def __init__(self, positive: bool = False) -> None:
        self.positive = positive

    def source_columns(self, data: Any) -> dict[str, str]:
        return {data.label_col: "label_col"}

    def read(self, df: pd.DataFrame, slide_ids: pd.Series, data: Any, source: str):
        col = data.label_col
        no_missing(df[col], slide_ids, col, source)
        y = finite_numbers(df[col], slide_ids, col, source, "finite numbers (a regression target)")
        if self.positive and (y <= 0).any():
            i = int(np.flatnonzero((y <= 0).to_numpy())[0])
            raise DataError(
                f"{source}: column {col!r} has {y.iloc[i]:g} (slide {slide_ids.iloc[i]}), but "
                "task.target_scaling: log needs positive targets; use standard or none"
            )
        n = y.nunique()
        if n < MIN_DISTINCT:
            raise DataError(
                f"{source}: column {col!r} has {n} distinct value(s) ({', '.join(map(str, sorted(y.unique())))}); "
                f"a regression target needs at least {MIN_DISTINCT}: for classes use task.type: classification"
            )
        return pd.DataFrame({"target": y.to_numpy(float)}, index=df.index), []

    def strata(self, slides: pd.DataFrame) -> list[tuple[str, np.ndarray]]:
        y = slides["target"]
        return [
            ("target quartile", quantile_strata(y, 4)),
            ("target half", quantile_strata(y, 2)),
            ("none", np.zeros(len(slides), dtype=int)),
        ]

    def counts(self, part: pd.DataFrame, classes: list[str]) -> pd.Series:
        y = part["target"].to_numpy(float)
        stats = (len(y), *(np.round([y.mean(), y.min(), y.max()], 6) if len(y) else [np.nan] * 3))
        return pd.Series(dict(zip(("slides", "target_mean", "target_min", "target_max"), stats)))

    def overview(self, df: pd.DataFrame, data: Any) -> str | None:
        y = pd.to_numeric(df.get(data.label_col), errors="coerce").dropna()
        if not len(y):
            return None
        return (
            f"target {data.label_col!r}: {len(y)} values, {y.nunique()} distinct, range "
            f"{y.min():.4g} to {y.max():.4g}, mean {y.mean():.4g}, sd {y.std():.4g}"
        )


@dataclass
class TargetScaler:
    """``scaled = (f(y) - center) / scale`` with ``f`` the log (``log``) or the identity."""

    kind: str = "none"
    center: float = 0.0
    scale: float = 1.0

    @classmethod
    def fit(cls, kind: str, y: np.ndarray) -> TargetScaler:
        """Fitted on the training fold's targets ``y`` (``none``: the identity)."""
        if kind == "none":
            return cls("none")
        v = np.log(y) if kind == "log" else np.asarray(y, float)
        sd = float(np.std(v))
        return cls(kind, float(np.mean(v)), sd if sd > 0 else 1.0)

    def transform(self, y: np.ndarray) -> np.ndarray:
        v = np.log(y) if self.kind == "log" else np.asarray(y, float)
        return (v - self.center) / self.scale

    def inverse(self, z: np.ndarray) -> np.ndarray:
        v = np.asarray(z, float) * self.scale + self.center
        return np.exp(np.clip(v, -700.0, 700.0)) if self.kind == "log" else v


@register("regression")
class RegressionTask(Task):
    """One output, the scaled target; ``loss`` (mse, huber, l1) on it (see the module)."""

    Options = RegressionOptions
    headline_metrics = ("r2", "pearson_r", "spearman_r")
    report_metrics = ("r2", "pearson_r", "spearman_r", "mae", "rmse", "auc")
    outcome_columns = ("target",)
    strata_description = "target quartile"
    figure_captions = {
        "pred_vs_true.png": "Out-of-fold predictions against the true targets (pooled; the line is y = x).",
        "residuals.png": "Out-of-fold residuals (prediction - target) by subgroup.",
    }
    # heatmaps: the tile's signed share of the prediction (scaled target)
    score_order = (SURVIVAL_SCORE_KIND, "attention_x_logit", DEFAULT_SCORE_KIND)
    linear_penalty = ("alpha", RIDGE_GRID)
    linear_words = "ridge regression (scikit-learn)"

    @classmethod
    def default_ensemble(cls, model: type, tables: bool = False) -> list[str]:
        """A slide model is averaged with ``meanpool_linear`` and ``bow_linear`` (ridge
        regressions fitted on the same training bags): on the synthetic cohort and the survival
        times of six TCGA cohorts' deaths the average was never below the model alone beyond
        the paired CI, and above it beyond the CI on the synthetic cohort and 8 of 12 real runs
        (docs/benchmarks.md, "Regression of continuous targets")."""
        slides_only = model.trained_by_gradient and not model.uses_tabular
        return ["meanpool_linear", "bow_linear"] if slides_only else []

    @classmethod
    def target_reader(cls, options: RegressionOptions) -> NumericTargets:
        return NumericTargets(positive=options.target_scaling == "log")

    def __init__(
        self, options: RegressionOptions, classes: list[str], run: TaskRun | None = None
    ) -> None:
        super().__init__(options, [], run)
        #: before a fold's state (fit_fold, load_fold_state) the head's outputs are read as they are
        self.scaler = TargetScaler()

    @property
    def n_out(self) -> int:
        return 1

    def fit_fold(self, train_bags: pd.DataFrame) -> None:
        """The target scaler, from the training bags' targets only."""
        self.scaler = TargetScaler.fit(
            self.options.target_scaling, train_bags["target"].to_numpy(float)
        )

    def state(self) -> dict[str, Any]:
        return {
            "target_scaling": self.scaler.kind,
            "center": self.scaler.center,
            "scale": self.scaler.scale,
        }

    def load_fold_state(self, state: dict[str, Any]) -> None:
        if "center" in state:
            self.scaler = TargetScaler(
                state["target_scaling"], float(state["center"]), float(state["scale"])
            )

    def targets(self, bags: pd.DataFrame) -> dict[str, Tensor]:
        return {
            "target": as_tensor(
                self.scaler.transform(bags["target"].to_numpy(float)), torch.float32
            )
        }

    def loss(self, logits: Tensor, targets: dict[str, Tensor]) -> Tensor:
        y = targets["target"].to(logits.device, logits.dtype)
        loss = {"mse": F.mse_loss, "huber": F.huber_loss, "l1": F.l1_loss}[self.options.loss]
        return loss(logits[:, 0], y)

    def constant_logits(self, train_bags: pd.DataFrame) -> np.ndarray:
        """The training bags' mean scaled target (their median for the l1 loss, its best constant)."""
        z = self.scaler.transform(train_bags["target"].to_numpy(float))
        return np.array([np.median(z) if self.options.loss == "l1" else np.mean(z)])

    def constant_predictions(self, pred: pd.DataFrame) -> str | None:
        p = pred["prediction"].to_numpy(float)
        spread = float(np.std(p)) if len(p) > 1 else 1.0
        if spread <= 1e-3 * max(float(pred["target"].std()), 1e-12):
            return f"the predictions vary by at most {spread:.3g} (sd) across test bags"
        return None

    # ---- predictions and metrics ------------------------------------------------------------

    def outputs(self, logits: np.ndarray) -> pd.DataFrame:
        """``prediction``: the head's output on the target's own scale."""
        return pd.DataFrame({"prediction": self.scaler.inverse(np.asarray(logits, float)[:, 0])})

    def output_columns(self) -> list[str]:
        return ["prediction"]

    def row_targets(self, bags: pd.DataFrame) -> dict[str, Any]:
        """``fold`` and ``target``; the rows go on with ``prediction``."""
        return {"fold": self.fold_name, "target": bags["target"].to_numpy(float)}

    def averaging_words(self) -> str:
        return "predictions averaged on the target's scale"

    def patient_predictions(self, pred: pd.DataFrame) -> pd.DataFrame:
        """Patient-level predictions: the mean prediction over a patient's bags."""
        g = pred.groupby("patient_id", sort=False)
        out = g[["fold", "target"]].first().reset_index()
        out["prediction"] = g["prediction"].mean().to_numpy()
        out["n_bags"] = g.size().to_numpy()
        return out

    def _metrics(self, y: np.ndarray, p: np.ndarray) -> dict[str, float]:
        return regression_metrics(y, p, self.options.cutoff)

    def metrics(self, pred: pd.DataFrame, train_pred: pd.DataFrame | None = None) -> dict[str, Any]:
        return self.pooled_metrics(pred)

    def pooled_metrics(self, pred: pd.DataFrame) -> dict[str, float]:
        return self._metrics(pred["target"].to_numpy(float), pred["prediction"].to_numpy(float))

    def pooled_ci(
        self, pred: pd.DataFrame, n_boot: int = 1000, seed: int = 0
    ) -> dict[str, tuple[float, float]]:
        """Bootstrap 95% CIs resampling whole patients."""
        y, p = pred["target"].to_numpy(float), pred["prediction"].to_numpy(float)
        groups = pred["patient_id"].astype(str).to_numpy()
        return bootstrap_ci(self._metrics, y, p, n_boot=n_boot, seed=seed, groups=groups)

    def counts(self, pred: pd.DataFrame) -> dict[str, int]:
        cutoff = self.options.cutoff
        return {} if cutoff is None else {"n_above_cutoff": int((pred["target"] >= cutoff).sum())}

    def outcome_strata(self, pred: pd.DataFrame) -> np.ndarray:
        return quantile_strata(pred["target"], 4)

    def score_column(self) -> str:
        return "prediction"

    def describe(self, row: pd.Series) -> str:
        return (
            f"target {row['target']:.3g}, predicted {row['prediction']:.3g}"
            if "prediction" in row
            else ""
        )

    def thin_outcome(self, pred: pd.DataFrame) -> str | None:
        if pred["target"].nunique() >= MIN_DISTINCT:
            return None
        return (
            f"the external cohort's targets take {pred['target'].nunique()} value(s); R² and the "
            "correlations are undefined (null) or say little"
        )

    # ---- the closed-form baseline and instance scores ------------------------------------------

    def fit_linear(
        self, z: np.ndarray, bags: pd.DataFrame, penalty: float, seed: int
    ) -> LinearHead:
        """Ridge regression (scikit-learn) of the scaled target."""
        from sklearn.linear_model import Ridge

        ridge = Ridge(alpha=penalty).fit(z, self.scaler.transform(bags["target"].to_numpy(float)))
        return ridge.coef_[None, :], np.array([ridge.intercept_]), None

    # ---- files beside the predictions, and the report -----------------------------------------

    def summary_artifacts(self, folds: FoldTables) -> tuple[dict[str, Any], Artifacts]:
        """``pred_vs_true.png`` of the pooled out-of-fold predictions (first repeat) and
        ``residuals.png`` by each subgroup column the predictions carry."""
        preds = folds("predictions.csv")
        if not preds:
            return {}, {}
        pooled = pd.concat([p.assign(fold=k) for k, p in preds.items()], ignore_index=True)
        title = f"{self.run.name}: {len(pooled)} out-of-fold predictions, {len(preds)} folds"
        label = self.run.columns.get("target", "target")
        artifacts: Artifacts = {"pred_vs_true.png": _scatter(pooled, title, label)}
        groups = [c for c in pooled.columns if c not in (*ID_COLUMNS, "target", "prediction")]
        groups = [c for c in groups if 1 < pooled[c].nunique() <= 30]
        if groups:
            artifacts["residuals.png"] = _residuals(pooled, groups, f"{self.run.name}: residuals")
        return {}, artifacts

    def title(self) -> str:
        return f"regression of {self.run.columns.get('target', 'a continuous target')} ({self.run.bag_level} bags)"

    def methods(self) -> str:
        o = self.options
        scaling = {
            "standard": "standardised with the training fold's mean and sd",
            "log": "log-transformed and standardised with the training fold's mean and sd",
            "none": "as it is",
        }[o.target_scaling]
        loss = {
            "mse": "mean squared error",
            "huber": "Huber loss (delta 1)",
            "l1": "mean absolute error",
        }[o.loss]
        cut = (
            f"; ROC AUC of the prediction for target >= {o.cutoff:g}"
            if o.cutoff is not None
            else ""
        )
        return (
            f"Loss: {loss} on the target {scaling} (the scaler fitted on each training fold only, "
            "predictions mapped back to the original scale). Metrics: R², mean absolute error and "
            f"root mean squared error (scikit-learn), Pearson's and Spearman's r (scipy){cut}."
        )


def _scatter(pooled: pd.DataFrame, title: str, label: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.8, 4.6), dpi=120)
    ax = fig.subplots()
    for i, (fold, g) in enumerate(pooled.groupby("fold", sort=False)):
        ax.scatter(
            g["target"], g["prediction"], s=12, alpha=0.7, color=f"C{i % 10}", label=f"fold {fold}"
        )
    lo = float(np.nanmin(pooled[["target", "prediction"]].to_numpy()))
    hi = float(np.nanmax(pooled[["target", "prediction"]].to_numpy()))
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
    m = regression_metrics(pooled["target"].to_numpy(float), pooled["prediction"].to_numpy(float))
    ax.set_xlabel(f"true {label}")
    ax.set_ylabel(f"predicted {label}")
    ax.set_title(f"{title}\npooled R² {m['r2']:.3f}, Pearson r {m['pearson_r']:.3f}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def _residuals(pooled: pd.DataFrame, groups: list[str], title: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(groups), 3.8), dpi=120)
    axes = np.atleast_1d(fig.subplots(1, len(groups)))
    for ax, col in zip(axes, groups):
        parts = residuals_by_group(pooled["target"], pooled["prediction"], pooled[col].to_numpy())
        ax.boxplot(
            list(parts.values()), tick_labels=[f"{k}\n(n={len(v)})" for k, v in parts.items()]
        )
        ax.axhline(0.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel(col)
        ax.set_ylabel("prediction - target")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
