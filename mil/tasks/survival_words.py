"""The survival task's sentences for a report's methods paragraph."""

from __future__ import annotations

from mil.schema import TaskConfig


def methods_words(task: TaskConfig) -> str:
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
