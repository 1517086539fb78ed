"""Figures of a run's results: out-of-fold ROC curves and Kaplan–Meier curves of risk groups.

Each function returns a matplotlib ``Figure`` built without pyplot (the
user's backend is left alone); the run folder's writer saves it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from mil.metrics.survival import logrank_p
from mil.reporting import p_phrase

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def roc_figure(curves: pd.DataFrame, aucs: dict[str, float], title: str) -> Figure:
    """ROC curves (``class, fold, fpr, tpr``): each fold thin, the pooled out-of-fold curve
    bold, per class."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.8, 4.4), dpi=120)
    ax = fig.subplots()
    colours = [f"C{i}" for i in range(10)]
    for i, (c, g) in enumerate(curves.groupby("class", sort=False)):
        colour = colours[i % len(colours)]
        for fold, f in g.groupby("fold", sort=False):
            if fold != "pooled":
                ax.plot(f["fpr"], f["tpr"], color=colour, alpha=0.25, lw=0.8)
        f = g[g["fold"] == "pooled"]
        label = f"{c}: pooled AUC {aucs[c]:.3f}" if c in aucs else str(c)
        ax.plot(f["fpr"], f["tpr"], color=colour, lw=2.0, label=label)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8, title="thin: single folds")
    fig.tight_layout()
    return fig


def km_figure(groups: pd.DataFrame, title: str, time_label: str = "time") -> Figure:
    """Kaplan–Meier curves (lifelines) of the ``group`` column's high and low risk groups,
    with the log-rank p."""
    from lifelines import KaplanMeierFitter
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.0), dpi=120)
    ax = fig.subplots()
    for name, colour in (("low", "tab:blue"), ("high", "tab:red")):
        g = groups[groups["group"] == name]
        if len(g) == 0:
            continue
        kmf = KaplanMeierFitter(label=f"{name} risk (n={len(g)}, events={int(g['event'].sum())})")
        kmf.fit(g["time"], g["event"])
        kmf.plot_survival_function(ax=ax, ci_show=True, color=colour, show_censors=True)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(time_label)
    ax.set_ylabel("survival probability")
    ax.set_ylim(0, 1.02)
    ax.legend(title=f"log-rank {p_phrase(logrank_p(groups))}", loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig


def calibration_figure(table: pd.DataFrame, brier: float, title: str) -> Figure:
    """Reliability diagram (``mean_predicted``, ``fraction_positive`` per bin): the
    observed share of positives against the mean predicted probability, the diagonal being
    perfect calibration."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.8, 4.4), dpi=120)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.plot(
        table["mean_predicted"],
        table["fraction_positive"],
        "o-",
        color="C0",
        lw=1.5,
        label=f"pooled out-of-fold (Brier {brier:.3f})",
    )
    ax.set_xlabel("mean predicted probability (bins of equal size)")
    ax.set_ylabel("observed fraction positive")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig
