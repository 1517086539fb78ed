"""Summaries of a run folder: per-fold metrics, mean ± sd, bootstrap CIs, subgroups; then the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mil.data.sources import read_cohort
from mil.errors import DataError
from mil.io import json_float, write_csv, write_json
from mil.metrics.subgroups import group_difference_test, subgroup_metrics
from mil.reporting import (
    MISSING,
    SETTINGS,
    gets_ci,
    interval,
    is_horizon,
    is_p_value,
    is_timing,
    kind,
    mean_sd,
    p_phrase,
    p_value,
    value_ci,
)
from mil.results import (
    PREDICTIONS,
    SUBGROUPS,
    SUMMARY_CSV,
    SUMMARY_JSON,
    RunFolder,
    write_artifacts,
)
from mil.results.members import members_summary, selection_summary
from mil.results.search import average_summary, average_words
from mil.tasks import Task, headline_metrics, make_task
from mil.train.diagnostics import summarize_findings
from mil.train.report import write_report

__all__ = [
    "fold_metric_entries",
    "format_summary",
    "group_difference_test",
    "join_group_columns",
    "run_predictions",
    "run_task",
    "subgroup_metrics",
    "subgroup_results",
    "summarize",
    "summary_record",
    "value_entries",
    "write_summary",
]


def _finished(run: RunFolder, what: str) -> tuple[Any, dict[str, dict[str, Any]]]:
    """A run's config and the ``metrics.json`` records of its finished folds."""
    cfg = run.read_config()
    records = run.records()
    if not records:
        raise DataError(f"{run.path}: no finished folds (fold_*/metrics.json) to {what}")
    return cfg, records


def run_task(run_dir: str | Path) -> Task:
    """The task (metrics, pooled statistics) of a finished run, as its folds were scored."""
    cfg, records = _finished(RunFolder(run_dir), "score")
    return make_task(cfg, next(iter(records.values())).get("classes", []))


def run_predictions(run_dir: str | Path) -> pd.DataFrame:
    """Out-of-fold predictions of every finished fold (all repeats), with a ``fold_dir``
    column (``fold_3``, ``fold_r1_3``, ...) naming the fold that made each row."""
    return RunFolder(run_dir).all_predictions()


def summarize(run_dir: str | Path, n_boot: int = 1000) -> dict[str, Any]:
    """Rebuild ``summary.csv``, ``summary.json``, the task's run artifacts and ``report.md``
    from the finished fold folders."""
    run = RunFolder(run_dir)
    cfg, records = _finished(run, "summarise")
    task = make_task(cfg, next(iter(records.values())).get("classes", []))
    table, metrics = fold_metric_entries(list(records.values()))
    pooled = run.all_predictions()  # tested bags (each once per repeat)
    folds = [r["fold"] for r in records.values()]
    summary = summary_record(cfg, task, pooled, folds, n_boot, metrics)
    summary["n_folds_expected"] = cfg.splits.folds * cfg.splits.repeats
    # folds that may not have trained well (mil.train.diagnostics)
    summary["diagnostics"] = [f for r in records.values() for f in r.get("diagnostics", [])]
    # task-specific run-level results (survival: pooled KM curves and log-rank p)
    extra, artifacts = task.summary_artifacts(run.first_repeat_tables)
    write_artifacts(run.path, artifacts)
    summary.update(extra)
    search = average_summary(run.path, task, n_boot)  # a search: its points averaged
    if search is not None:
        summary["search"] = search
    ensemble = members_summary(run.path, task, n_boot)  # each member against the average
    if ensemble is not None:
        summary["ensemble"] = ensemble
    selection = selection_summary(run.path)  # select.mode: inner: what each fold chose
    if selection is not None:
        summary["selection"] = selection
    group_cols = list(dict.fromkeys([c for c in [cfg.data.site_col, *cfg.data.subgroup_cols] if c]))
    if group_cols:
        summary.update(_subgroups(run, task, cfg, group_cols, n_boot))
    agg = pd.DataFrame(
        [
            {"fold": "mean", **{k: metrics[k]["mean"] for k in table.columns[1:]}},
            {"fold": "sd", **{k: metrics[k]["sd"] for k in table.columns[1:]}},
        ]
    )
    write_csv(run.file(SUMMARY_CSV), pd.concat([table, agg], ignore_index=True))
    write_summary(run.path, summary)
    write_report(run.path)
    return summary


