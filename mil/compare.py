"""Run several aggregators through the same cross-validation and tabulate them.

``mil compare CONFIG [--models a,b]`` takes one config (cohort, task, splits,
training) and runs it once per model, each into ``<out>/<label>/`` on the
*same* split files, then writes ``<out>/comparison.csv`` and
``comparison.md``: per model its parameter count, the task's metrics as
mean ± sd over folds, ``witness_auc`` where the features carry instance
labels, and training seconds per epoch; and, for every run, its pooled
out-of-fold AUC or C-index minus a reference run's with a paired
patient-bootstrap 95% CI and p (``--reference``; default the best mean).

The models come from the config's ``compare:`` list, one entry per run::

    compare:
      - {model: {name: abmil, gated: true}}
      - {model: {name: transmil, dim: 128}, train: {subsample: 512}, label: transmil_s512}

``train`` entries override the config's ``train`` section for that model
only; ``label`` names its folder (a plain folder name) and table row (default: the model name).
``--models`` picks entries by label or model name; a registered model
without an entry runs with its default hyper-parameters. With neither,
every registered model runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mil.config import Config, derive, refuse_search
from mil.data.cohort import AVAILABILITY_COL
from mil.errors import ConfigError, DataError
from mil.io import json_float, safe_filename, write_csv, write_text
from mil.models import available
from mil.reporting import (
    MISSING,
    TIMINGS,
    finite,
    mean_sd,
    metric_label,
    number,
    p_phrase,
    value_ci,
)
from mil.results import BASELINE_RUNS, BASELINES, MODEL, RunFolder
from mil.tasks import get as get_task
from mil.tasks import headline_metrics
from mil.tasks.paired import paired_metric_difference

ENTRY_KEYS = {"model", "train", "label", "task"}
#: comparison-table column suffix -> key of :func:`~mil.tasks.paired.paired_metric_difference`
DELTA_KEYS = {"": "delta", "_ci_low": "ci_low", "_ci_high": "ci_high", "_p": "p"}


def entries(cfg: Config, models: list[str] | None = None) -> list[dict[str, Any]]:
    """The runs to make: the config's ``compare`` entries, filtered or completed by ``models``."""
    listed = []
    for i, e in enumerate(cfg.compare):
        where = f"{cfg.source}: compare[{i}]"
        if not isinstance(e, dict) or not isinstance(e.get("model"), dict):
            raise ConfigError(
                f"{where} must be a mapping with a 'model' mapping, e.g. {{model: {{name: abmil}}}}"
            )
        unknown = sorted(set(e) - ENTRY_KEYS)
        if unknown:
            raise ConfigError(
                f"{where}: unknown key '{unknown[0]}'; valid keys here: {', '.join(sorted(ENTRY_KEYS))}"
            )
        if "name" not in e["model"]:
            raise ConfigError(f"{where}.model: 'name' is missing")
        if not isinstance(e.get("train", {}), dict):
            raise ConfigError(f"{where}.train must be a mapping of train keys")
        if "task" in e and not (isinstance(e["task"], dict) and "type" in e["task"]):
            raise ConfigError(
                f"{where}.task must be a task section with its type, e.g. {{type: classification}}"
            )
        label = str(e.get("label", e["model"]["name"]))
        if safe_filename(label) != label:  # it names the run's folder under --out
            raise ConfigError(
                f"{where}: label {label!r} is not a plain folder name (it names the run's folder "
                f"under --out); use letters, digits, spaces, '-', '_' and '.', without '/' or a "
                f"leading '.'"
            )
        listed.append({**e, "label": label})
    labels = [e["label"] for e in listed]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ConfigError(
            f"{cfg.source}: compare: label {dup[0]!r} is used twice; give each entry its own label"
        )
    if models is None:
        return listed or [{"label": m, "model": {"name": m}} for m in available()]
    out = []
    for name in models:
        hits = [e for e in listed if e["label"] == name] or [
            e for e in listed if e["model"]["name"] == name
        ]
        if hits:
            out += hits
        elif name in available():
            out.append({"label": name, "model": {"name": name}})
        else:
            raise ConfigError(
                f"--models: {name!r} is neither a compare entry of {cfg.source} nor a registered "
                f"model; available models: {', '.join(available())}"
            )
    return out


