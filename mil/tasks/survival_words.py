"""The survival task's own ``task:`` keys and its sentences for a report's methods paragraph."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class SurvivalOptions:
    """``task.loss``: the Cox partial likelihood over each loss batch's risk set, or the
    discrete-time hazard NLL (Patch-GCN style bins); ``ties``: how tied event times enter the
    partial likelihood; ``bins``: time bins of ``nll``, at quantiles of the training fold's
    uncensored times (``bins_from: cohort``: of the whole cohort's, MCAT / Patch-GCN /
    SurvPath's labelling, reproduced and flagged); ``alpha``: the weight moved onto the
    uncensored terms of ``nll`` (Patch-GCN's)."""

    loss: Literal["cox", "nll"] = "cox"
    ties: Literal["efron", "breslow"] = "efron"
    bins: int = 4
    bins_from: Literal["fold", "cohort"] = "fold"
    alpha: float = 0.0

    def __post_init__(self) -> None:
        if self.bins < 2:
            raise ValueError("task.bins must be at least 2")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError("task.alpha must be in [0, 1]")


def methods_words(task: SurvivalOptions) -> str:
    """The loss and the metrics of a survival run, in a paper's words."""
    if task.loss == "cox":
        return (
            f"Loss: Cox partial likelihood ({task.ties.capitalize()} ties) over the risk set of each "
            "batch. Metrics (scikit-survival): Harrell's and Uno's C-index, time-dependent AUC and "
            "integrated Brier score; log-rank test (lifelines) of risk groups split at the training median."
        )
    where = (
        "the whole cohort's event times, test folds included (task.bins_from: cohort, the "
        "labelling of MCAT, Patch-GCN, PORPOISE and SurvPath, kept to reproduce them: it lets "
        "the test folds' times shape the bins, so the result is not a clean held-out estimate)"
        if task.bins_from == "cohort"
        else "the training fold's event times"
    )
    return (
        f"Loss: discrete-time hazard negative log-likelihood over {task.bins} bins at quantiles "
        f"of {where}. Metrics (scikit-survival): Harrell's and Uno's C-index, "
        "time-dependent AUC and integrated Brier score; log-rank test (lifelines) of risk groups."
    )
