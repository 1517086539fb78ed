"""``mil evaluate``: a finished run's fold ensemble on an external cohort, scored as the run
is, with the generalization gap to the run's own out-of-fold metrics.

The evaluation folder (``--out``) is shaped like a run's top level; every file
is written atomically::

    predictions.csv          one row per bag: ids, outcome, the ensemble's outputs, n_folds, groups
    predictions_patient.csv  where the run's folds write one
    summary.json             metrics (value and ci95_pooled), n_bags, n_patients, gap, run, cohort
    report.md                methods, results, the gap, figures, sites and subgroups
    subgroups.csv            with site / subgroup columns; and the task's figures (roc.png, km.png)
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mil.config import Config, config_from_dict, read_yaml_mapping
from mil.data.cohort import Cohort, class_names, read_cohort_csv
from mil.data.dataset import FeatureStore
from mil.data.provenance import compare_provenance
from mil.data.sources import load_cohort
from mil.data.tabular import TabularTable
from mil.errors import ConfigError, DataError, MilError, MilWarning
from mil.io import write_csv, write_json
from mil.results import (
    CONFIG,
    MODEL,
    PREDICTIONS,
    PREDICTIONS_PATIENT,
    REFIT,
    REPORT,
    SUBGROUPS,
    SUMMARY_JSON,
    write_artifacts,
)
from mil.run import Run
from mil.tasks import Task, make_task
from mil.train.external_report import predictor_words, write_external_report
from mil.train.gaps import generalization_gap
from mil.train.inference import FoldModel, ensemble
from mil.train.refit import read_refit
from mil.train.summary import subgroup_results

#: the fold name of the ensemble's predictions (one "fold": every bag scored by one predictor)
ENSEMBLE = "ensemble"


def evaluate(
    run_dir: str | Path,
    cohort_config: str | Path,
    out: str | Path,
    n_boot: int = 1000,
    device: str = "cpu",
    progress: bool = False,
    refit: bool = False,
    any_encoder: bool = False,
) -> dict[str, Any]:
    """Predict every bag of an external cohort with the fold ensemble of ``run_dir`` (or,
    ``refit=True``, its model refit on every bag: ``mil train --refit``) and write
    its evaluation into ``out``; returns what ``summary.json`` holds.

    ``cohort_config``: a mil config YAML whose ``data:`` section describes the
    cohort (CSV, features, label or time/event columns, patient, site and
    subgroup columns); model and training come from the run. The prediction
    of a bag is the mean of the fold models' outputs, each model applying the
    feature preprocessing of its own training fold (as :meth:`mil.Run.predict`).
    Before anything is predicted or written, a :class:`MilError` refuses
    another task type, a class the run never saw, missing feature files,
    features of another dimension than the run's, and features whose files
    name an encoder the training cohort's never do (``any_encoder=True`` lets
    them through with a warning); other provenance differences
    (magnification, tile size, dtype) are warned.
    """
    run = Run(run_dir)
    out = _check_out(Path(out), run)
    cfg = cohort_config_of(run, cohort_config)
    task = make_task(cfg, run.classes)
    task.fold_name = ENSEMBLE
    task.ensemble_operating_point([r["metrics"] for r in run.folder.records().values()])
    models = [FoldModel(run.folder.fold_file(f, MODEL), run.config, f, device) for f in run.folds]
    if not models:
        raise MilError(f"{run.path}: no finished folds (fold_*/metrics.json) to predict with")
    refit_record = None
    if refit:
        refit_record = read_refit(run.path)
        models = [FoldModel(run.folder.fold_file(REFIT, MODEL), run.config, REFIT, device)]
    internal = run.folder.all_predictions()  # the run's out-of-fold predictions, for the gap
    cohort, store = _load_cohort(cfg, run, int(models[0].payload["in_dim"]), progress)
    provenance, differences = compare_provenance(run.config, cfg)
    _check_encoder(provenance, cohort_config, any_encoder)  # refused; other fields warned
    for message in differences:
        warnings.warn(message, MilWarning, stacklevel=2)
    pred = ensemble_predictions(task, models, cohort, store)
    reference = _reference(run, task, models)
    summary, artifacts = _score(run, cfg, task, pred, reference, internal, n_boot)
    summary["predictor"] = "refit" if refit else "ensemble"
    if refit_record is not None:
        summary["refit"] = refit_record
    summary["provenance"] = provenance  # of the files of both cohorts, field -> value -> count
    subgroups = None
    if cohort.group_cols:
        subgroups, entries = subgroup_results(task, pred, cohort.group_cols, n_boot)
        summary.update(entries)
    _write(out, run, cfg, task, pred, summary, artifacts, subgroups)
    return summary


# ---- the cohort, checked --------------------------------------------------------------------


def cohort_config_of(run: Run, path: str | Path) -> Config:
    """The run's config with the ``data:`` section of the YAML at ``path``.

    The YAML's ``task.type``, where given, must be the run's. Bags are made at
    the run's ``data.bag_level`` and labels read as the run's classes (in its
    order); the features are preprocessed by each fold model as it saved.
    """
    raw = read_yaml_mapping(path, "cohort config")
    run_type = run.config.task.type
    task = raw.get("task")
    given = task.get("type") if isinstance(task, dict) else None
    if given is not None and given != run_type:
        raise ConfigError(
            f"{path}: task.type is {given!r}, but {run.path} is a {run_type} run; evaluate it on "
            f"a {run_type} cohort (or fix task.type)"
        )
    data = raw.get("data")
    if not isinstance(data, dict) or not data:
        raise ConfigError(
            f"{path}: no data: section; it describes the external cohort (data.csv, "
            f"data.features, its label or time/event columns)"
        )
    level = run.config.data.bag_level
    if data.get("bag_level", level) != level:
        raise ConfigError(
            f"{path}: data.bag_level is {data['bag_level']!r}, but the run's models were trained "
            f"on {level}-level bags; leave the key out or set it to {level!r}"
        )
    full = run.config.to_dict()
    for key in ("compare", "search"):
        full.pop(key, None)
    full["data"] = {
        **data,
        "bag_level": level,
        "standardize": run.config.data.standardize,
        "classes": list(run.classes) or None,
    }
    return config_from_dict(full, source=str(path))


def _check_encoder(provenance: dict, where, allowed: bool) -> None:
    """Refuse an external cohort whose files name an encoder no training file names (both
    must name one); the same dimension does not make two encoders' features comparable."""
    train = set(provenance.get("run", {}).get("encoder", {}))
    other = set(provenance.get("cohort", {}).get("encoder", {})) - train
    if train and other and not allowed:
        raise DataError(
            f"{where}: the external cohort's features were made by encoder "
            f"{', '.join(sorted(map(str, other)))}, the run's training features by "
            f"{', '.join(sorted(map(str, train)))}; a model predicts another encoder's features "
            f"without failing but meaninglessly. Extract the cohort with the run's encoder "
            f"(or, if the names differ but the encoder is the same, pass --any-encoder)"
        )


