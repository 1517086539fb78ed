"""What ``mil evaluate`` checks before it predicts or writes anything: the output folder, the
device, the run's folds it uses and its refit record, and the external cohort against the
run's training cohort (the same slides, another kind of feature, encoder names, an outcome
too thin to score)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from mil.config import Config
from mil.data.cohort import Cohort, read_cohort_csv
from mil.data.dataset import FeatureStore
from mil.data.provenance import cohort_files
from mil.data.readers import read_features
from mil.data.sources import load_cohort
from mil.errors import ConfigError, DataError, MilError, MilWarning
from mil.results import CONFIG, METRICS, MODEL, REFIT, REFIT_JSON, SPLITS, RunFolder
from mil.results.search import SEARCH_CSV
from mil.tasks import Task
from mil.tasks.survival import MIN_EVENTS  # noqa: F401  (fewer external events are warned)
from mil.tasks.targets import class_names
from mil.train.refit import read_refit
from mil.train.runner import resolve_device

#: how :func:`mil.data.provenance.provenance_differences` begins its message about encoders
ENCODER_DIFFERENCE = "feature provenance differs from the run's training cohort in encoder:"
# the bytes compared at each end of two same-sized feature files: enough to tell two
# slides apart (headers, first and last chunks), cheap on a cohort of large files
_EDGE_BYTES = 1 << 16


def _warn(message: str) -> None:
    warnings.warn(message, MilWarning, stacklevel=3)


# ---- the output folder and the device ----------------------------------------------------------


def _is_run_folder(path: Path) -> bool:
    """A folder ``mil train`` made: ``config.yaml`` beside ``splits/`` or a ``fold_*`` folder."""
    if not (path / CONFIG).is_file():
        return False
    return (path / SPLITS).is_dir() or any(p.is_dir() for p in path.glob("fold_*"))


def check_out(out: Path, run_path: Path, suggestion: Path) -> Path:
    """``out`` as given, unless it is a file, a run folder, inside a run folder (a fold, its
    ``refit/``, ``splits/``, ``search/``...) or a folder holding a fold's files: a
    :class:`MilError` naming it, with ``suggestion`` (a folder beside the run)."""
    if out.exists() and not out.is_dir():
        raise MilError(f"--out {out}: a file; name a folder for the evaluation")
    fix = f"write the evaluation into a folder of its own, e.g. --out {suggestion}"
    target, run = out.resolve(), run_path.resolve()
    for name in (CONFIG, METRICS, MODEL):
        if (out / name).is_file():
            what = "a run folder" if name == CONFIG else "a run's fold (or refit) folder"
            raise MilError(f"--out {out}: {what} (it holds {name}); {fix}")
    if target == run:
        raise MilError(f"--out {out}: a run folder (it is the run evaluated); {fix}")
    inside = next((p for p in target.parents if p == run or _is_run_folder(p)), None)
    inside = run_path if inside == run else inside
    if inside is not None:
        raise MilError(
            f"--out {out}: inside the run folder {inside}, where an evaluation would overwrite "
            f"or mix with the run's own files (a fold's predictions.csv, its refit, its "
            f"splits); {fix}"
        )
    return out


def check_device(name: str) -> torch.device:
    """``--device`` as a torch device; a name torch does not know, or a device this machine
    lacks, is a :class:`ConfigError` (never mistaken for a damaged checkpoint)."""
    try:
        return resolve_device(str(name))
    except ConfigError as exc:
        raise ConfigError(
            str(exc).replace(f"train.device = {name!r}", f"--device {name}")
        ) from None
    except (RuntimeError, ValueError):
        raise ConfigError(
            f"--device {name}: not a torch device; use cpu (the default), cuda, cuda:<k>, mps "
            f"or auto"
        ) from None


# ---- the run's folds and refit -----------------------------------------------------------------


def usable_folds(folder: RunFolder) -> dict[str, dict[str, Any]]:
    """Fold name -> ``metrics.json`` record of each fold an evaluation uses: the finished folds
    whose record reads (a damaged one is left out, with one warning). The ensemble, its
    decision threshold and the internal figure all use exactly these; fewer than the run's
    split files define (a run still training, a search not yet selected) is warned."""
    records = folder.records()
    if not records:
        raise DataError(
            f"{folder.path}: no finished folds (fold_*/metrics.json) to predict with; run "
            f"`mil train CONFIG --out {folder.path}` to the end first"
        )
    expected = folder.split_folds()
    # a damaged metrics.json was warned by records(); these have none at all
    missing = [f for f in expected if not folder.fold_file(f, METRICS).is_file()]
    if missing:
        names = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        why = (
            "not selected by the search yet"
            if (folder.path / SEARCH_CSV).is_file()
            else "not finished"
        )
        _warn(
            f"{folder.path}: the evaluation uses {len(records)} of its {len(expected)} folds "
            f"({'fold' if len(missing) == 1 else 'folds'} {names}: {why}); the ensemble, its "
            f"decision threshold and the internal figure of the gap rest on those alone. Finish "
            f"the run (`mil train CONFIG --out {folder.path}`) to evaluate all of it"
        )
    return records


def internal_predictions(folder: RunFolder, folds: list[str]) -> pd.DataFrame:
    """The out-of-fold predictions of ``folds`` that the run's own pooled figures use: the
    first repeat's folds (every bag once, as ``summary.json``'s ``auc_pooled``), or all of
    ``folds`` where none is of the first repeat; with a ``fold_dir`` column."""
    first = [f for f in folds if not f.startswith("r")] or list(folds)
    parts = [folder.predictions(f).assign(fold_dir=folder.fold_dir(f).name) for f in first]
    return pd.concat(parts, ignore_index=True)


#: the counts in ``refit.json`` that an evaluation's report reads
_REFIT_COUNTS = ("n_bags", "n_patients")


def read_refit_record(run_path: Path) -> dict[str, Any]:
    """``refit/refit.json`` of a run (:func:`mil.train.refit.read_refit`), checked to be the
    record ``mil train --refit`` writes: an object with the counts and what the refit was
    trained for, as the report reads them. Anything else is a :class:`DataError` naming the
    file and what to do."""
    record = read_refit(run_path)
    problem = _refit_problem(record)
    if problem:
        raise DataError(
            f"{run_path / REFIT / REFIT_JSON}: not the record `mil train --refit` writes "
            f"({problem}); delete {run_path / REFIT} and run `mil train CONFIG --out {run_path} "
            f"--refit` again"
        )
    return record


def _refit_problem(record: Any) -> str | None:
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    for key in _REFIT_COUNTS:
        if not isinstance(record.get(key), int) or isinstance(record.get(key), bool):
            return f"{key!r} is {record.get(key)!r}, not a count"
    epochs, penalty = record.get("epochs_trained"), record.get("penalty")
    if epochs is not None:
        if not isinstance(epochs, int) or not isinstance(record.get("per_fold_epochs"), dict):
            return "'epochs_trained' or 'per_fold_epochs' is malformed"
    elif not isinstance(penalty, (int, float)) or isinstance(penalty, bool):
        return "neither 'epochs_trained' nor 'penalty' says what the refit was trained for"
    return None


# ---- the external cohort against the training cohort -------------------------------------------


def check_encoder(provenance: dict, differences: list[str], where: Any, allowed: bool) -> list[str]:
    """Refuse an external cohort whose files name an encoder no training file names (both
    must name one); the same dimension does not make two encoders' features comparable.
    Names that differ only in letter case are one encoder. Returns the provenance
    differences to warn, the case-only one reworded."""
    train = set(provenance.get("run", {}).get("encoder", {}))
    new = set(provenance.get("cohort", {}).get("encoder", {})) - train
    folded = {str(t).casefold() for t in train}
    other = sorted(str(e) for e in new if str(e).casefold() not in folded)
    if train and other and not allowed:
        raise DataError(
            f"{where}: the external cohort's features were made by encoder "
            f"{', '.join(other)}, the run's training features by "
            f"{', '.join(sorted(map(str, train)))}; a model predicts another encoder's features "
            f"without failing but meaninglessly. Extract the cohort with the run's encoder "
            f"(or, if the names differ but the encoder is the same, pass --any-encoder)"
        )
    if new and not other:
        differences = [d for d in differences if not d.startswith(ENCODER_DIFFERENCE)]
        differences.append(
            f"{where}: the external cohort's features name encoder "
            f"{', '.join(sorted(map(str, new)))}, "
            f"the run's training features {', '.join(sorted(map(str, train)))}: the names "
            f"differ only in letter case, so they are taken as one encoder"
        )
    return differences


def check_feature_kind(run_cfg: Config, cfg: Config, allowed: bool) -> None:
    """Refuse an external cohort of slide embeddings (one vector ``[D]`` per file) for a run
    trained on tile features (``[N, D]``), or the reverse, even of the same dimension;
    ``allowed`` (``--any-encoder``) makes it a warning. Not compared where the training
    cohort cannot be read any more."""
    try:
        train = next(iter(cohort_files(run_cfg).values()), None)
        ext = next(iter(cohort_files(cfg).values()), None)
        if train is None or ext is None:
            return
        kinds = read_features(train).embedding, read_features(ext).embedding
    except (DataError, OSError):
        return
    if kinds[0] == kinds[1]:
        return
    word = {
        True: "slide/patient embeddings (one vector [D] per file)",
        False: "tile features ([N, D])",
    }
    message = (
        f"{ext}: the external cohort holds {word[kinds[1]]}, but the run's models were trained "
        f"on {word[kinds[0]]} (e.g. {train}); such a model predicts the other kind without "
        f"failing but meaninglessly. Evaluate features of the kind the run was trained on"
    )
    if not allowed:
        raise DataError(message + " (or pass --any-encoder to evaluate them anyway)")
    _warn(message)


def warn_training_overlap(run_cfg: Config, cfg: Config) -> None:
    """Warn when slides of the external cohort are the run's own training slides (the same
    feature file, or a slide of the same id whose file has the same size and content at
    both ends): metrics on bags a model was trained on are no generalization gap."""
    try:
        train, ext = cohort_files(run_cfg), cohort_files(cfg)
    except DataError:
        return
    by_path = {p.resolve() for p in train.values()}
    same = [s for s, p in ext.items() if p.resolve() in by_path or _same_file(p, train.get(s))]
    if same:
        whole = "is the run's training cohort" if len(same) == len(ext) else "overlaps it"
        _warn(
            f"{cfg.data.csv}: {len(same)} of {len(ext)} slides of the external cohort are "
            f"slides the run was trained on (the same feature files, e.g. {same[0]}): the "
            f"cohort {whole}, and metrics on bags the models saw in training are no "
            f"generalization gap. Evaluate a cohort of patients the run never saw"
        )


def _same_file(a: Path, b: Path | None) -> bool:
    if b is None:
        return False
    try:
        size = a.stat().st_size
        if size != b.stat().st_size:
            return False
        with open(a, "rb") as fa, open(b, "rb") as fb:
            if fa.read(_EDGE_BYTES) != fb.read(_EDGE_BYTES):
                return False
            fa.seek(max(0, size - _EDGE_BYTES))
            fb.seek(max(0, size - _EDGE_BYTES))
            return fa.read() == fb.read()
    except OSError:
        return False


def warn_thin_outcome(task: Task, pred: pd.DataFrame, source: Any) -> None:
    """Warn when the external outcomes cannot carry the metrics, as the task says
    (:meth:`mil.tasks.Task.thin_outcome`: one class only, so the AUC and its gap are
    undefined; a survival cohort with fewer than ten events)."""
    what = task.thin_outcome(pred)
    if what is not None:
        _warn(f"{source}: {what}")


# ---- the external cohort, read --------------------------------------------------------------


def check_classes(cfg: Config, classes: list[str]) -> None:
    """Refuse a label of the cohort CSV that is none of the run's classes, naming it."""
    d = cfg.data
    if not classes or d.instances or not d.csv:  # a task with classes reads data.label_col
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


