"""``report.md``: a run's methods, results, figures and subgroups, in words a paper can adapt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mil.config import Config, other_preprocessing
from mil.io import atomic_path, json_float
from mil.models.base import DEFAULT_SCORE_KIND, SCORE_KINDS, SURVIVAL_SCORE_KIND
from mil.models.registry import get as get_model
from mil.reporting import (
    MISSING,
    SETTINGS,
    gets_ci,
    interval,
    mean_sd,
    number,
    p_phrase,
    p_value,
    value_ci,
)
from mil.results import BASELINES, HEATMAPS, REPORT, RunFolder
from mil.results.members import ensemble_lines, selection_lines
from mil.results.search import search_section
from mil.tasks import Task, make_task

MAX_HEATMAPS = 6


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.md`` from the run's ``config.yaml``, ``summary.json`` and fold
    folders (``summarize`` calls it; call it again after adding ``heatmaps/*.png``)."""
    run = RunFolder(run_dir)
    cfg = run.read_config()
    summary = run.summary()
    records = list(run.records().values())
    task = make_task(cfg, records[0].get("classes", []) if records else [])
    lines = [f"# {cfg.name}: {task.title()} with `{cfg.model_name}`", ""]
    n_done, n_expected = len(summary["folds"]), summary["n_folds_expected"]
    if n_done < n_expected:
        lines += [f"**Partial run: {n_done} of {n_expected} folds finished.**", ""]
    lines += ["## Methods", "", _methods(cfg, task, summary), ""]
    lines += ["## Results", "", *_results(summary, task), ""]
    lines += ensemble_lines(summary)
    lines += selection_lines(summary)
    lines += search_section(run.path)
    figures = [(f, t) for f, t in task.figure_captions.items() if run.file(f).is_file()]
    heatmaps = sorted(run.file(HEATMAPS).glob("*.png"))[:MAX_HEATMAPS]
    if figures or heatmaps:
        lines += ["## Figures", ""]
        for f, title in figures:
            lines += [f"![{title}]({f})", "", f"*{title}*", ""]
        if heatmaps:
            lines += [heatmap_caption(), ""]
            lines += [f"![{p.stem}](heatmaps/{p.name})" for p in heatmaps] + [""]
    if summary.get("diagnostics"):
        lines += ["## Training diagnostics", "", *_diagnostics(summary), ""]
    if run.file(BASELINES).is_file():
        lines += [
            "## Against linear baselines",
            "",
            *_baselines(run.file(BASELINES), cfg, task),
            "",
        ]
    if summary.get("subgroups"):
        lines += ["## Sites and subgroups", "", *subgroup_lines(summary, task), ""]
    lines += ["## Per fold", "", *_per_fold(records, task), ""]
    lines += [
        "## Files",
        "",
        "`config.yaml` (the resolved config), `splits/` (the split files used), "
        "`summary.json` / `summary.csv`, and per fold `fold_<k>/`: `predictions.csv`, "
        "`metrics.json`, `history.csv`, `attention.h5` (instance scores), `model.pt`.",
        "",
    ]
    path = run.file(REPORT)
    with atomic_path(path) as tmp:
        Path(tmp).write_text("\n".join(lines))
    return path


#: ``data.standardize`` in the methods paragraphs (each fold fits its own)
PREPROCESSING = {
    "whiten": "whitened (ZCA) with the instance covariance of each training fold, shrunk towards "
    "a multiple of the identity by the Ledoit-Wolf estimate (at least 0.3)",
    True: "standardised with the mean and standard deviation of each training fold",
}


def _design_words(cfg: Config, task: Task, summary: dict[str, Any]) -> list[str]:
    """The cohort and the cross-validation design, in words."""
    s, d = cfg.splits, cfg.data
    n_bags, n_patients = summary["n_bags"], summary["n_patients"]
    if d.instances:
        parts = [f"{n_bags} bags of instances (table {Path(d.instances).name}) were analysed."]
    else:
        if d.bag_level == "slide":
            parts = [
                f"Bags of tile features of {n_bags} slides from {n_patients} patients were analysed."
            ]
        else:
            parts = [
                f"Bags of tile features of {n_patients} patients (each patient's slides "
                f"concatenated into one bag) were analysed."
            ]
    if s.assignment:
        cv = f"{s.folds}-fold cross-validation with the test folds of {Path(s.assignment).name}"
    else:
        strat = task.strata_description
        group = (
            f"site-preserved folds (all patients of a site, column `{d.site_col}`, in one test fold)"
            if s.by_site
            else "patient-level folds (a patient's slides never in two partitions)"
        )
        cv = f"{s.folds}-fold cross-validation with {group}, stratified by {strat} (scikit-learn `StratifiedGroupKFold`, seed {s.seed})"
    if s.repeats > 1:
        cv += f", repeated {s.repeats} times"
    parts.append(cv + ".")
    return parts