def entry_config(cfg: Config, entry: dict[str, Any]) -> Config:
    """The plain config of one comparison run (validated like any config)."""
    changes = {"name": f"{cfg.name}_{entry['label']}", "model": dict(entry["model"])}
    changes.update({f"train.{k}": v for k, v in (entry.get("train") or {}).items()})
    if "task" in entry:  # another task on the same targets (ordinal grades as nominal classes)
        changes["task"] = dict(entry["task"])
    return derive(cfg, changes, source=f"{cfg.source}: compare entry {entry['label']!r}")


def run_compare(
    cfg: Config,
    out: str | Path | None = None,
    models: list[str] | None = None,
    folds: list[int] | None = None,
    progress: bool = True,
    log=print,
    reference: str | None = None,
    n_boot: int = 1000,
) -> pd.DataFrame:
    """Run every entry (resuming finished folds) and write the comparison table.

    With two or more runs the table also holds each run's headline metric
    minus that of ``reference`` (a label; default: the best mean over folds),
    with a paired patient-bootstrap 95% CI and p (:func:`paired_differences`).
    Under torchrun every entry is one data-parallel run; rank 0 writes the table.
    """
    from mil.train.distributed import setup
    from mil.train.runner import run_cv

    out = Path(out) if out else Path("results") / cfg.name
    refuse_search(cfg, "mil compare")
    runs = [(e["label"], entry_config(cfg, e)) for e in entries(cfg, models)]  # validate all first
    if reference is not None and reference not in [label for label, _ in runs]:
        raise ConfigError(
            f"--reference {reference}: not one of the compared runs "
            f"({', '.join(label for label, _ in runs)})"
        )
    dist, _ = setup(cfg.train.device)
    for label, sub in runs:
        if dist.main:
            log(f"== {label} ==")
        run_cv(sub, out / label, folds=folds, progress=progress, log=log)
    run_dirs = {label: out / label for label, _ in runs}
    if dist.main and len(runs) > 1:
        table = paired_comparison(run_dirs, reference, n_boot=n_boot, log=log)
    else:
        table = comparison_table(run_dirs)
    patterns = None
    if dist.main and "delta" in table.columns and cfg.data.tabular:
        reference = str(table["reference"].iloc[0])
        write_csv(out / PATTERNS_CSV, patterns := pattern_differences(run_dirs, reference, n_boot))
    if dist.main:
        write_csv(out / "comparison.csv", table)
        md = format_comparison(table, cfg) + ("" if patterns is None else format_patterns(patterns))
        write_text(out / "comparison.md", md + "\n")
    return table


def paired_comparison(
    run_dirs: dict[str, Path], reference: str | None = None, n_boot: int = 1000, log=print
) -> pd.DataFrame:
    """:func:`comparison_table` with each run's pooled headline metric (``<metric>_pooled``)
    minus that of ``reference`` (a label; default: the best mean over folds) and its paired
    CI and p (:func:`paired_differences`); without them where the runs cannot be paired
    (e.g. finished on different folds: ``log`` says why)."""
    table = comparison_table(run_dirs)
    metric = get_task(str(table["task"].iloc[0])).headline()
    if reference is None:
        best = table[f"{metric}_mean"].astype(float).fillna(-np.inf).to_numpy().argmax()
        reference = str(table["model"].iloc[best])
    try:
        diffs = paired_differences(run_dirs, reference, n_boot=n_boot)
    except DataError as err:  # e.g. runs finished on different folds: keep the table
        log(f"pairwise differences left out: {err}")
        return table
    return table.merge(
        diffs.drop(columns=["metric"]).rename(columns={"value": f"{metric}_pooled"}),
        on="model",
        how="left",
    )


PATTERNS_CSV = "comparison_patterns.csv"  # with data.tabular: Δ per availability pattern


def pattern_differences(
    run_dirs: dict[str, Path], reference: str, n_boot: int = 1000
) -> pd.DataFrame:
    """:func:`paired_differences` within each availability pattern of the tabular modalities
    (column ``modalities``: e.g. fusion minus slides only on the patients without omics)."""
    from mil.train.summary import run_predictions

    ref = run_predictions(run_dirs[reference])
    blocks = []
    for value in sorted(ref[AVAILABILITY_COL].astype(str).unique()):
        d = paired_differences(run_dirs, reference, n_boot=n_boot, where=(AVAILABILITY_COL, value))
        d.insert(0, AVAILABILITY_COL, value)
        d.insert(
            1, "n_patients", int(ref.loc[ref[AVAILABILITY_COL] == value, "patient_id"].nunique())
        )
        blocks.append(d)
    return pd.concat(blocks, ignore_index=True)


