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

import pandas as pd

from mil.config import Config, derive, read_yaml_mapping
from mil.data.cohort import Cohort
from mil.data.dataset import FeatureStore
from mil.data.provenance import compare_provenance
from mil.data.sources import load_cohort
from mil.data.tabular import TabularTable
from mil.errors import ConfigError, MilError, MilWarning
from mil.io import run_lock, write_csv
from mil.results import (
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
from mil.tasks.registry import available as available_tasks
from mil.tasks.registry import get as get_task
from mil.train.external_checks import (
    check_device,
    check_encoder,
    check_feature_kind,
    check_out,
    internal_predictions,
    load_external_cohort,
    own_warnings_only,
    read_refit_record,
    usable_folds,
    warn_thin_outcome,
    warn_training_overlap,
)
from mil.train.external_report import predictor_words, write_external_report
from mil.train.gaps import generalization_gap
from mil.train.inference import FoldModel
from mil.train.scoring import FoldEnsemble, FoldScores, Scoring, score_fold
from mil.train.summary import subgroup_results, summary_record, value_entries, write_summary

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
    The ensemble, its decision threshold and the internal figure of the gap use
    the same folds: the finished ones whose ``metrics.json`` reads (fewer than the
    run defines is warned); the internal figure is the run's own pooled one (first
    repeat).

    Before anything is predicted or written, a :class:`MilError` refuses an ``out``
    inside a run folder, a device this machine lacks, another task type, a class
    the run never saw, missing feature files, features of another dimension than
    the run's, slide embeddings for a run of tile features (or the reverse), and
    features whose files name an encoder the training cohort's never do
    (``any_encoder=True`` lets the last two through with a warning; names that
    differ only in case are one encoder); other provenance differences
    (magnification, tile size, dtype), an "external" cohort holding the run's own
    training slides, one class only and fewer than ten events are warned.
    ``out`` is locked while it is written, as a run folder is.
    """
    run = Run(run_dir)
    out = check_out(Path(out), run.path, _beside(run, cohort_config))
    _check_foreign_files(out, _beside(run, cohort_config))
    torch_device = check_device(device)
    records = usable_folds(run.folder)  # the folds used for everything below
    classes = list(next(iter(records.values())).get("classes", []))
    cfg = cohort_config_of(run, cohort_config, classes)
    task = make_task(cfg, classes)
    task.fold_name = ENSEMBLE
    task.ensemble_operating_point([r["metrics"] for r in records.values()])
    refit_record = read_refit_record(run.path) if refit else None
    names = [REFIT] if refit else list(records)
    models = [FoldModel(run.folder.fold_file(f, MODEL), run.config, f, torch_device) for f in names]
    internal = internal_predictions(run.folder, list(records))  # for the gap
    cohort, store = load_external_cohort(
        cfg, run.path, classes, int(models[0].payload["in_dim"]), progress
    )
    provenance = _check_against_training(run, cfg, cohort_config, any_encoder)
    predictor = cohort_ensemble(models, cohort, store)
    with own_warnings_only():  # a library's warnings about a degenerate cohort or resample
        reference = _reference(run, task, models)  # fits the task's fold state first
        scored = score_fold(task, predictor, cohort.bags, Scoring(cohort.group_cols), reference)
        pred = scored.pred
        warn_thin_outcome(task, pred, cfg.data.csv or cfg.data.instances)
        summary, artifacts = _score(
            run, cfg, task, list(records), scored, reference, internal, n_boot
        )
        subgroups = None
        if cohort.group_cols:
            subgroups, entries = subgroup_results(task, pred, cohort.group_cols, n_boot)
            summary.update(entries)
    summary["predictor"] = "refit" if refit else "ensemble"
    if refit_record is not None:
        summary["refit"] = refit_record
    summary["provenance"] = provenance  # of the files of both cohorts, field -> value -> count
    with run_lock(out):  # two evaluations into one folder never mix their files
        _write(out, run, cfg, task, pred, summary, artifacts, subgroups)
    return summary


def _beside(run: Run, cohort_config: str | Path) -> Path:
    """A folder for an evaluation beside the run: ``<run>_on_<cohort config's name>``."""
    return run.path.parent / f"{run.path.name}_on_{Path(cohort_config).stem}"


def _check_against_training(run: Run, cfg: Config, where, any_encoder: bool) -> dict:
    """The external cohort against the run's training cohort: the encoder its files name
    and their kind (refused), other provenance differences and shared slides (warned).
    Returns the provenance of both cohorts' files."""
    provenance, differences = compare_provenance(run.config, cfg)
    differences = check_encoder(provenance, differences, where, any_encoder)
    check_feature_kind(run.config, cfg, any_encoder)
    for message in differences:
        warnings.warn(message, MilWarning, stacklevel=3)
    warn_training_overlap(run.config, cfg)
    return provenance


# ---- the cohort, checked --------------------------------------------------------------------