def _methods(cfg: Config, task: Task, summary: dict[str, Any]) -> str:
    s, t, d = cfg.splits, cfg.train, cfg.data
    n_boot = summary["n_boot"]
    parts = _design_words(cfg, task, summary)
    if s.val_fraction > 0 and t.patience is not None:
        parts.append(
            f"In each fold, {s.val_fraction:.0%} of the training patients formed an inner validation set "
            f"for early stopping on the validation {_criterion(task, t.stop_on)} (patience {t.patience} "
            f"epochs, at most {t.epochs}, at least {t.min_epochs}); the weights of the best validation "
            "epoch were restored."
        )
    else:
        parts.append(f"Models were trained for a fixed {t.epochs} epochs, without early stopping.")
    closed_form = not get_model(cfg.model_name).trained_by_gradient
    if closed_form:  # the linear baselines: no training loop, no feature preprocessing
        parts.append(
            f"Model: `{cfg.model_name}`, a linear head on each bag's pooled features (standardised "
            "with training-fold statistics), fitted in closed form (scikit-learn / scikit-survival) "
            "with the penalty chosen by the validation loss."
        )
    elif "data.standardize" in cfg.search:  # the folds may have chosen differently
        options = [
            "raw features" if not v else f"features {PREPROCESSING[v]}"
            for v in cfg.search["data.standardize"]
        ]
        parts.append(
            f"The feature preprocessing was chosen in each fold by the hyper-parameter search "
            f"(below) among {', '.join(options)}."
        )
    elif d.standardize:
        parts.append(f"Features were {PREPROCESSING[d.standardize]}.")
    if not closed_form:
        hp = ", ".join(f"{k} {v}" for k, v in cfg.model_hparams.items())
        parts.append(
            f"Aggregator: `{cfg.model_name}`{f' ({hp})' if hp else ''}. Optimiser: {t.optimizer} "
            f"(learning rate {t.lr:g}, weight decay {t.weight_decay:g}), {_batch_words(t)} per step"
            + (
                f", {t.subsample} random tiles per bag per step (full bags at test)"
                if t.subsample
                else ""
            )
            + "."
        )
        if t.min_steps or t.schedule != "constant" or t.warmup_steps:
            parts.append(_budget_words(t))
    if not closed_form:
        parts += _ensemble_words(cfg, task)
    others = [f"`{k}`" for k in cfg.search if k != "data.standardize"]
    if others:
        parts.append(
            f"{', '.join(others)} {'was' if len(others) == 1 else 'were'} chosen in each fold by "
            "the hyper-parameter search (below); the values above are the config's own."
        )
    parts.append(task.methods())
    parts.append(
        "Results are the mean and standard deviation over test folds, and percentile-bootstrap 95% "
        f"confidence intervals ({n_boot:,} resamples of patients) of the pooled out-of-fold predictions."
    )
    return " ".join(parts)


def _ensemble_words(cfg: Config, task: Task) -> list[str]:
    """The methods' sentences on seed replicas (``train.seeds``) and linear members."""
    out = []
    if cfg.train.seeds > 1:
        out.append(
            f"Each fold trained {cfg.train.seeds} copies of the model from different seeds (initial "
            "weights, batch order, dropout); their outputs and instance scores were averaged."
        )
    if cfg.members:
        out.append(
            f"In each fold the model was averaged with {', '.join(f'`{m}`' for m in cfg.members)} "
            f"fitted on the same training bags ({task.averaging_words()}, equal weights); the "
            "heatmaps show the model's own instance scores."
        )
    if cfg.select.mode == "inner":
        alone = ", ".join(f"`{m}`" for m in cfg.select.members)
        alt = other_preprocessing(cfg)
        other = ""
        if alt is not None:
            what = "raw features" if alt[1] is False else "whitened features"
            other = f", the model alone on {what} (`{alt[0]}`)"
        out.append(
            f"Each fold chose, on {cfg.select.folds} stratified patient-level inner folds of its "
            f"own training bags (its test bags took no part), between the recipe above, the model "
            f"alone{other} or {alone} alone, by the inner {task.headline()}: the default was kept unless "
            "another candidate's mean gain exceeded one standard error of its inner-fold "
            "differences; each fold's choice is tabulated below."
        )
    return out