def _check_out(out: Path, run: Run) -> Path:
    if out.exists() and not out.is_dir():
        raise MilError(f"--out {out}: a file; name a folder for the evaluation")
    if out.resolve() == run.path.resolve() or (out / CONFIG).is_file():
        raise MilError(
            f"--out {out}: a run folder (it holds {CONFIG}); write the evaluation into a folder "
            f"of its own, e.g. {run.path / 'external'}"
        )
    return out


def _check_classes(cfg: Config, classes: list[str]) -> None:
    """Refuse a label of the cohort CSV that is none of the run's classes, naming it."""
    d = cfg.data
    if cfg.task.target_kind != "label" or not classes or d.instances or not d.csv:
        return
    df = read_cohort_csv(d.csv, d.slide_col)
    if d.label_col not in df.columns:
        return  # the cohort's own check names the missing column
    names = class_names(df[d.label_col].dropna(), d.class_aliases)
    unknown = sorted(set(names) - set(classes))
    if unknown:
        row = names.index[names == unknown[0]][0]
        slide = df.at[row, d.slide_col] if d.slide_col in df.columns else row
        raise DataError(
            f"{d.csv}: class {unknown[0]!r} (column {d.label_col!r}, slide {slide}) is not one "
            f"the run was trained on; its classes are {classes}. Relabel the cohort, name it "
            f"as an alias (data.class_aliases: {{{classes[0]}: [{unknown[0]}]}}), or leave those "
            f"slides out"
        )


