"""Nested hyper-parameter selection (a config's ``search:`` grid): each grid point is an ordinary
run on the run's own split files; per outer fold, the point with the lowest validation loss is
selected and its fold becomes the run's fold, so only outer test folds are reported.

``mil train CONFIG --out OUT`` with ``search: {train.lr: [1.0e-4, 1.0e-3], model.hidden_dim:
[64, 128]}`` runs the four points into ``OUT/search/<label>/`` (resumable, ``--points`` for one
job per point), then, for every outer fold that all points have finished, copies the selected
point's ``fold_<k>/`` into ``OUT/fold_<k>/`` and writes ``OUT/search.csv``
(:mod:`mil.results.search`); ``OUT`` is then summarised like any run. Beside the selection,
the average of every point's predictions of the same test fold is scored in
``OUT/search_average/fold_<k>/``, so the summary and report show whether averaging the points
would have beaten selecting one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mil.config import LARGE_GRID, Config, point_config, search_grid
from mil.data.sources import read_cohort
from mil.errors import ConfigError, MilWarning, SplitError
from mil.io import remove_orphan_temps, run_lock, safe_filename, write_csv, write_json, write_text
from mil.results import (
    METRICS,
    MODEL,
    PREDICTIONS,
    PREDICTIONS_TRAIN,
    PREDICTIONS_VAL,
    RunFolder,
    config_splits,
    prepare_run_dir,
)
from mil.results.checkpoint import read_checkpoint
from mil.results.search import SEARCH_CSV, average_dir, point_dir, point_val_losses, show_value
from mil.splits import Split, write_splits
from mil.tasks import make_task
from mil.train.distributed import setup
from mil.train.runner import run_cv
from mil.train.summary import summarize

__all__ = ["GridPoint", "average_fold", "grid_points", "point_label", "run_search", "select_folds"]

# a fold folder being copied in (``.fold_<k>.<random>.copy``) or swapped out (``….old``)
_COPY, _OLD = ".copy", ".old"


@dataclass(frozen=True)
class GridPoint:
    """One combination of the grid: its index, folder label, values and plain config."""

    index: int
    label: str
    values: dict[str, Any]  # dotted key -> the value as the point's config holds it
    cfg: Config


def point_label(index: int, values: dict[str, Any]) -> str:
    """A short, file-system-safe folder name: ``p2-lr=0.001-hidden_dim=64``."""
    short = [k.split(".", 1)[1] for k in values]
    parts = [
        f"{s if short.count(s) == 1 else k}={show_value(v).replace(' ', '')}"
        for (k, v), s in zip(values.items(), short)
    ]
    return safe_filename("-".join([f"p{index}", *parts]), max_len=80)


def _value(cfg: Config, key: str) -> Any:
    """The value of a dotted ``search:`` key in a point's config (a model key as the model
    section holds it, ``model.name`` as the model's registered name)."""
    section, _, sub = key.partition(".")
    if section == "model":
        return cfg.model_name if sub == "name" else cfg.model.get(sub)
    return getattr(getattr(cfg, section), sub)


def grid_points(cfg: Config) -> list[GridPoint]:
    """The points of ``cfg.search`` in the grid's fixed order (:func:`mil.config.search_grid`)."""
    out = []
    for i, point in enumerate(search_grid(cfg)):
        sub = point_config(cfg, point)
        values = {k: _value(sub, k) for k in point}
        label = point_label(i, values)
        out.append(
            GridPoint(i, label, values, dataclasses.replace(sub, name=f"{cfg.name}_{label}"))
        )
    return out