def _criterion(task: Task, stop_on: str) -> str:
    """``train.stop_on`` in words: "loss", or the metric (highest kept)."""
    column, _ = task.stop_criterion(stop_on)
    return "loss" if column == "val_loss" else f"{column.removeprefix('val_')} (the highest kept)"


def heatmap_caption() -> str:
    """What the heatmaps show, and what they do not."""
    kind, survival = DEFAULT_SCORE_KIND, SURVIVAL_SCORE_KIND
    return (
        f"Heatmaps of test slides (`mil heatmap`): each tile coloured by its `{kind}` score "
        f"(the default, chosen by the localization benchmark: {SCORE_KINDS[kind]}), as a "
        f"percentile within its slide (survival: `{survival}`, signed: red raises and blue "
        "lowers the risk). "
        "Bright tiles are those the model's evidence for the class rests on; that is not a "
        "segmentation of the lesion, and a tile can score high for a correlate of the label. "
        f"Against annotated tiles: `witness_auc_{kind}` above, where the features carry "
        f"instance labels; without labels, `deletion_{kind}` (the prediction without the "
        "top-scored tiles; lower than `deletion_random` means the top tiles carry it)."
    )


def ordered_metrics(keys, task: Task) -> list[str]:
    keys = list(keys)
    lead = task.report_metrics
    return [k for k in lead if k in keys] + sorted(k for k in keys if k not in lead)


def _results(summary: dict[str, Any], task: Task) -> list[str]:
    metrics = summary["metrics"]
    repeats = any("sem_over_repeats" in m for m in metrics.values())
    head = [
        "metric",
        "mean ± sd over folds",
        *(["mean ± SEM over repeats"] if repeats else []),
        "95% CI (pooled bootstrap)",
    ]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in ordered_metrics(metrics, task):
        if not gets_ci(k):  # p-values, time horizons and timings: not a score
            continue
        m = metrics[k]
        cells = [k, mean_sd(m["mean"], m["sd"])]
        if repeats:
            cells.append(
                mean_sd(np.mean([json_float(v) for v in m["repeat_means"]]), m["sem_over_repeats"])
                if "repeat_means" in m
                else MISSING
            )
        cells.append(interval(m.get("ci95_pooled")) or MISSING)
        rows.append("| " + " | ".join(cells) + " |")
    out = rows
    for k in (k for k in SETTINGS if k in metrics):  # chosen per fold: its range, no mean
        folds = [json_float(v) for v in metrics[k].get("folds", []) if v is not None]
        if folds:
            span = f"lowest {number(min(folds))}, highest {number(max(folds))}"
            out += ["", f"{SETTINGS[k].capitalize()}: {span} over folds (not a score)."]
    if isinstance(summary.get("auc_pooled"), float):
        out += ["", f"Pooled out-of-fold AUC: {number(summary['auc_pooled'])}."]
    if "logrank_p" in metrics:
        ps = [v for v in metrics["logrank_p"]["folds"] if v is not None and np.isfinite(v)]
        pooled = summary.get("logrank_p_pooled")
        pooled_s = (
            f"pooled over folds {p_phrase(pooled)}"
            if pooled is not None and np.isfinite(pooled)
            else ""
        )
        if ps:
            text = (
                f"median {p_phrase(np.median(ps))} over folds (range {p_value(min(ps))} to "
                f"{p_value(max(ps))})" + (f"; {pooled_s}" if pooled_s else "")
            )
        else:
            text = "undefined in every fold" + (f"; {pooled_s}" if pooled_s else "")
        out += ["", f"Log-rank test of high- vs low-risk test patients: {text}."]
    per_epoch = number(metrics.get("seconds_per_epoch", {}).get("mean"), 2)
    if per_epoch != MISSING:
        out += ["", f"Training took {per_epoch} s per epoch on average."]
    return out


