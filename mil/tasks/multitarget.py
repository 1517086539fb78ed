r"""Several targets of one bag (a panel of mutations or biomarkers, a grade, a score): one bag
embedding, one head per target, each target's loss, predictions and metrics those of its own task.

``task: {type: multitarget, weights: equal|uncertainty, targets: [...]}``, one entry per target::

    targets:
      - {name: msi, label_col: msi_status}                      # classification (the default)
      - {name: tmb, label_col: tmb, type: regression, target_scaling: log}
      - {name: grade, label_col: grade, type: ordinal, classes: [G1, G2, G3]}

Each entry names the target (``name``: a plain word, the prefix of its prediction columns and
metrics), its cohort column (``label_col``), its task (``type``: ``classification``,
``regression`` or ``ordinal``), optionally its classes in order (``classes``) and any option of
its task (``class_weights``, ``target_scaling``, ``thresholds``, ...), checked as that task
checks them. The model's head has the targets' outputs side by side (a classification target's
C logits, a regression's or an ordinal's one score): on the model's one bag embedding each
block of the final linear layer is the target's own head, which the target's task reads.

**Missing labels.** An empty cell is a missing label: that bag contributes nothing to that
target's loss (the target's rows are selected before its task's loss is computed, so the value
the placeholder holds cannot matter), to its fold state (class weights, target scaler, grade
thresholds: fitted on the training bags that have the label) or to its metrics; the bag is
still predicted. **Weights**: ``equal``: the sum of the targets' losses (STAMP's multi-target
model); ``uncertainty``: Kendall, Gal & Cipolla (2018)'s weighting with each log-variance at its
optimum for the batch's losses, :math:`s_t = \log L_t`, so each target's gradient is divided by
its current loss; the loss is the geometric mean of the targets' losses, whose gradient weights
them so (no parameters outside the model, whose head holds only outputs of the bag).

Predictions: every target's own columns prefixed ``<name>/`` (``msi/prob_MSS``,
``tmb/prediction``, ``grade/pred``); metrics ``<name>/<metric>`` (each computed by the
target's task on the bags with that label, with its patient-bootstrap CI) and
``mean_headline``, the mean of the targets' headline metrics (what compares runs). Folds are
stratified on all targets at once: the joint stratum of every target's own (class, grade,
target half; a missing label is a stratum of its own), patient-grouped, falling back to the
first target's alone. Instance scores keep a column per head output (:meth:`score_columns`);
``Run.scores(slide, cls="msi")`` (``mil heatmap --target``) reads a target's block as its task
does. ``--baseline``: each target's own linear model on its labelled bags (:meth:`fit_linear`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from mil.tasks.base import Artifacts, FoldTables, LinearHead, Task, TaskRun, as_tensor
from mil.tasks.linear_fits import C_GRID
from mil.tasks.multitarget_targets import (
    MultiTargetOptions,
    MultiTargets,
    block_scores,
    classes_of,
)
from mil.tasks.registry import register


@register("multitarget")
class MultiTargetTask(Task):
    """One head block per target, each read by its own task; masked missing labels; equal or
    uncertainty weights (see the module)."""

    Options = MultiTargetOptions
    headline_metrics = ("mean_headline",)
    outcome_columns: tuple[str, ...] = ()
    strata_description = "all targets jointly"

    @classmethod
    def default_ensemble(cls, model: type, tables: bool = False) -> list[str]:
        """None: a member is fitted for all targets and averaged into each, and only a
        regression target's own ``auto`` would take one (list members in ``ensemble:``)."""
        return []

    @classmethod
    def target_reader(cls, options: MultiTargetOptions) -> MultiTargets:
        return MultiTargets(options.specs)

    def __init__(
        self, options: MultiTargetOptions, classes: list[str], run: TaskRun | None = None
    ) -> None:
        super().__init__(options, classes, run)
        self.specs = self.options.specs
        self.reader = MultiTargets(self.specs)
        self.subs: dict[str, Task] = {}
        self.blocks: dict[str, slice] = {}
        start = 0
        for s in self.specs:
            sub_run = dataclasses.replace(
                self.run, columns={c: s.label_col for c in self.reader.readers[s.name].columns}
            )
            sub = s.task_class(s.options, classes_of(self.classes, s.name), sub_run)
            self.subs[s.name] = sub
            self.blocks[s.name] = slice(start, start + sub.n_out)
            start += sub.n_out
        self._n_out = start
        self.ranking_target = self.specs[0].name
        words = "; ".join(f"{s.name}: {self.subs[s.name].linear_words}" for s in self.specs)
        self.linear_words = f"each target's own linear model on the bags with its label ({words}), one penalty C for all (a ridge regression's alpha = 1/C)"
        self.report_metrics = (
            "mean_headline",
            *(f"{s.name}/{m}" for s in self.specs for m in self.subs[s.name].report_metrics),
        )
        self.outcome_columns = tuple(
            f"{s.name}/{c}" for s in self.specs for c in self.subs[s.name].outcome_columns
        )

    @property
    def n_out(self) -> int:
        return self._n_out

    def score_columns(self) -> list[str]:
        """What each column of the instance scores (a head output) stands for."""
        out = []
        for s in self.specs:
            n = self.blocks[s.name].stop - self.blocks[s.name].start
            names = (
                self.subs[s.name].classes
                if s.type == "classification"
                else ["score" if s.type == "ordinal" else "prediction"]
            )
            out += [f"{s.name}/{names[j]}" for j in range(n)]
        return out

    # ---- bags as each target's task sees them --------------------------------------------------

    def _cols(self, name: str) -> dict[str, str]:
        return {f"{name}.{c}": c for c in self.reader.readers[name].columns}

    def _have(self, bags: pd.DataFrame, name: str) -> np.ndarray:
        return bags[list(self._cols(name))].notna().all(1).to_numpy()

    def _filled(self, bags: pd.DataFrame, name: str) -> pd.DataFrame:
        """Every bag under the target's own column names, a missing label replaced by a
        placeholder (the first labelled bag's value; 1 without one) that no loss or metric reads."""
        cols = self._cols(name)
        view = bags.rename(columns=cols)
        for c in cols.values():
            v = view[c]
            fill = v.dropna().iloc[0] if v.notna().any() else 1.0
            view[c] = v.fillna(fill)
            if c == "label":
                view[c] = view[c].astype(int)
        return view

    def _view(self, bags: pd.DataFrame, spec) -> pd.DataFrame:
        """The bags with the target's label, under its own task's column names."""
        view = self.reader.view(bags, spec)
        return view if spec.type == "regression" else view.assign(label=view["label"].astype(int))

    # ---- one fold -----------------------------------------------------------------------------

    def fit_fold(self, train_bags: pd.DataFrame) -> None:
        for s in self.specs:
            self.subs[s.name].fit_fold(self._view(train_bags, s))

    def state(self) -> dict[str, Any]:
        return {s.name: self.subs[s.name].state() for s in self.specs}

    def load_fold_state(self, state: dict[str, Any]) -> None:
        for s in self.specs:
            self.subs[s.name].load_fold_state(state.get(s.name) or {})

    def targets(self, bags: pd.DataFrame) -> dict[str, Tensor]:
        out = {}
        for s in self.specs:
            out[f"{s.name}/mask"] = as_tensor(self._have(bags, s.name), torch.bool)
            out.update(
                {
                    f"{s.name}/{k}": v
                    for k, v in self.subs[s.name].targets(self._filled(bags, s.name)).items()
                }
            )
        return out

    def target_losses(self, logits: Tensor, targets: dict[str, Tensor]) -> dict[str, Tensor]:
        """Each target's loss on the bags of the batch with its label (targets without one in
        the batch are left out)."""
        out = {}
        for s in self.specs:
            mask = targets[f"{s.name}/mask"].to(logits.device)
            if not bool(mask.any()):
                continue
            prefix = f"{s.name}/"
            mine = {
                k[len(prefix) :]: v.to(logits.device)[mask]
                for k, v in targets.items()
                if k.startswith(prefix) and k != f"{s.name}/mask"
            }
            out[s.name] = self.subs[s.name].loss(logits[mask][:, self.blocks[s.name]], mine)
        return out

    def loss(self, logits: Tensor, targets: dict[str, Tensor]) -> Tensor:
        losses = list(self.target_losses(logits, targets).values())
        if not losses:
            return logits.sum() * 0.0
        if self.options.weights == "equal":
            return torch.stack(losses).sum()
        # Kendall's weights at their optimum: the geometric mean of the losses
        return torch.stack(losses).clamp(min=1e-6).log().mean().exp()

    def constant_logits(self, train_bags: pd.DataFrame) -> np.ndarray:
        return np.concatenate(
            [self.subs[s.name].constant_logits(self._view(train_bags, s)) for s in self.specs]
        )

    # ---- the closed-form linear baselines -------------------------------------------------------

    linear_penalty = ("C", C_GRID)

    def fit_linear(
        self, z: np.ndarray, bags: pd.DataFrame, penalty: float, seed: int
    ) -> LinearHead:
        """Each target's own task's linear model on the rows of ``z`` whose bag has its label,
        in the target's block of one head. One penalty ``C`` for all: a ridge regression's
        ``alpha = 1/C`` (the unit-variance Gaussian likelihood of its scaled target against
        ``|w|^2 / 2C``, the logistic and cumulative-link models' penalty)."""
        z = np.asarray(z, float)
        weight, bias = np.zeros((self.n_out, z.shape[1])), np.zeros(self.n_out)
        for s in self.specs:
            sub, have = self.subs[s.name], self._have(bags, s.name)
            own = penalty if sub.linear_penalty[0] == "C" else 1.0 / penalty
            w, b, _ = sub.fit_linear(z[have], self._view(bags, s), own, seed)
            weight[self.blocks[s.name]], bias[self.blocks[s.name]] = w, b
        return weight, bias, None

    # ---- predictions and metrics ----------------------------------------------------------------

    def outputs(self, logits: np.ndarray) -> pd.DataFrame:
        logits = np.asarray(logits, float)
        parts = [
            self.subs[s.name].outputs(logits[:, self.blocks[s.name]]).add_prefix(f"{s.name}/")
            for s in self.specs
        ]
        return pd.concat(parts, axis=1)

    def output_columns(self) -> list[str]:
        return [f"{s.name}/{c}" for s in self.specs for c in self.subs[s.name].output_columns()]

    def predictions(self, bags: pd.DataFrame, logits: np.ndarray) -> pd.DataFrame:
        """``bag_id, patient_id`` and each target's prediction columns, ``<name>/``-prefixed;
        its outcome columns are empty where the label is missing."""
        logits = np.asarray(logits, float)
        out = pd.DataFrame(
            {"bag_id": bags["bag_id"].values, "patient_id": bags["patient_id"].values}
        )
        for s in self.specs:
            sub = self.subs[s.name]
            sub.fold_name = self.fold_name
            p = sub.predictions(self._filled(bags, s.name), logits[:, self.blocks[s.name]])
            p = p.drop(columns=[c for c in ("bag_id", "patient_id", "fold") if c in p])
            have = self._have(bags, s.name)
            for c in ("label", "label_index", "target"):
                if c in p:
                    p[c] = p[c].where(have)
            for c in p.columns:
                out[f"{s.name}/{c}"] = p[c].to_numpy()
        return out

    def part(self, pred: pd.DataFrame, name: str, labelled: bool = True) -> pd.DataFrame:
        """One target's predictions under its own task's column names (``labelled``: only the
        bags with its label), as a single-target run of that task would have written them."""
        prefix = f"{name}/"
        keep = [
            c for c in pred.columns if not c.startswith(tuple(f"{s.name}/" for s in self.specs))
        ]
        own = {c: c[len(prefix) :] for c in pred.columns if c.startswith(prefix)}
        out = pred[keep + list(own)].rename(columns=own)
        if labelled:
            outcome = self.subs[name].outcome_columns[0]
            out = out[out[outcome].notna()].copy()
            if outcome == "label_index":
                out["label_index"] = out["label_index"].astype(int)
        return out.reset_index(drop=True)

    def _merge(self, base: pd.DataFrame, parts: dict[str, pd.DataFrame]) -> pd.DataFrame:
        out = base.copy()
        for name, p in parts.items():
            for c in p.columns:
                if c not in base.columns:
                    out[f"{name}/{c}"] = p[c].to_numpy()
        return out

    def mean_outputs(self, rows: pd.DataFrame, by: str) -> pd.DataFrame:
        parts = {
            s.name: self.subs[s.name].mean_outputs(self.part(rows, s.name, labelled=False), by)
            for s in self.specs
        }
        base = parts[self.specs[0].name][[by]]
        return self._merge(base, parts)

    def averaging_words(self) -> str:
        return "each target's outputs averaged as its own task averages them"

    def average_predictions(self, members: list[pd.DataFrame], scales=None) -> pd.DataFrame:
        parts = {}
        for s in self.specs:
            sub_scales = None if scales is None else [sc.get(s.name, {}) for sc in scales]
            parts[s.name] = self.subs[s.name].average_predictions(
                [self.part(m, s.name, labelled=False) for m in members], sub_scales
            )
        first = members[0]
        out = first.copy()
        for name, p in parts.items():
            for c in p.columns:
                if f"{name}/{c}" in out.columns:
                    out[f"{name}/{c}"] = p[c].to_numpy()
        return out

    def output_scale(self, train_pred: pd.DataFrame | None) -> dict[str, Any]:
        if train_pred is None:
            return {}
        return {
            s.name: self.subs[s.name].output_scale(self.part(train_pred, s.name))
            for s in self.specs
        }

    def metrics(self, pred: pd.DataFrame, train_pred: pd.DataFrame | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for s in self.specs:
            train = None if train_pred is None else self.part(train_pred, s.name)
            sub = self.subs[s.name].metrics(self.part(pred, s.name), train)
            out.update({f"{s.name}/{k}": v for k, v in sub.items()})
        out["mean_headline"] = self._mean_headline(out)
        return out

    def _mean_headline(self, values: dict[str, Any]) -> float:
        heads = [
            values.get(f"{s.name}/{self.subs[s.name].headline()}", float("nan")) for s in self.specs
        ]
        return float(np.mean(heads))

    def pooled_metrics(self, pred: pd.DataFrame) -> dict[str, float]:
        out = {}
        for s in self.specs:
            out.update(
                {
                    f"{s.name}/{k}": v
                    for k, v in self.subs[s.name].pooled_metrics(self.part(pred, s.name)).items()
                }
            )
        out["mean_headline"] = self._mean_headline(out)
        return out

    def metric_value(self, pred: pd.DataFrame, name: str) -> float:
        if name == "mean_headline":
            return float(
                np.mean(
                    [
                        self.subs[s.name].metric_value(
                            self.part(pred, s.name), self.subs[s.name].headline()
                        )
                        for s in self.specs
                    ]
                )
            )
        target, _, metric = name.partition("/")
        if target not in self.subs:
            return float("nan")
        return self.subs[target].metric_value(self.part(pred, target), metric)

    def pooled_ci(
        self, pred: pd.DataFrame, n_boot: int = 1000, seed: int = 0
    ) -> dict[str, tuple[float, float]]:
        """Each target's CIs, resampling whole patients among the bags with its label."""
        out = {}
        for s in self.specs:
            out.update(
                {
                    f"{s.name}/{k}": v
                    for k, v in self.subs[s.name]
                    .pooled_ci(self.part(pred, s.name), n_boot, seed)
                    .items()
                }
            )
        return out

    def counts(self, pred: pd.DataFrame) -> dict[str, int]:
        out = {}
        for s in self.specs:
            part = self.part(pred, s.name)
            out.update({f"{s.name}/{k}": v for k, v in self.subs[s.name].counts(part).items()})
            out[f"{s.name}/n"] = len(part)
        return out

    def outcome_strata(self, pred: pd.DataFrame) -> np.ndarray:
        cols = [pred[c].astype(str).to_numpy() for c in self.outcome_columns if c in pred]
        return (
            pd.MultiIndex.from_arrays(cols).factorize()[0]
            if cols
            else np.zeros(len(pred), dtype=int)
        )

    def score_column(self) -> str | None:
        """The score column of :attr:`ranking_target` (the first target unless set): what ranks bags."""
        name = self.ranking_target
        col = self.subs[name].score_column()
        return None if col is None else f"{name}/{col}"

    @property
    def target_names(self) -> list[str]:
        return [s.name for s in self.specs]

    def score_target(self, cls: Any) -> tuple[str, str | None] | None:
        """``cls`` ``"<target>"`` or ``"<target>/<class>"`` of instance scores as (target,
        class or None); None where it names no target (a head output's index)."""
        name, _, rest = str(cls).partition("/")
        return (name, rest or None) if isinstance(cls, str) and name in self.subs else None

    def target_scores(
        self, values: np.ndarray, kind: str, target: str, cls: str | None, predicted: int | None
    ) -> tuple[np.ndarray, str]:
        """One target's instance scores ``[N]`` from a kind's columns ``values [N, K]`` (one per
        head output), read as its own task reads them (:func:`block_scores`), and their label."""
        return block_scores(self, values, kind, target, cls, predicted)

    def describe(self, row: pd.Series) -> str:
        words = []
        for s in self.specs:
            part = pd.Series(
                {k[len(s.name) + 1 :]: v for k, v in row.items() if str(k).startswith(f"{s.name}/")}
            )
            if len(part):
                words.append(f"{s.name}: {self.subs[s.name].describe(part)}")
        return "; ".join(w for w in words if not w.endswith(": "))

    # ---- the report --------------------------------------------------------------------------------

    def summary_artifacts(self, folds: FoldTables) -> tuple[dict[str, Any], Artifacts]:
        return {}, {}

    def title(self) -> str:
        return f"{len(self.specs)} targets ({', '.join(f'{s.name}: {s.type}' for s in self.specs)}; {self.run.bag_level} bags)"

    def methods(self) -> str:
        weights = {
            "equal": "the sum of the targets' losses",
            "uncertainty": "the geometric mean of the targets' losses (Kendall et al.'s uncertainty weights at their optimum: each target's gradient divided by its loss)",
        }[self.options.weights]
        per = " ".join(
            f"Target {s.name} ({s.label_col}): {self.subs[s.name].methods()}" for s in self.specs
        )
        return (
            f"One bag embedding and one head per target; the loss is {weights}, each target's loss "
            "over the bags with its label only (an empty cell adds no loss and no metric). "
            f"{per} mean_headline: the mean of the targets' headline metrics."
        )
