"""``report.md`` of an external evaluation (``mil evaluate``): what predicted the cohort, its
metrics, and the generalization gap to the run's own out-of-fold predictions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mil.config import Config
from mil.io import atomic_path
from mil.reporting import MISSING, gets_ci, interval, number, p_phrase, p_value, value_ci
from mil.tasks import Task
from mil.train.report import PREPROCESSING, ordered_metrics, subgroup_lines


def write_external_report(path: Path, summary: dict[str, Any], cfg: Config, task: Task) -> Path:
    """``report.md`` of ``mil evaluate`` (:mod:`mil.evaluate`): a run's fold ensemble on an
    external cohort, from the evaluation's ``summary`` and its config (the run's, with the
    cohort's ``data:``)."""
    lines = [f"# {cfg.name} on an external cohort: {task.title()} with `{cfg.model_name}`", ""]
    lines += ["## Methods", "", _external_methods(summary, cfg, task), ""]
    lines += ["## Results", "", "| metric | external [95% CI, patient bootstrap] |"]
    lines.append("|---|---|")
    metrics = summary["metrics"]
    for k in ordered_metrics(metrics, task):
        if gets_ci(k):  # not the p-values and time horizons
            lines.append(
                f"| {k} | {value_ci(metrics[k]['value'], metrics[k].get('ci95_pooled'))} |"
            )
    logrank = metrics.get("logrank_p", {}).get("value")
    if number(logrank) != MISSING:
        lines += [
            "",
            "Log-rank test of high- vs low-risk external bags (cut at the median risk the "
            f"ensemble gives the run's own bags): {p_phrase(logrank)}.",
        ]
    lines += ["", "## Generalization gap", "", *_gap_section(summary), ""]
    figures = [f for f in task.figure_captions if f in summary.get("files", [])]
    if figures:
        lines += ["## Figures", ""]
        for f in figures:
            caption = f"*The {predictor_words(summary)} on the external cohort (`{f}`).*"
            lines += [f"![{f}]({f})", "", caption, ""]
    if summary.get("subgroups"):
        lines += ["## Sites and subgroups", ""]
        lines += [*subgroup_lines(summary, task, "External predictions of each group"), ""]
    lines += [
        "## Files",
        "",
        "`predictions.csv` (one row per bag: outcome, the ensemble's mean outputs, `n_folds`), "
        "`summary.json` (metrics, CIs, the gap; `run` and `cohort` name the inputs)"
        + (", `subgroups.csv`" if summary.get("subgroups") else "")
        + ".",
        "",
    ]
    with atomic_path(path) as tmp:
        Path(tmp).write_text("\n".join(lines))
    return path


def _external_methods(summary: dict[str, Any], cfg: Config, task: Task) -> str:
    d = cfg.data
    n_bags, n_patients = summary["n_bags"], summary["n_patients"]
    bags = (
        f"{n_bags} slides of {n_patients} patients, one bag each"
        if d.bag_level == "slide"
        else f"{n_patients} patients, each patient's slides concatenated into one bag"
    )
    norm = "features " + PREPROCESSING[d.standardize] if d.standardize else "none fitted"
    parts = [_predictor_methods(summary, bags, norm)]
    if task.needs_train_predictions:
        parts.append(
            "Quantities that need training bags (censoring distribution, baseline hazard, "
            "risk-group cut) come from the ensemble's predictions of the run's own bags."
        )
    parts.append(task.methods())
    n_boot, internal = summary["n_boot"], summary["internal"]
    repeats = any(str(f).startswith("r") for f in summary.get("folds", []))
    parts.append(
        f"Confidence intervals are percentile-bootstrap 95% intervals ({n_boot:,} resamples of "
        f"patients). The generalization gap compares the external predictions with the run's "
        f"pooled out-of-fold predictions ({internal['n_bags']} bags of {internal['n_patients']} "
        f"patients{', of the first repeat, as the run pools them' if repeats else ''}); as the "
        "cohorts hold different patients, its interval resamples each cohort's patients "
        "independently."
    )
    return " ".join(parts)


def predictor_words(summary: dict[str, Any]) -> str:
    """What predicted an external cohort: ``fold ensemble (5 models)`` or ``refit model``."""
    if summary.get("predictor") == "refit":
        return f"model refit on all {summary['refit']['n_bags']} bags of the run"
    n = len(summary["folds"])
    return f"fold ensemble ({n} model{'' if n == 1 else 's'})"


def _predictor_methods(summary: dict[str, Any], bags: str, norm: str) -> str:
    if summary.get("predictor") == "refit":
        r = summary["refit"]
        how = (
            f"{r['epochs_trained']} epochs, the median of the epoch counts the folds kept "
            f"({', '.join(str(v) for v in r['per_fold_epochs'].values())})"
            if r.get("epochs_trained") is not None
            else f"penalty {r['penalty']:.3g}, the geometric median of the folds' choices"
        )
        return (
            f"One model of the run `{summary['run']}`, refit on all its {r['n_bags']} bags "
            f"({r['n_patients']} patients) for {how}, with no bag held out, predicted every bag "
            f"of the external cohort `{summary['cohort']}`: {bags}. The model applied the feature "
            f"preprocessing fitted on all the run's bags ({norm}), and nothing was refitted on the "
            "external cohort; a decision threshold is the median of the folds'."
        )
    return (
        f"The {len(summary['folds'])} fold models of the run `{summary['run']}` predicted every bag "
        f"of the external cohort `{summary['cohort']}`: {bags}. A bag's prediction is the mean of the "
        f"fold models' outputs; each model applied the feature preprocessing of its own "
        f"training fold ({norm}), and nothing was refitted on the external cohort."
    )


def _gap_section(summary: dict[str, Any]) -> list[str]:
    rows = [
        "| metric | internal (pooled out-of-fold) | external | external − internal [95% CI] | p |",
        "|---|---|---|---|---|",
    ]
    for k, g in summary["gap"].items():
        rows.append(
            f"| {k} | {number(g['internal'])} | {number(g['external'])} | "
            f"{value_ci(g['difference'], g['ci95'], signed=True)} | {p_value(g['p'])} |"
        )
    return [*rows, "", *(f"- {line}" for line in gap_lines(summary))]


def gap_lines(summary: dict[str, Any]) -> list[str]:
    """One sentence per headline metric of an external evaluation: internal, external, and
    their difference with its 95% CI."""
    out = []
    for k, g in summary["gap"].items():
        tail = p_phrase(g["p"]) if interval(g["ci95"]) else "no CI: no resample defined it"
        out.append(
            f"{k}: internal {number(g['internal'])} (pooled out-of-fold), external "
            f"{number(g['external'])}; difference "
            f"{value_ci(g['difference'], g['ci95'], signed=True)} ({tail})"
        )
    return out


def format_evaluation(summary: dict[str, Any]) -> str:
    """A few lines for the terminal: the external metrics and the gap."""
    lines = [
        f"{summary['name']} on {summary['cohort']}: {summary['n_bags']} bags, "
        f"{summary['n_patients']} patients, {predictor_words(summary)}"
    ]
    lines.append(f"  {'metric':<20} value [95% CI]")
    for k, m in summary["metrics"].items():
        if gets_ci(k):
            lines.append(f"  {k:<20} {value_ci(m['value'], m.get('ci95_pooled'))}")
    lines += [f"  gap: {line}" for line in gap_lines(summary)]
    return "\n".join(lines)