def cohort_config_of(run: Run, path: str | Path, classes: list[str] | None = None) -> Config:
    """The run's config with the ``data:`` section of the YAML at ``path``.

    The YAML's ``task.type``, where given, must be the run's. Bags are made at
    the run's ``data.bag_level`` and labels read as the run's classes (``classes``,
    default :attr:`mil.Run.classes`, in its order); the features are preprocessed
    by each fold model as it saved.
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
    data = {
        **data,
        "bag_level": level,
        "standardize": run.config.data.standardize,
        "classes": list(run.classes if classes is None else classes) or None,
    }
    return derive(run.config, {"data": data}, source=str(path))


# ---- predictions and scores -----------------------------------------------------------------


def cohort_ensemble(models: list[FoldModel], cohort: Cohort, store: FeatureStore) -> FoldEnsemble:
    """The fold ensemble on every bag of ``cohort`` (:class:`mil.train.scoring.FoldEnsemble`),
    the cohort's tables laid out as the run's models read theirs."""
    return FoldEnsemble(models, cohort.bag_slides, store, tabular=tables_for(models[0], cohort))


def tables_for(model: FoldModel, cohort: Cohort) -> TabularTable | None:
    """The cohort's ``data.tabular`` tables laid out as the run's fusion models read theirs;
    None (every table missing, with a warning) where the cohort lists none."""
    layout = model.tables_layout()
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
    predictor = cohort_ensemble(models, cohort, store)
    scoring = Scoring(cohort.group_cols, metrics=False)
    return score_fold(task, predictor, cohort.bags, scoring).pred


def _score(
    run: Run,
    cfg: Config,
    task: Task,
    folds: list[str],
    scored: FoldScores,
    reference: pd.DataFrame | None,
    internal: pd.DataFrame,
    n_boot: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``summary.json``'s content (without subgroups) and the task's figures and tables."""
    pred = scored.pred
    metrics, details = value_entries(scored.metrics)  # one value each, not a mean over folds
    summary = summary_record(cfg, task, pred, folds, n_boot, metrics)
    artifacts = dict(task.fold_artifacts(pred, reference))
    tables = {PREDICTIONS: pred}
    tables.update((k, v) for k, v in artifacts.items() if isinstance(v, pd.DataFrame))
    extra, pooled = task.summary_artifacts(
        lambda name: {ENSEMBLE: tables[name]} if name in tables else {}
    )
    artifacts.update(pooled)
    summary.update(
        {
            "run": str(run.path),
            "cohort": str(cfg.data.csv or cfg.data.instances),
            **details,
            **extra,
            "internal": {
                "folds": list(dict.fromkeys(internal["fold_dir"].str.removeprefix("fold_"))),
                "n_bags": int(internal["bag_id"].nunique()),
                "n_patients": int(internal["patient_id"].nunique()),
            },
            "gap": generalization_gap(task, internal, pred, n_boot=n_boot),
        }
    )
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
    write_summary(out, summary)


#: what an evaluation's ``summary.json`` holds (one without these keys is someone else's)
_SUMMARY_KEYS = ("run", "cohort", "predictor", "metrics", "gap", "files")


def evaluation_files() -> frozenset[str]:
    """Every file name an evaluation may write: its tables, report and summary, and the
    figures of every registered task (the only names an earlier evaluation's are removed by)."""
    figures = {f for name in available_tasks() for f in get_task(name).figure_captions}
    return frozenset({PREDICTIONS, PREDICTIONS_PATIENT, SUBGROUPS, REPORT, SUMMARY_JSON, *figures})


def _earlier_evaluation(out: Path) -> dict[str, Any] | None:
    """``out``'s ``summary.json`` if ``mil evaluate`` wrote it (it holds every key of one)."""
    try:
        before = json.loads((out / SUMMARY_JSON).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(before, dict) and all(k in before for k in _SUMMARY_KEYS)
    return before if ok else None


def _check_foreign_files(out: Path, suggestion: Path) -> None:
    """Refuse an ``out`` holding files of an evaluation's names that no earlier ``mil
    evaluate`` wrote there (someone's own ``predictions.csv`` or ``report.md``)."""
    if not out.is_dir() or _earlier_evaluation(out) is not None:
        return
    found = sorted(p.name for p in out.iterdir() if p.name in evaluation_files())
    if found:
        raise MilError(
            f"--out {out}: holds {', '.join(found)}, which an evaluation would overwrite and no "
            f"finished `mil evaluate` wrote (an interrupted one may have: then delete them); "
            f"write it into a folder of its own, e.g. --out {suggestion}"
        )


def _remove_stale(out: Path, written: list[str]) -> None:
    """Remove what an earlier evaluation into ``out`` wrote and this one does not: only names
    :func:`evaluation_files` lists, and only those a ``summary.json`` written by ``mil
    evaluate`` (it holds every key of an evaluation's) lists."""
    before = _earlier_evaluation(out)
    if before is None:
        return
    names = before["files"] if isinstance(before["files"], list) else []
    for name in set(names) & (evaluation_files() - set(written)):
        with contextlib.suppress(OSError):
            (out / name).unlink()