def summary_record(
    cfg, task: Task, pred: pd.DataFrame, folds: list[str], n_boot: int, metrics: dict[str, Any]
) -> dict[str, Any]:
    """The head of ``summary.json``, one meaning per key for a run and an evaluation:
    ``name``, ``task``, ``model`` (the run's), ``folds`` (those whose models predicted),
    ``n_boot``, ``n_bags`` and ``n_patients`` (of ``pred``: a run's out-of-fold rows, each
    bag once per repeat; an evaluation's cohort) and ``metrics``: per metric either a run's
    ``mean``, ``sd`` and ``folds`` (:func:`fold_metric_entries`) or one predictor's ``value``
    on one cohort (:func:`value_entries`), never both, with ``ci95_pooled``, the pooled
    bootstrap CI of ``pred`` (:meth:`mil.tasks.Task.pooled_ci`), where the task has one."""
    for k, (lo, hi) in task.pooled_ci(pred, n_boot=n_boot).items():
        if k in metrics:
            metrics[k]["ci95_pooled"] = [lo, hi]
    return {
        "name": cfg.name,
        "task": cfg.task.type,
        "model": cfg.model_name,
        "folds": list(folds),
        "n_boot": n_boot,
        "n_bags": int(pred["bag_id"].nunique()),
        "n_patients": int(pred["patient_id"].nunique()),
        "metrics": metrics,
    }