def _load_cohort(cfg: Config, run: Run, in_dim: int, progress: bool) -> tuple[Cohort, FeatureStore]:
    """The cohort and its features (read), refused as described in :func:`evaluate`."""
    _check_classes(cfg, run.classes)
    cohort, store = load_cohort(cfg)  # missing feature files: the runner's message
    slides = cohort.slides["slide_id"].tolist()
    if store.dim is None:  # reads every file (into the cache), naming one of another dimension
        store.preload(slides, progress=progress)
    if store.dim != in_dim:
        where = store.path(slides[0]) if slides[0] in store.index else cfg.data.instances
        raise DataError(
            f"{where}: features of dimension {store.dim}, but the fold models of {run.path} were "
            f"trained on {in_dim}-dimensional features; were they made by another encoder than "
            f"the run's?"
        )
    return cohort, store


# ---- predictions and scores -----------------------------------------------------------------


def ensemble_predictions(
    task: Task, models: list[FoldModel], cohort: Cohort, store: FeatureStore
) -> pd.DataFrame:
    """One row per bag of ``cohort``: the columns of a fold's ``predictions.csv``, holding the
    fold ensemble's mean outputs (:func:`mil.train.inference.ensemble`), then ``n_folds``
    and the cohort's site and subgroup columns."""
    bags = cohort.bags
    table = tables_for(models[0], cohort)
    mean = ensemble(models, cohort.bag_slides, store, tabular=table)
    mean = mean.set_index("bag_id").loc[bags["bag_id"]]
    pred = task.predictions(bags, np.zeros((len(bags), task.n_out)))  # ids and outcomes
    for col in mean.columns:
        pred[col] = mean[col].to_numpy()
    pred = task.with_operating_point(pred)  # binary: the class at the ensemble's threshold
    for col in cohort.group_cols:
        pred[col] = bags[col].to_numpy()
    return pred


def tables_for(model: FoldModel, cohort: Cohort) -> TabularTable | None:
    """The cohort's ``data.tabular`` tables laid out as the run's fusion models read theirs;
    None (every table missing, with a warning) where the cohort lists none."""
    layout = model.payload["hparams"].get("tabular")
    if not layout:
        return None
    if cohort.tabular is None:
        warnings.warn(
            f"{cohort.source}: the run's models read tables ({', '.join(m['name'] for m in layout)}) "
            f"but this cohort's config lists no data.tabular; every patient is treated as "
            f"missing them",
            MilWarning,
            stacklevel=3,
        )
        return None
    return cohort.tabular.aligned(layout, str(cohort.source))


def _reference(run: Run, task: Task, models: list[FoldModel]) -> pd.DataFrame | None:
    """The ensemble's predictions of the run's own bags, for a task whose test metrics need
    training bags (survival: Uno's C, the Breslow baseline, the risk-group cut); the task's
    fold state is fitted on them. None, with a warning, if the run's cohort cannot be read."""
    if not task.needs_train_predictions:
        return None
    try:
        cohort, store = load_cohort(run.config)
    except MilError as exc:
        warnings.warn(
            f"the run's own cohort cannot be read ({exc}); the external metrics that need "
            f"the training bags (and the risk groups) are left out",
            MilWarning,
            stacklevel=3,
        )
        return None
    task.setup_fold(cohort.bags, ENSEMBLE)
    return ensemble_predictions(task, models, cohort, store)