def run_search(
    cfg: Config,
    out: str | Path | None = None,
    folds: Sequence[int] | None = None,
    points: Sequence[int] | None = None,
    progress: bool = True,
    log=print,
    n_boot: int = 1000,
) -> Path:
    """Run (or resume) the grid points (all, or the indices ``points``) on the outer folds
    (all, or ``folds``), then select every fold all points have finished; returns ``out``."""
    out = Path(out) if out else Path("results") / cfg.name
    if not cfg.search:
        raise ConfigError(f"{cfg.source}: no search: block; run it with `mil train` as a plain run")
    grid = grid_points(cfg)
    bad = [i for i in points or [] if not 0 <= i < len(grid)]
    if bad:
        raise ConfigError(
            f"--points: point {bad[0]} does not exist (the search of {cfg.source} has points "
            f"0..{len(grid) - 1})"
        )
    dist, _ = setup(cfg.train.device)
    n_fits = len(grid) * cfg.splits.folds * cfg.splits.repeats
    if len(grid) > LARGE_GRID and dist.main and points is None:
        warnings.warn(
            f"{cfg.source}: the search grid has {len(grid)} points, each trained on every outer "
            f"fold ({n_fits} fold trainings); narrow the grid, or run points as separate jobs "
            "with --points",
            MilWarning,
            stacklevel=2,
        )
    splits: list[Split] = []
    if dist.main:
        with run_lock(out):
            splits = _prepare(cfg, out, folds)
    for p in grid if points is None else [grid[i] for i in dict.fromkeys(points)]:
        if dist.main:
            log(f"== search point {p.index} of {len(grid)}: {p.label} ==")
            _share_splits(cfg, out, point_dir(out, p.label))
        run_cv(
            p.cfg, point_dir(out, p.label), folds=folds, progress=progress, log=log, n_boot=n_boot
        )
    if dist.main:
        with run_lock(out):
            todo = range(len(splits)) if folds is None else folds
            select_folds(
                out, grid, [splits[k].name for k in todo], [s.name for s in splits], log, n_boot
            )
    dist.barrier()
    return out


def _prepare(cfg: Config, out: Path, folds: Sequence[int] | None) -> list[Split]:
    """The search run's config and split files, made once (as :func:`run_cv` makes a run's)."""
    cohort = read_cohort(cfg)
    run = RunFolder(out)
    splits, _ = config_splits(cfg, out, cohort)
    bad = [k for k in folds or [] if not 0 <= k < len(splits)]
    if bad:
        raise ConfigError(
            f"--folds: fold {bad[0]} does not exist (the run has folds 0..{len(splits) - 1})"
        )
    remove_orphan_temps(out)
    prepare_run_dir(cfg, out)
    write_splits(run.splits_dir, splits, cohort, unless_same=True)
    return splits


def _share_splits(cfg: Config, out: Path, point: Path) -> None:
    """Give a point the search run's split files (where the config names no split folder,
    each run reads its own ``splits/``); a point's differing files are an error."""
    if cfg.splits.dir:
        return  # every point reads the config's split folder
    mine = RunFolder(point).splits_dir
    for src in sorted(RunFolder(out).splits_dir.glob("splits_*.csv")):
        dst, text = mine / src.name, src.read_text()
        if dst.is_file() and dst.read_text() != text:
            raise SplitError(
                f"{dst} differs from the search run's {src}; a point must use the run's split "
                f"files: delete {point} to run that point again"
            )
        write_text(dst, text, unless_same=True)


def select_folds(
    out: str | Path,
    grid: list[GridPoint],
    todo: list[str],
    names: list[str],
    log=print,
    n_boot: int = 1000,
) -> list[str]:
    """For each fold of ``names`` that every point has finished, select the point with the
    lowest validation loss of its kept weights (never a test-fold number), copy its fold
    folder into ``out`` and write ``search.csv``; a fold of ``todo`` that some point has not
    finished is named with them. Summarises ``out`` when a fold was added. Returns the
    selected folds."""
    run = RunFolder(out)
    for p in [*run.path.glob(f".fold_*{_COPY}"), *run.path.glob(f".fold_*{_OLD}")]:
        shutil.rmtree(p, ignore_errors=True)  # left by a killed selection (we hold the lock)
    runs = [RunFolder(point_dir(out, p.label)) for p in grid]
    best_from = [p.cfg.train.best_from_epoch for p in grid]
    rows: list[dict[str, Any]] = []
    changed, selected = False, []
    for name in names:
        pending = [p for p, r in zip(grid, runs) if r.fold_state(name) != "done"]
        if pending:
            if name in todo:
                log(
                    f"fold {name}: not selected until every point has finished it; pending "
                    f"points {','.join(str(p.index) for p in pending)} "
                    f"({', '.join(p.label for p in pending)}): run them with --points"
                )
            continue
        losses = point_val_losses(runs, name, best_from)
        if not np.isfinite(losses).any():
            log(f"fold {name}: no point has a validation loss (history.csv val_loss); not selected")
            continue
        best = int(np.nanargmin(losses))  # ties: the first point of the grid
        changed |= _copy_fold(runs[best], run, name)
        changed |= average_fold(grid, runs, RunFolder(average_dir(out)), name)
        selected.append(name)
        log(f"fold {name}: selected {grid[best].label} (validation loss {losses[best]:.4f})")
        rows += [
            {"fold": name, "point": p.label, **p.values, "val_loss": v, "selected": p.index == best}
            for p, v in zip(grid, losses)
        ]
    if rows:
        changed |= write_csv(run.file(SEARCH_CSV), pd.DataFrame(rows), unless_same=True)
    if run.records() and (changed or run.summary_stale(n_boot)):
        summarize(out, n_boot=n_boot)
    return selected


