r"""Ordinal grading (Gleason/ISUP grade group, tumour grade, fibrosis stage): a cumulative-link
head, one shared score per bag and :math:`k-1` ordered thresholds.

``task: {type: ordinal, thresholds: marginal|equal, decision: median|mode}`` with grades in the
order of ``data.classes`` (lowest first) or, without it, of the numeric labels (text labels
without ``data.classes`` are refused: their order is unknown). The model's head has one output,
the bag's score :math:`s`; with the fold's thresholds :math:`\theta_1 < \dots < \theta_{k-1}`

.. math::  P(y > j) = \sigma(s - \theta_j), \qquad
           P(y = j) = P(y > j - 1) - P(y > j),

so the class probabilities are non-negative and the cumulative ones never cross (CORAL's rank
consistency, Cao, Mirjalili & Raschka 2020). The loss is CORAL's: the binary cross-entropy of
each of the :math:`k-1` cumulative bits :math:`[y > j]` on its logit :math:`s - \theta_j`, summed
over the bits and averaged over the bags (``coral_pytorch.losses.coral_loss`` of those logits).

**The thresholds are fitted per fold, not by gradient.** ``marginal`` (default): the training
fold's cumulative class log-odds, :math:`\theta_j = \operatorname{logit} \hat P(y \le j)` (class
counts + 0.5), the optimum of a model that knows nothing of the bag (``s = 0``); ``equal``:
spaced 1 apart, centred on 0. The model's own bias moves every threshold at once and the scale of
its score spreads them, so for three grades the head is CORAL's in full; with more grades the
ratios of the gaps stay those the option sets. (A model's head holds only outputs of the bag, so
thresholds learned beside the score would need parameters outside the model.) They are saved in ``model.pt`` (the task state) and every prediction reads them.

Predictions: ``score`` (:math:`s`), ``prob_<grade>`` and ``pred``, the median grade
(:math:`\sum_j [P(y > j) > 0.5]`, CORAL's rule; ``decision: mode``: the most probable grade).
Metrics: ``qwk`` (quadratic weighted kappa, scikit-learn's ``cohen_kappa_score(weights=
"quadratic")`` over all k grades), ``mae`` in grades, macro one-vs-rest ``auc`` of the class
probabilities, ``balanced_accuracy`` and ``accuracy`` of ``pred``, each with a patient-bootstrap
CI. Folds are stratified by grade. The instance score is the tile's signed share of :math:`s`
(``contribution``); ``--baseline`` fits the same cumulative-link model, linear in the pooled bag
vector, with an L2 penalty (scipy's L-BFGS).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from mil.data.targets import label_str
from mil.errors import DataError
from mil.metrics import bootstrap_ci
from mil.models.base import DEFAULT_SCORE_KIND, SURVIVAL_SCORE_KIND
from mil.tasks.base import Artifacts, FoldTables, LinearHead, Task, TaskRun, as_tensor
from mil.tasks.linear_fits import C_GRID
from mil.tasks.ordinal_metrics import (
    class_probabilities,
    confusion_figure,
    coral_loss,
    decide,
    equal_thresholds,
    ordinal_metrics,
    quadratic_weighted_kappa,
)
from mil.tasks.registry import register
from mil.tasks.targets import LabelTargets, label_columns


@dataclass
class OrdinalOptions:
    """``thresholds``: the fold's cut-points on the shared score (``marginal``: the training
    fold's cumulative class log-odds; ``equal``: 1 apart); ``decision``: the predicted grade,
    ``median`` (CORAL's count of P(y > j) > 0.5) or ``mode`` (the most probable grade)."""

    thresholds: Literal["marginal", "equal"] = "marginal"
    decision: Literal["median", "mode"] = "median"


class GradeTargets(LabelTargets):
    """``label``: the grade's index, lowest first, in the order of ``data.classes`` or of the
    numeric labels; folds stratified on the grade."""

    reserved = ("label_index", "prob_", "score")

    def read(self, df: pd.DataFrame, slide_ids: pd.Series, data: Any, source: str):
        frame, classes = super().read(df, slide_ids, data, source)
        if data.classes is None and not _numeric(classes):
            raise DataError(
                f"{source}: column {data.label_col!r} holds grades {classes[:6]} that are not numbers, "
                "so their order is unknown: list them lowest first in data.classes"
            )
        return frame, classes


def _numeric(names: list[str]) -> bool:
    try:
        [float(n) for n in names]
    except ValueError:
        return False
    return True


@register("ordinal")
class OrdinalTask(Task):
    """One shared score and the fold's ordered thresholds; CORAL's loss (see the module)."""

    Options = OrdinalOptions
    headline_metrics = ("qwk", "auc")
    report_metrics = ("qwk", "mae", "auc", "balanced_accuracy", "accuracy")
    outcome_columns = ("label_index",)
    strata_description = "grade"
    figure_captions = {"confusion.png": "Pooled out-of-fold confusion matrix (rows: true grade)."}
    # heatmaps: the tile's signed share of the shared score
    score_order = (SURVIVAL_SCORE_KIND, "attention_x_logit", DEFAULT_SCORE_KIND)
    linear_penalty = ("C", C_GRID)
    linear_words = (
        "an L2-penalised linear cumulative-link model on the fold's thresholds (scipy L-BFGS)"
    )

    @classmethod
    def target_reader(cls, options: OrdinalOptions) -> GradeTargets:
        return GradeTargets()

    def __init__(
        self, options: OrdinalOptions, classes: list[str], run: TaskRun | None = None
    ) -> None:
        super().__init__(options, classes, run)
        #: before a fold's state (fit_fold, load_fold_state): equally spaced
        self.thresholds = equal_thresholds(max(len(self.classes), 2))

    @property
    def k(self) -> int:
        return len(self.classes)

    @property
    def n_out(self) -> int:
        return 1

    def fit_fold(self, train_bags: pd.DataFrame) -> None:
        """The thresholds, from the training bags' grades only."""
        if self.options.thresholds == "equal":
            self.thresholds = equal_thresholds(self.k)
            return
        counts = np.bincount(train_bags["label"].to_numpy(int), minlength=self.k) + 0.5
        cum = np.cumsum(counts)[:-1] / counts.sum()
        self.thresholds = np.log(cum / (1.0 - cum))

    def state(self) -> dict[str, Any]:
        return {"thresholds": [float(t) for t in self.thresholds]}

    def load_fold_state(self, state: dict[str, Any]) -> None:
        if "thresholds" in state:
            self.thresholds = np.asarray(state["thresholds"], float)

    def balance_groups(self, bags: pd.DataFrame) -> np.ndarray | None:
        """The grade: what ``train.sampler: balanced`` balances (a hook of the imbalance work;
        unused where the runner has no such sampler)."""
        return bags["label"].to_numpy(int)

    def targets(self, bags: pd.DataFrame) -> dict[str, Tensor]:
        return {"label": as_tensor(bags["label"].to_numpy(int), torch.long)}

    def cumulative_logits(self, logits: Tensor) -> Tensor:
        """``[B, k-1]``: :math:`s - \\theta_j` of head outputs ``[B, 1]``."""
        theta = torch.as_tensor(self.thresholds, dtype=logits.dtype, device=logits.device)
        return logits[:, :1] - theta

    def loss(self, logits: Tensor, targets: dict[str, Tensor]) -> Tensor:
        return coral_loss(self.cumulative_logits(logits), targets["label"].to(logits.device))

    def constant_logits(self, train_bags: pd.DataFrame) -> np.ndarray:
        """The one score of least loss on the training bags' grades (0 for ``marginal``)."""
        from scipy.optimize import minimize_scalar

        y = torch.as_tensor(train_bags["label"].to_numpy(int))
        best = minimize_scalar(
            lambda s: float(
                self.loss(torch.full((len(y), 1), float(s), dtype=torch.float64), {"label": y})
            ),
            bounds=(-50.0, 50.0),
            method="bounded",
            options={"xatol": 1e-8},
        )
        return np.array([best.x])

    def constant_predictions(self, pred: pd.DataFrame) -> str | None:
        present = np.unique(pred["label_index"].to_numpy(int))
        predicted = np.unique(self._pred_index(pred))
        if len(present) > 1 and len(predicted) == 1:
            return f"every test bag was predicted grade {self.classes[int(predicted[0])]!r}"
        s = pred["score"].to_numpy(float)
        if len(s) > 1 and float(np.std(s)) < 1e-3:
            return f"the scores vary by at most {float(np.std(s)):.3g} (sd) across test bags"
        return None

    # ---- predictions and metrics ------------------------------------------------------------

    def outputs(self, logits: np.ndarray) -> pd.DataFrame:
        """``score`` (the shared score), ``prob_<grade>`` and ``pred`` (the decided grade)."""
        score = np.asarray(logits, float)[:, 0]
        prob = class_probabilities(score, self.thresholds)
        out = pd.DataFrame({"score": score})
        for i, c in enumerate(self.classes):
            out[f"prob_{c}"] = prob[:, i]
        out["pred"] = self._names(decide(prob, self.options.decision))
        return out

    def row_targets(self, bags: pd.DataFrame) -> dict[str, Any]:
        """``label`` (the grade's name) and ``label_index``; the rows go on with ``score``,
        ``prob_<grade>...`` and ``pred``."""
        return label_columns(self.classes, bags)

    def _names(self, index: np.ndarray) -> list[str]:
        return [self.classes[int(i)] for i in index]

    def _prob(self, pred: pd.DataFrame) -> np.ndarray:
        return pred[[f"prob_{c}" for c in self.classes]].to_numpy(float)

    def _pred_index(self, pred: pd.DataFrame) -> np.ndarray:
        """The grade index of column ``pred`` (a number read back from a CSV is its name), or
        the task's decision where a table has no ``pred``."""
        if "pred" not in pred:
            return decide(self._prob(pred), self.options.decision)
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index[label_str(v)] for v in pred["pred"]], dtype=int)

    def _redecide(self, out: pd.DataFrame) -> pd.DataFrame:
        out["pred"] = self._names(decide(self._prob(out), self.options.decision))
        return out

    def mean_outputs(self, rows: pd.DataFrame, by: str) -> pd.DataFrame:
        """Scores and probabilities averaged within ``by``; ``pred`` decided from the means."""
        return self._redecide(super().mean_outputs(rows, by))

    def averaging_words(self) -> str:
        return "scores and grade probabilities averaged, the grade decided from the averages"

    def average_predictions(self, members: list[pd.DataFrame], scales=None) -> pd.DataFrame:
        return self._redecide(super().average_predictions(members, scales))

    def patient_predictions(self, pred: pd.DataFrame) -> pd.DataFrame:
        """Patient level: scores and grade probabilities averaged over a patient's bags."""
        cols = ["score", *(f"prob_{c}" for c in self.classes)]
        g = pred.groupby("patient_id", sort=False)
        out = g[["label", "label_index"]].first().reset_index()
        out[cols] = g[cols].mean().to_numpy()
        out["n_bags"] = g.size().to_numpy()
        return self._redecide(out)

    def _arrays(self, pred: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return pred["label_index"].to_numpy(int), self._prob(pred), self._pred_index(pred)

    def metrics(self, pred: pd.DataFrame, train_pred: pd.DataFrame | None = None) -> dict[str, Any]:
        from sklearn.metrics import confusion_matrix

        out: dict[str, Any] = self.pooled_metrics(pred)
        y, _, p = self._arrays(pred)
        out["confusion_matrix"] = confusion_matrix(y, p, labels=np.arange(self.k)).tolist()
        return out

    def pooled_metrics(self, pred: pd.DataFrame) -> dict[str, float]:
        return ordinal_metrics(*self._arrays(pred))

    def metric_value(self, pred: pd.DataFrame, name: str) -> float:
        if name != "qwk":
            return super().metric_value(pred, name)
        y, _, p = self._arrays(pred)
        return quadratic_weighted_kappa(y, p, self.k)

    def pooled_ci(
        self, pred: pd.DataFrame, n_boot: int = 1000, seed: int = 0
    ) -> dict[str, tuple[float, float]]:
        """Bootstrap 95% CIs resampling whole patients."""
        groups = pred["patient_id"].astype(str).to_numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return bootstrap_ci(
                ordinal_metrics, *self._arrays(pred), n_boot=n_boot, seed=seed, groups=groups
            )

    def counts(self, pred: pd.DataFrame) -> dict[str, int]:
        y = pred["label_index"].to_numpy(int)
        return {f"n_{c}": int((y == i).sum()) for i, c in enumerate(self.classes)}

    def outcome_strata(self, pred: pd.DataFrame) -> np.ndarray:
        return pred["label_index"].to_numpy(int)

    def positive_bags(self, pred: pd.DataFrame) -> np.ndarray:
        """Bags above the lowest grade (which may hold the tiles that raise it)."""
        return pred["label_index"].to_numpy(int) > 0

    def score_column(self) -> str:
        return "score"

    def describe(self, row: pd.Series) -> str:
        return (
            f"grade {row['label']}, predicted {row['pred']} (score {row['score']:.2f})"
            if "score" in row
            else ""
        )

    def thin_outcome(self, pred: pd.DataFrame) -> str | None:
        grades = sorted(pred["label"].dropna().astype(str).unique()) if "label" in pred else []
        if len(grades) != 1:
            return None
        return (
            f"every bag of the external cohort is of grade {grades[0]!r}; kappa and the AUC are "
            "undefined (null) and the other metrics describe that grade alone"
        )

    # ---- the closed-form baseline ----------------------------------------------------------------

    def fit_linear(
        self, z: np.ndarray, bags: pd.DataFrame, penalty: float, seed: int
    ) -> LinearHead:
        r"""The cumulative-link model :math:`s = w\cdot z + b` on the fold's thresholds: CORAL's
        loss summed over the bags plus :math:`\lVert w\rVert^2 / 2C` (the penalty of
        scikit-learn's logistic regression), minimised by scipy's L-BFGS (the loss is convex)."""
        from scipy.optimize import minimize
        from scipy.special import expit

        z = np.asarray(z, float)
        y = bags["label"].to_numpy(int)
        lv = (y[:, None] > np.arange(self.k - 1)[None, :]).astype(float)
        theta = np.asarray(self.thresholds, float)
        d = z.shape[1]

        def objective(v: np.ndarray) -> tuple[float, np.ndarray]:
            w, b = v[:d], v[d]
            eta = z @ w + b
            logit = eta[:, None] - theta[None, :]
            # -[y>j] log s(l) - [y<=j] log(1 - s(l)) = softplus(l) - [y>j] l
            value = np.logaddexp(0.0, logit) - lv * logit
            grad_eta = (expit(logit) - lv).sum(1)
            f = value.sum() + 0.5 * (w @ w) / penalty
            return float(f), np.concatenate([z.T @ grad_eta + w / penalty, [grad_eta.sum()]])

        start = np.concatenate([np.zeros(d), self.constant_logits(bags)])
        fit = minimize(objective, start, jac=True, method="L-BFGS-B", options={"maxiter": 2000})
        return fit.x[None, :d], np.array([fit.x[d]]), None

    # ---- the report ----------------------------------------------------------------------------

    def summary_artifacts(self, folds: FoldTables) -> tuple[dict[str, Any], Artifacts]:
        """``confusion.csv`` and ``confusion.png``: the pooled out-of-fold confusion matrix
        (first repeat)."""
        preds = folds("predictions.csv")
        if not preds:
            return {}, {}
        pooled = pd.concat(list(preds.values()), ignore_index=True)
        from sklearn.metrics import confusion_matrix

        cm = confusion_matrix(
            pooled["label_index"], self._pred_index(pooled), labels=np.arange(self.k)
        )
        table = pd.DataFrame(cm, columns=[f"pred_{c}" for c in self.classes])
        table.insert(0, "grade", self.classes)
        qwk = quadratic_weighted_kappa(
            pooled["label_index"].to_numpy(int), self._pred_index(pooled), self.k
        )
        title = f"{self.run.name}: {len(pooled)} out-of-fold predictions, pooled kappa {qwk:.3f}"
        return {}, {
            "confusion.csv": table,
            "confusion.png": confusion_figure(cm, self.classes, title),
        }

    def title(self) -> str:
        return f"ordinal grading of {self.run.columns.get('label', 'the label')} ({self.run.bag_level} bags)"

    def methods(self) -> str:
        th = {
            "marginal": "the training fold's cumulative class log-odds",
            "equal": "spaced 1 apart",
        }[self.options.thresholds]
        rule = {
            "median": "the median grade: the number of cumulative probabilities above 0.5",
            "mode": "the most probable grade",
        }[self.options.decision]
        return (
            f"Ordinal head: one score per bag and {self.k - 1} ordered thresholds ({th}, fitted on "
            "each training fold); P(grade > j) is the logistic of the score minus threshold j. "
            "Loss: CORAL's binary cross-entropy of the cumulative bits. Metrics: quadratic weighted "
            f"kappa and the mean absolute error in grades of the predicted grade ({rule}), its "
            "balanced accuracy and accuracy, and the macro one-vs-rest ROC AUC of the grade "
            "probabilities (scikit-learn)."
        )