def load_external_cohort(
    cfg: Config, run_path: Path, classes: list[str], in_dim: int, progress: bool
) -> tuple[Cohort, FeatureStore]:
    """The cohort and its features (read); a class the run never saw, a missing feature file
    and features of another dimension than ``in_dim`` (the models') are refused."""
    check_classes(cfg, classes)
    cohort, store = load_cohort(cfg)  # missing feature files: the runner's message
    slides = cohort.slides["slide_id"].tolist()
    if store.dim is None:  # reads every file (into the cache), naming one of another dimension
        store.preload(slides, progress=progress)
    if store.dim != in_dim:
        where = store.path(slides[0]) if slides[0] in store.index else cfg.data.instances
        raise DataError(
            f"{where}: features of dimension {store.dim}, but the fold models of {run_path} were "
            f"trained on {in_dim}-dimensional features; were they made by another encoder than "
            f"the run's?"
        )
    return cohort, store


@contextlib.contextmanager
def own_warnings_only() -> Iterator[None]:
    """Pass on mil's own warnings raised in the block, each once; drop the libraries'
    (scikit-learn's "a single label was found", numpy's empty means...), which describe
    a degenerate cohort or resample that :func:`warn_thin_outcome` has named already."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    seen = set()
    for w in caught:
        if issubclass(w.category, MilWarning) and str(w.message) not in seen:
            seen.add(str(w.message))
            warnings.warn(w.message, stacklevel=3)
