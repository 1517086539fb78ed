"""Selection inside each outer fold's training data (``select: {mode: inner}``).

The defaults are one recipe; on a cohort outside the zoo they were chosen on, a linear model
of pooled features can be the better one (docs/benchmarks.md). With ``select.mode: inner``
each outer fold chooses, from its own training bags only, among *candidates*:

- ``default``: the model averaged with the ``ensemble:`` members (the run without selection);
- the model alone (its registered name);
- the model alone on the other preprocessing (``select.other_preprocessing``; see
  :func:`mil.config.other_preprocessing`): raw features where ``data.standardize`` whitens or standardises
  (``<model>_raw``), whitened ones where it is false (``<model>_whiten``), trained with the
  model's seed, so that the two differ by their preprocessing only;
- each linear model of ``select.members`` alone (``meanpool_linear``, ``bow_linear``).

The outer fold's training and validation bags are split into ``select.folds`` stratified,
patient-level inner folds (:func:`mil.splits.inner_splits`); in each, every member is trained
on the inner training bags (early stopping on an inner validation split, as an outer fold) and
predicts the inner test bags; each candidate's predictions (the average of its members, as
:func:`mil.train.members.combine` makes the fold's) are scored by the task's headline metric.
The outer fold's test bags take no part.

The rule: the candidate with the best mean inner score, unless its mean paired difference to
``default`` is within one standard error of those differences over the inner folds (Breiman's
one-standard-error rule): a small cohort's inner folds are noisy, and the default is kept
unless another candidate is better by more than that noise. The outer fold then trains every
member on its whole training partition, as without selection, and its predictions are the
chosen candidate's average; ``members.json`` names the chosen members (``chosen``), so
``mil evaluate`` and :class:`mil.Run` predict with them, and the refit takes the candidate most
folds chose. The model's instance scores (heatmaps) stay the model's own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mil.config import Config, other_preprocessing
from mil.splits import Split, inner_splits
from mil.tasks import Task
from mil.train.experiment import Experiment
from mil.train.members import Member, combine

DEFAULT = "default"

__all__ = [
    "DEFAULT",
    "Selection",
    "candidates",
    "choose",
    "fitted_members",
    "select_inner",
]


@dataclass
class Selection:
    """One outer fold's choice: the candidate, the members averaged for it, each candidate's
    inner-fold scores of ``metric`` and the runner-up (the next best mean)."""

    chosen: str
    members: list[str]
    scores: dict[str, list[float]]
    metric: str
    runner_up: str | None
    rule: str = "one standard error"

    def record(self) -> dict[str, Any]:
        """What ``metrics.json`` keeps (``selection``)."""
        return {
            "chosen": self.chosen,
            "members": self.members,
            "runner_up": self.runner_up,
            "metric": self.metric,
            "rule": self.rule,
            "inner": {c: [float(v) for v in s] for c, s in self.scores.items()},
            "inner_mean": {c: _mean(s) for c, s in self.scores.items()},
        }


def fitted_members(cfg: Config) -> list[str]:
    """The linear members an outer fold fits: ``ensemble:``'s, then ``select.members``' others
    (with selection on; the ensemble's alone otherwise)."""
    if cfg.select.mode == "none":
        return list(cfg.members)
    return list(dict.fromkeys([*cfg.members, *cfg.select.members]))


def candidates(cfg: Config) -> dict[str, list[str]]:
    """Candidate name -> the members averaged for it (the model by ``cfg.model_name``); a
    candidate with the same members as an earlier one is left out (``default`` first)."""
    out: dict[str, list[str]] = {}
    alt = other_preprocessing(cfg)
    for name, members in (
        (DEFAULT, [cfg.model_name, *cfg.members]),
        (cfg.model_name, [cfg.model_name]),
        *([(alt[0], [alt[0]])] if alt is not None else []),
        *((m, [m]) for m in cfg.select.members),
    ):
        if sorted(members) not in [sorted(v) for v in out.values()]:
            out[name] = members
    return out


def _mean(values: list[float]) -> float:
    v = np.asarray(values, float)
    return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")


def choose(
    scores: dict[str, list[float]], k: float = 1.0, margin: float = 0.0
) -> tuple[str, str | None]:
    """(chosen, runner-up) by the one-standard-error rule against :data:`DEFAULT` (see the
    module): the best candidate replaces the default only where its mean gain exceeds ``k``
    standard errors and ``margin`` (the rule of ``select:`` is ``k`` 1, ``margin`` 0;
    ``benchmarks/inner_selection.py --rules`` compares stricter ones); a candidate without a
    finite mean is never chosen."""
    means = {c: _mean(s) for c, s in scores.items()}
    ranked = sorted((c for c in means if np.isfinite(means[c])), key=lambda c: -means[c])
    if not ranked:
        return DEFAULT, None
    best = ranked[0]
    chosen = best
    if best != DEFAULT and DEFAULT in ranked:
        diff = np.asarray(scores[best], float) - np.asarray(scores[DEFAULT], float)
        diff = diff[np.isfinite(diff)]
        se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else np.inf
        if not diff.mean() > max(k * se, margin):
            chosen = DEFAULT
    others = [c for c in ranked if c != chosen]
    return chosen, (others[0] if others else None)


#: ``fit(inner_split) -> (the inner fold's task, its members with inner test predictions)``
InnerFit = Callable[[Split], tuple[Task, list[Member]]]


def select_inner(exp: Experiment, split: Split, fit: InnerFit, log=print) -> Selection:
    """The choice of outer fold ``split`` among :func:`candidates`, from inner folds of its
    training bags (``fit`` trains and predicts one; see the module)."""
    cfg = exp.cfg
    options = candidates(cfg)
    scores: dict[str, list[float]] = {c: [] for c in options}
    inner = inner_splits(
        exp.cohort, split, cfg.select.folds, cfg.splits.val_fraction, cfg.splits.seed
    )
    metric = exp.task().headline()
    for sub in inner:
        task, members = fit(sub)
        by_name = {m.name: m for m in members}
        for c, names in options.items():
            pred = combine(task, [by_name[n] for n in names])[0]
            scores[c].append(task.metric_value(pred, metric))
    chosen, runner_up = choose(scores)
    means = ", ".join(f"{c} {_mean(s):.3f}" for c, s in scores.items())
    log(f"fold {split.name}: selection on {len(inner)} inner folds ({metric}: {means}): {chosen}")
    return Selection(chosen, options[chosen], scores, metric, runner_up)