def value_entries(found: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """One predictor's metrics on one cohort as ``summary.json``'s entries (``value``, NaN
    where undefined; not a mean over folds), and its non-scalar results (a confusion matrix)."""
    metrics: dict[str, Any] = {}
    details: dict[str, Any] = {}
    for k, v in found.items():
        if v is None or isinstance(v, (int, float)):
            metrics[k] = {"value": float("nan") if v is None else float(v)}
        else:
            details[k] = v
    return metrics, details


def write_summary(folder: str | Path, summary: dict[str, Any]) -> None:
    """``summary.json`` of a run folder or an evaluation folder (atomic, strict JSON)."""
    write_json(Path(folder) / SUMMARY_JSON, summary)


def fold_metric_entries(
    records: list[dict[str, Any]],
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Per-fold table of every scalar metric, and per metric its mean, sd and fold values
    (means per repeat with repeated cross-validation)."""
    # a metric a fold could not define is NaN, written as null (strict JSON)
    scalar = sorted(
        {
            k
            for r in records
            for k, v in r["metrics"].items()
            if (v is None or isinstance(v, (int, float))) and kind(k) != "count"
        },
        key=lambda k: (is_timing(k), k),
    )
    rows = []
    for r in records:
        rows.append({"fold": r["fold"], **{k: json_float(r["metrics"].get(k)) for k in scalar}})
    table = pd.DataFrame(rows, columns=["fold", *scalar])
    metrics: dict[str, Any] = {}
    for k in scalar:
        vals = table[k].to_numpy(float)
        ok = vals[np.isfinite(vals)]
        metrics[k] = {
            "mean": float(ok.mean()) if len(ok) else float("nan"),
            "sd": float(ok.std(ddof=1)) if len(ok) > 1 else float("nan"),
            "folds": [None if not np.isfinite(v) else float(v) for v in vals],
        }
    repeats = sorted({r.get("repeat", 0) for r in records})
    if len(repeats) > 1:
        for k in scalar:
            per_rep = table.groupby([r.get("repeat", 0) for r in records])[k].mean().to_numpy(float)
            metrics[k]["repeat_means"] = per_rep.tolist()
            metrics[k]["sem_over_repeats"] = float(per_rep.std(ddof=1) / np.sqrt(len(per_rep)))
    return table, metrics


def _subgroups(
    run: RunFolder, task: Task, cfg, group_cols: list[str], n_boot: int
) -> dict[str, Any]:
    """``subgroups.csv`` (metrics per site and subgroup, first repeat) and the summary's
    ``subgroup_tests`` and ``subgroups`` entries."""
    first = pd.concat(run.first_repeat_tables(PREDICTIONS).values(), ignore_index=True)
    first = join_group_columns(first, cfg, group_cols)
    table_sub, entries = subgroup_results(task, first, group_cols, n_boot)
    write_csv(run.file(SUBGROUPS), table_sub)
    return entries


def subgroup_results(
    task: Task, pred: pd.DataFrame, group_cols: list[str], n_boot: int
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The ``subgroups.csv`` table of ``pred`` (metrics per site and subgroup, with the
    permutation p of each column) and the summary's ``subgroup_tests`` and ``subgroups``."""
    table_sub = subgroup_metrics(task, pred, group_cols, n_boot=n_boot)
    tests = [group_difference_test(task, pred, col, n_perm=n_boot) for col in group_cols]
    table_sub["p_difference"] = (
        table_sub["column"].map({t["column"]: t["p"] for t in tests}).astype(float)
    )
    rows = [
        {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in r.items()}
        for r in table_sub.to_dict("records")
    ]
    return table_sub, {"subgroup_tests": tests, "subgroups": rows}


def join_group_columns(pred: pd.DataFrame, cfg, cols: list[str]) -> pd.DataFrame:
    """``pred`` with every group column in ``cols`` it lacks, joined by bag from the cohort CSV.

    Folds write the group columns the config named when they ran; columns
    added to the config afterwards come from the CSV, read and checked as a
    run reads it (a missing value is the group ``"missing"``).
    """
    absent = [c for c in cols if c not in pred.columns]
    if not absent:
        return pred
    bags = read_cohort(cfg).bags.set_index("bag_id")
    unknown = sorted(set(pred["bag_id"]) - set(bags.index))
    if unknown:
        raise DataError(
            f"{cfg.data.csv}: bag {unknown[0]} of the run's predictions is not in the cohort "
            f"CSV, so its {absent[0]!r} value is unknown; was the CSV changed after the run?"
        )
    out = pred.copy()
    for col in absent:
        out[col] = bags.loc[out["bag_id"], col].to_numpy()
    return out


def format_summary(summary: dict[str, Any]) -> str:
    """A plain-text table: metric, mean ± sd over folds, pooled bootstrap 95% CI.

    P-values (``*_p``) are not averaged: the line shows their median and range
    over folds, and the pooled test where the run has one (``<name>_pooled``).
    Settings that vary by fold (``*_tau``, Uno's truncation time; the operating threshold)
    show their range.
    """
    lines = [
        f"{summary['name']}  ({summary['task']}, model {summary['model']}, "
        f"{len(summary['folds'])}/{summary['n_folds_expected']} folds)"
    ]
    lines.append(f"  {'metric':<20} {'mean ± sd':>17}   95% CI (pooled bootstrap)")
    for k, m in summary["metrics"].items():
        folds = np.array([v for v in m.get("folds", []) if v is not None], float)
        if is_p_value(k):
            span = f"{p_value(folds.min())} to {p_value(folds.max())}" if len(folds) else MISSING
            med = p_value(np.median(folds)) if len(folds) else MISSING
            pooled = summary.get(f"{k}_pooled")
            tail = f"; pooled over folds {p_value(pooled)}" if pooled is not None else ""
            lines.append(f"  {k:<20} median {med} over folds, range {span}{tail}")
            continue
        if is_horizon(k) or k in SETTINGS:
            span = f"lowest {folds.min():.3g}, highest {folds.max():.3g}" if len(folds) else MISSING
            what = SETTINGS.get(k, "a time horizon")
            lines.append(f"  {k:<20} per fold {span} ({what}, not a metric)")
            continue
        ci_s = interval(m.get("ci95_pooled")) if gets_ci(k) else ""
        lines.append(f"  {k:<20} {mean_sd(m['mean'], m['sd']):>17}   {ci_s}".rstrip())
    if summary.get("search"):
        lines.append(f"  search: {average_words(summary['search'])}")
    if summary.get("diagnostics"):
        lines.append("  training diagnostics (see history.csv of the folds named):")
        lines += [f"    {line}" for line in summarize_findings(summary["diagnostics"])]
    if summary.get("subgroups"):
        metric = (headline_metrics(summary["task"]) or ("auc",))[0]
        lines.append(f"  subgroups (pooled out-of-fold {metric}, 95% bootstrap CI; subgroups.csv):")
        for r in summary["subgroups"]:
            est = value_ci(r.get(metric), (r.get(f"{metric}_ci_low"), r.get(f"{metric}_ci_high")))
            name = "all" if r["column"] == "all" else f"{r['column']}={r['value']}"
            lines.append(
                f"    {name:<24} {r['n_bags']:>5} bags {r['n_patients']:>5} patients   {est}"
            )
        for t in summary.get("subgroup_tests", []):
            if t["p"] is None:
                lines.append(
                    f"    {t['column']}: fewer than two groups define {t['metric']}; not tested"
                )
            else:
                lines.append(
                    f"    {t['column']}: groups differ in {t['metric']} by up to {t['range']:.3f}, "
                    f"permutation {p_phrase(t['p'])} ({t['n_perm']} permutations)"
                )
    return "\n".join(lines)