def average_fold(grid: list[GridPoint], runs: list[RunFolder], avg: RunFolder, name: str) -> bool:
    """The average of every point's predictions of fold ``name`` (the same test bags), scored
    as a fold and written to ``avg``'s ``fold_<name>/`` (:meth:`Task.average_predictions`: class
    probabilities; Cox risks standardised by each point's training predictions; a binary
    operating point fitted on the averaged validation predictions). A fold already averaged
    from the same point records is left. Returns whether it wrote."""
    records = [r.record(name) for r in runs]
    members = [hashlib.sha1(r.fold_file(name, METRICS).read_bytes()).hexdigest()[:16] for r in runs]
    if avg.fold_state(name) == "done" and avg.record(name).get("members") == members:
        return False
    task = make_task(grid[0].cfg, records[0].get("classes", []))
    task.fold_name = name
    task.load_fold_state(read_checkpoint(runs[0].fold_file(name, MODEL)).get("task_state") or {})

    def tables(file: str) -> list[pd.DataFrame] | None:
        if not all(r.fold_file(name, file).is_file() for r in runs):
            return None
        return [r.predictions(name, file) for r in runs]

    train, val = tables(PREDICTIONS_TRAIN), tables(PREDICTIONS_VAL)
    scales = None if train is None else [task.output_scale(t) for t in train]
    if task.needs_val_predictions and val is not None:
        task.fit_operating_point(task.average_predictions(val, scales))
    pred = task.average_predictions(tables(PREDICTIONS) or [], scales)
    train_pred = None if train is None else task.average_predictions(train, scales)
    fold_dir = avg.fold_dir(name)
    fold_dir.mkdir(parents=True, exist_ok=True)
    write_csv(fold_dir / PREDICTIONS, pred)
    if train_pred is not None:
        write_csv(fold_dir / PREDICTIONS_TRAIN, train_pred)
    record = {k: records[0][k] for k in ("fold", "repeat", "classes", "task") if k in records[0]}
    record.update(
        points=[p.label for p in grid], members=members, metrics=task.metrics(pred, train_pred)
    )
    write_json(fold_dir / METRICS, record)
    return True


def _copy_fold(src: RunFolder, dst: RunFolder, name: str) -> bool:
    """Copy ``src``'s fold folder to ``dst``'s, whole or not at all (a temporary folder beside
    it, then a rename); a copy that is already there is left. Returns whether it copied."""
    target, metrics = dst.fold_dir(name), src.fold_file(name, METRICS)
    if (
        dst.fold_state(name) == "done"
        and dst.fold_file(name, METRICS).read_bytes() == metrics.read_bytes()
    ):
        return False
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=_COPY, dir=dst.path))
    # fresh modification times: the summary is older than the fold it now has to include
    shutil.copytree(src.fold_dir(name), tmp, dirs_exist_ok=True, copy_function=shutil.copy)
    if target.exists():  # another point was selected before (a point's fold was retrained)
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=_OLD, dir=dst.path))
        os.replace(target, old / target.name)
        os.replace(tmp, target)
        shutil.rmtree(old)
    else:
        os.replace(tmp, target)
    return True