def _score(
    run: Run,
    cfg: Config,
    task: Task,
    pred: pd.DataFrame,
    reference: pd.DataFrame | None,
    internal: pd.DataFrame,
    n_boot: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``summary.json``'s content (without subgroups) and the task's figures and tables."""
    found = task.metrics(pred, reference)
    ci = task.pooled_ci(pred, n_boot=n_boot)
    metrics: dict[str, Any] = {}
    details: dict[str, Any] = {}
    for k, v in found.items():
        if v is None or isinstance(v, (int, float)):
            metrics[k] = {"mean": float("nan") if v is None else float(v)}
            if k in ci:
                metrics[k]["ci95_pooled"] = list(ci[k])
        else:
            details[k] = v
    artifacts = dict(task.fold_artifacts(pred, reference))
    tables = {PREDICTIONS: pred}
    tables.update((k, v) for k, v in artifacts.items() if isinstance(v, pd.DataFrame))
    extra, pooled = task.summary_artifacts(
        lambda name: {ENSEMBLE: tables[name]} if name in tables else {}
    )
    artifacts.update(pooled)
    summary: dict[str, Any] = {
        "name": cfg.name,
        "task": cfg.task.type,
        "model": cfg.model_name,
        "run": str(run.path),
        "cohort": str(cfg.data.csv or cfg.data.instances),
        "folds": run.folds,
        "n_boot": n_boot,
        "n_bags": int(pred["bag_id"].nunique()),
        "n_patients": int(pred["patient_id"].nunique()),
        "metrics": metrics,
        **details,
        **extra,
        "internal": {
            "n_bags": int(internal["bag_id"].nunique()),
            "n_patients": int(internal["patient_id"].nunique()),
        },
        "gap": generalization_gap(task, internal, pred, n_boot=n_boot),
    }
    return summary, artifacts


# ---- the folder -----------------------------------------------------------------------------


def _write(
    out: Path,
    run: Run,
    cfg: Config,
    task: Task,
    pred: pd.DataFrame,
    summary: dict[str, Any],
    artifacts: dict[str, Any],
    subgroups: pd.DataFrame | None,
) -> None:
    """The evaluation folder; files of an earlier evaluation there that this one does not
    write (e.g. ``subgroups.csv`` of a cohort with sites) are removed."""
    out.mkdir(parents=True, exist_ok=True)
    written = [PREDICTIONS]
    write_csv(out / PREDICTIONS, pred)
    patients = task.patient_predictions(pred)
    if patients is not None:
        write_csv(out / PREDICTIONS_PATIENT, patients)
        written.append(PREDICTIONS_PATIENT)
    title = f"{run.config.name}: {predictor_words(summary)} on {Path(summary['cohort']).name}"
    for item in artifacts.values():
        if hasattr(item, "savefig") and item.axes:  # a matplotlib Figure: say what it shows
            item.axes[0].set_title(title, fontsize=9)
    write_artifacts(out, artifacts)
    written += list(artifacts)
    if subgroups is not None:
        write_csv(out / SUBGROUPS, subgroups)
        written.append(SUBGROUPS)
    written += [REPORT, SUMMARY_JSON]
    _remove_stale(out, written)
    summary["files"] = written
    write_external_report(out / REPORT, summary, cfg, task)
    write_json(out / SUMMARY_JSON, summary)


def _remove_stale(out: Path, written: list[str]) -> None:
    try:
        before = json.loads((out / SUMMARY_JSON).read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        return
    for name in before:
        if isinstance(name, str) and name not in written and Path(name).name == name:
            with contextlib.suppress(OSError):
                (out / name).unlink()