def format_patterns(patterns: pd.DataFrame) -> str:
    """The markdown section of :func:`pattern_differences`."""
    metric, ref = patterns["metric"].iloc[0], patterns["reference"].iloc[0]
    lines = [
        "",
        "",
        f"Per availability pattern (pooled {metric}; Δ vs {ref} [95% CI], same patients):",
        "",
    ]
    lines += [f"| modalities | patients | model | {metric} | Δ [95% CI] |", "|---|---|---|---|---|"]
    for r in patterns.to_dict("records"):
        d = value_ci(r["delta"], (r["delta_ci_low"], r["delta_ci_high"]), signed=True)
        lines.append(
            f"| {r[AVAILABILITY_COL]} | {r['n_patients']} | {r['model']} | {number(r['value'])} | "
            f"{'reference' if r['model'] == ref else d} |"
        )
    return "\n".join(lines)


def run_baselines(
    cfg: Config,
    run_dir: str | Path,
    names: list[str],
    folds: list[int] | None = None,
    progress: bool = True,
    log=print,
    n_boot: int = 1000,
) -> pd.DataFrame:
    """The run against linear baselines on its own split files (``mil train --baseline``).

    Each baseline (a registered model, e.g. ``meanpool_linear``) runs into
    ``<run>/baselines/<name>/`` on the run's split files; ``<run>/baselines.csv`` then
    holds, per baseline, its pooled headline metric and the run's minus it with a
    paired patient-bootstrap 95% CI and p (:func:`paired_differences`), and the
    run's ``report.md`` gets a section on it. Resumes like ``mil train``.
    """
    from mil.train.report import write_report
    from mil.train.runner import run_cv

    run_dir = Path(run_dir)
    split_dir = str(cfg.splits.dir or RunFolder(run_dir).splits_dir)  # the run's own split files
    rows = []
    for name in names:
        entry = {"label": name, "model": {"name": name}}
        sub = entry_config(cfg, entry)
        sub.splits.dir = split_dir  # the run's own split files
        log(f"== baseline {name} ==")
        out = run_cv(sub, run_dir / BASELINE_RUNS / name, folds=folds, progress=progress, log=log)
        diffs = paired_differences({"model": run_dir, name: out}, name, n_boot=n_boot)
        d = diffs.set_index("model")
        rows.append(
            {
                "baseline": name,
                "metric": d.loc[name, "metric"],
                "baseline_value": d.loc[name, "value"],
                "model_value": d.loc["model", "value"],
                "delta": d.loc["model", "delta"],
                "delta_ci_low": d.loc["model", "delta_ci_low"],
                "delta_ci_high": d.loc["model", "delta_ci_high"],
                "delta_p": d.loc["model", "delta_p"],
            }
        )
    table = pd.DataFrame(rows)
    path = run_dir / BASELINES
    old = pd.read_csv(path) if path.is_file() else None
    if old is None or not old.round(10).equals(table.round(10)):  # a no-op rerun writes nothing
        write_csv(path, table)
        write_report(run_dir)
    return table


def n_parameters(run_dir: Path) -> int | None:
    """Trainable parameters of the model saved in the run's first finished fold."""
    from mil.results.checkpoint import load_model

    run = RunFolder(run_dir)
    done = list(run.records())
    if not done:
        return None
    model, _ = load_model(run.fold_file(done[0], MODEL))
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


def comparison_table(run_dirs: dict[str, Path]) -> pd.DataFrame:
    """One row per run: parameters, metric mean/sd over folds, seconds per epoch."""
    rows = []
    for label, run_dir in run_dirs.items():
        summary = RunFolder(run_dir).summary()
        m = summary["metrics"]
        row: dict[str, Any] = {
            "model": label,
            "name": summary["model"],
            "task": summary["task"],
            "folds": len(summary["folds"]),
            "params": n_parameters(Path(run_dir)),
        }
        for k in [*headline_metrics(summary["task"]), "witness_auc"]:
            if k in m:
                row[f"{k}_mean"], row[f"{k}_sd"] = json_float(m[k]["mean"]), json_float(m[k]["sd"])
        for k in TIMINGS:
            if k in m:
                row[k] = json_float(m[k]["mean"])
        rows.append(row)
    return pd.DataFrame(rows)