def subgroup_lines(
    summary: dict[str, Any],
    task: Task,
    source: str = "Pooled out-of-fold predictions of each group (first repeat)",
) -> list[str]:
    """The markdown table of ``summary["subgroups"]`` (and its tests); ``source`` says
    which predictions the groups hold."""
    rows = summary["subgroups"]
    count_keys = [k for k in rows[0] if k.startswith("n_") and k not in ("n_bags", "n_patients")]
    metric_keys = [
        k
        for k in ordered_metrics(rows[0], task)
        if f"{k}_ci_low" in rows[0] and not k.startswith("n_")
    ]
    head = ["group", "bags", "patients", *count_keys, *metric_keys]
    out = [
        f"{source}, with patient-bootstrap 95% CIs; {MISSING} where a group cannot define the "
        "metric (e.g. one class).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        name = "all" if r["column"] == "all" else f"{r['column']} = {r['value']}"
        cells = [name, str(r["n_bags"]), str(r["n_patients"]), *(str(r[k]) for k in count_keys)]
        for k in metric_keys:
            cells.append(value_ci(r.get(k), (r.get(f"{k}_ci_low"), r.get(f"{k}_ci_high"))))
        out.append("| " + " | ".join(cells) + " |")
    tests = [t for t in summary.get("subgroup_tests", []) if t["p"] is not None]
    if tests:
        out += [
            "",
            "Differences between groups (permutation test of the range of the "
            "groups' metric; group labels shuffled among patients within outcome strata):",
            "",
        ]
        out += [
            f"- {t['column']}: {t['metric']} differs by up to {t['range']:.3f} across "
            f"{t['groups']} groups, {p_phrase(t['p'])} ({t['n_perm']} permutations)"
            for t in tests
        ]
    return out


def _per_fold(records: list[dict], task: Task) -> list[str]:
    lead = task.report_metrics
    keys = [
        k for k in ordered_metrics(records[0]["metrics"], task) if k in lead or k == "witness_auc"
    ]
    head = ["fold", "train", "val", "test", "epochs", *keys]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        m = r["metrics"]
        cells = [
            str(r["fold"]),
            str(r["n_train"]),
            str(r["n_val"]),
            str(r["n_test"]),
            str(m.get("epochs", "")),
        ]
        cells += [number(m.get(k)) for k in keys]
        out.append("| " + " | ".join(cells) + " |")
    return out


def _diagnostics(summary: dict[str, Any]) -> list[str]:
    return [
        "Some folds may not have trained well (`history.csv` of each fold has the curves):",
        "",
        *(f"- fold {f['fold']}, {f['kind']}: {f['message']}" for f in summary["diagnostics"]),
    ]


def _baselines(path: Path, cfg: Config, task: Task) -> list[str]:
    table = pd.read_csv(path)
    lines = [
        f"The same folds with linear models on pooled bags (`mil train --baseline`; "
        f"`baselines/<name>/` holds each run). `{cfg.model_name}` minus the baseline on the "
        "pooled out-of-fold predictions, with a paired patient-bootstrap 95% CI and p:",
        "",
        "| baseline | metric | baseline | this run | difference [95% CI] | p |",
        "|---|---|---|---|---|---|",
    ]
    for r in table.itertuples():
        lines.append(
            f"| `{r.baseline}` | {r.metric} | {number(r.baseline_value)} | {number(r.model_value)} | "
            f"{value_ci(r.delta, (r.delta_ci_low, r.delta_ci_high), signed=True)} | "
            f"{p_value(r.delta_p)} |"
        )
    lines += [
        "",
        "`meanpool_linear`: the mean of the bag's features; `bow_linear`: a histogram over a "
        "k-means codebook of training-fold instances; each standardised, then "
        f"{task.linear_words or 'the linear model of the task'}, the penalty chosen on the "
        "validation bags. A difference whose CI holds 0 says the MIL model did not earn its "
        "keep over a linear model on this cohort.",
    ]
    return lines


def _batch_words(t) -> str:
    """The loss batches in words: their size (``auto``: from the rarest class) and sampler."""
    size = (
        "ceil(3 / share of the rarest class) bags (16 to 48, nnMIL's rule)"
        if t.batch_size == "auto"
        else f"{t.batch_size} bag{'s' if t.batch_size > 1 else ''}"
    )
    if t.sampler == "balanced":
        size += " with every class (survival: events and censored) in equal number"
    elif t.sampler == "auto":
        size += (
            " (classification: every class in equal number in a fold whose commonest training "
            "class outnumbered its rarest 5:1 or more; shuffled otherwise)"
        )
    return size


def _budget_words(t) -> str:
    words = []
    if t.min_steps:
        words.append(
            f"at least {t.min_steps} optimizer steps per fold (more epochs where a fold needed them)"
        )
    if t.warmup_steps:
        words.append(f"a linear learning-rate warm-up over {t.warmup_steps} steps")
    if t.schedule == "cosine":
        words.append("cosine decay of the learning rate to 0 over the fold's steps")
    return "Training used " + ", ".join(words) + "."