def paired_differences(
    run_dirs: dict[str, Path],
    reference: str,
    n_boot: int = 1000,
    seed: int = 0,
    where: tuple[str, str] | None = None,
) -> pd.DataFrame:
    """Every run's headline metric minus the reference run's, on the same out-of-fold bags.

    The metric is the task's first (``auc``; ``c_index``) computed as the run
    summary pools it: over the out-of-fold predictions of every finished fold
    (every repeat), survival pairs compared within a fold. Both runs' rows are
    matched by fold and bag and resampled together, whole patients at a time
    (:func:`mil.metrics.paired_difference`), which gives a 95% CI of the
    difference and a two-sided bootstrap p. One row per run: ``model``,
    ``reference``, ``metric``, ``value`` (pooled), ``delta``, ``delta_ci_low``,
    ``delta_ci_high``, ``delta_p`` (the reference's own row: delta 0, p NaN). ``where``
    ``(column, value)``: only the predictions whose column has that value.
    """
    from mil.train.summary import run_predictions, run_task

    task = run_task(run_dirs[reference])
    metric = task.headline()

    def rows_of(run_dir: Path) -> pd.DataFrame:
        p = run_predictions(run_dir)
        return p if where is None else p[p[where[0]].astype(str) == where[1]]

    ref = rows_of(run_dirs[reference])
    rows = []
    for label, run_dir in run_dirs.items():
        row: dict[str, Any] = {"model": label, "reference": reference, "metric": metric}
        if label == reference:
            row["value"] = task.metric_value(ref, metric)
            row.update(delta=0.0, delta_ci_low=0.0, delta_ci_high=0.0, delta_p=float("nan"))
        else:
            d = paired_metric_difference(
                task,
                rows_of(run_dir),
                ref,
                metric,
                n_boot=n_boot,
                seed=seed,
                names=(f"{run_dir}: its out-of-fold predictions", f"{run_dirs[reference]}'s"),
                hint="; finish both runs on the same split files",
            )
            row["value"] = d["value"]
            row.update({f"delta{s}": d[k] for s, k in DELTA_KEYS.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def format_comparison(table: pd.DataFrame, cfg: Config | None = None) -> str:
    """A markdown table of :func:`comparison_table`."""
    metrics = [c[: -len("_mean")] for c in table.columns if c.endswith("_mean")]
    head = ["model", "params"] + [f"{k} (mean ± sd)" for k in metrics]
    head += [*(metric_label(k) for k in TIMINGS), "folds"]
    lines = []
    if cfg is not None:
        lines.append(
            f"{cfg.name}: {cfg.task.type}, {cfg.splits.folds}-fold CV"
            f"{f' x {cfg.splits.repeats}' if cfg.splits.repeats > 1 else ''}, the same splits for every model\n"
        )
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def params(v) -> str:
        return MISSING if finite(v) is None else f"{int(v):,}"

    paired = "delta" in table.columns
    if paired:
        reference = str(table["reference"].iloc[0])
        metric = [k for k in metrics if f"{k}_pooled" in table.columns][0]
        head.insert(2 + len(metrics), f"{metric} pooled: Δ vs {reference} [95% CI], p")
        lines[-2:] = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def delta(r) -> str:
        pooled = number(r.get(f"{metric}_pooled"))
        if r["model"] == reference:
            return f"{pooled} (reference)"
        if finite(r.get("delta")) is None:
            return pooled
        d = value_ci(r["delta"], (r["delta_ci_low"], r["delta_ci_high"]), signed=True)
        return f"{pooled}: {d}, {p_phrase(r['delta_p'])}"

    for r in table.to_dict("records"):
        cells = [r["model"], params(r.get("params"))]
        cells += [mean_sd(r.get(f"{k}_mean"), r.get(f"{k}_sd")) for k in metrics]
        if paired:
            cells.append(delta(r))
        cells += [
            number(r.get("seconds_per_epoch"), 2),
            number(r.get("train_seconds"), 0),
            str(r["folds"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if paired:
        lines += [
            "",
            f"Δ: the run's {metric} over its pooled out-of-fold predictions minus {reference}'s, "
            "on the same bags; 95% CI and two-sided p from a paired bootstrap over patients "
            "(both runs resampled together). Several runs against one reference: read p with "
            "a multiple-comparison correction in mind.",
        ]
    return "\n".join(lines)
