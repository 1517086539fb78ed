"""The cross-validation runner: an experiment's folds, one fit each, written to the run folder.

The folder's layout is :mod:`mil.results`'s; every file is written
atomically, so an interrupted run resumes from the folds whose
``metrics.json`` exists.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from mil.config import Config
from mil.data.dataset import BagDataset
from mil.data.transforms import Standardizer, feature_stats
from mil.errors import ConfigError, DataError, MilWarning, TrainingWarning
from mil.io import remove_orphan_temps, run_lock, write_csv, write_json
from mil.results import (
    HISTORY,
    METRICS,
    MODEL,
    PREDICTIONS,
    PREDICTIONS_PATIENT,
    PREDICTIONS_TRAIN,
    PREDICTIONS_VAL,
    SCORES,
    RunFolder,
    prepare_run_dir,
    run_identity,
    write_artifacts,
)
from mil.results.checkpoint import load_model, read_checkpoint, save_model
from mil.results.scores import write_scores
from mil.splits import Split, write_splits
from mil.tasks import Task
from mil.train.closed_form import fit_closed_form
from mil.train.diagnostics import diagnose, summarize_findings
from mil.train.distributed import SINGLE, Dist, setup, usable_cores
from mil.train.ensemble import fold_ensemble
from mil.train.experiment import Experiment
from mil.train.loop import Forward, fit
from mil.train.members import Member, write_members
from mil.train.optim import training_budget
from mil.train.scoring import ModelPredictor, fold_predictions, fold_scoring, score_fold
from mil.train.selection import Selection, select_inner
from mil.train.summary import summarize

# names other modules and notebooks import from here
__all__ = [
    "Experiment",
    "Standardizer",
    "feature_stats",
    "load_model",
    "prepare_run_dir",
    "read_checkpoint",
    "resolve_device",
    "run_cv",
    "run_fold",
    "run_identity",
]


def resolve_device(name: str) -> torch.device:
    """``train.device`` as a torch device; one this machine lacks is a :class:`ConfigError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (device.index or 0) >= n:
            raise ConfigError(
                f"train.device = {name!r}, but this machine's torch sees "
                f"{n} CUDA device{'s' if n != 1 else ''}; use auto or cpu"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            f"train.device = {name!r}, but MPS is not available here; use auto or cpu"
        )
    return device


def run_cv(
    cfg: Config,
    run_dir: str | Path | None = None,
    folds: Sequence[int] | None = None,
    force_splits: bool = False,
    progress: bool = True,
    log=print,
    n_boot: int = 1000,
) -> Path:
    """Run (or resume) cross-validation; returns the run folder.

    Under ``torchrun`` every process joins one data-parallel run
    (:mod:`mil.train.distributed`); rank 0 makes the splits and writes the results.
    The global torch random state and thread count are as before once it returns.
    """
    run_dir = Path(run_dir) if run_dir else Path("results") / cfg.name
    run = RunFolder(run_dir)
    dist, dist_device = setup(cfg.train.device)
    device = dist_device or resolve_device(cfg.train.device)
    if not dist.main:
        log = _quiet
        progress = False
        dist.barrier()  # rank 0 first: it makes (or checks) the split files and the run folder
    # one process at a time checks and writes a run folder's config and splits, so two
    # `mil train`s on one --out cannot both pass the check (fold jobs then run side by side)
    with run_lock(run_dir) if dist.main else contextlib.nullcontext():
        exp = Experiment(cfg, run_dir, force_splits=force_splits and dist.main, progress=progress)
        if dist.main:
            remove_orphan_temps(run_dir)
            prepare_run_dir(cfg, run_dir)
            write_splits(run.splits_dir, exp.splits, exp.cohort, unless_same=True)
    if dist.main:
        dist.barrier()
    todo = list(range(len(exp.splits))) if folds is None else list(folds)
    bad = [k for k in todo if not 0 <= k < len(exp.splits)]
    if bad:
        raise ConfigError(
            f"--folds: fold {bad[0]} does not exist (the run has folds 0..{len(exp.splits) - 1})"
        )
    # rank 0's view of which folds are finished, so that every rank runs the same folds
    states = dist.broadcast([run.fold_state(exp.splits[k].name) for k in todo])
    train_now = [k for k, st in zip(todo, states) if st != "done"]
    exp.store.preload(
        [s for k in train_now for p in ("train", "val", "test") for s in exp.splits[k].part(p)],
        progress=progress,
    )
    with torch_threads(cfg.train.threads), _forked_rng(device):
        for k, state in zip(todo, states):
            _fold_or_skip(exp, exp.splits[k], state, run, device, dist, log)
    # a no-op re-run of a finished run writes nothing
    if dist.main and (train_now or run.summary_stale(n_boot)):
        summarize(run_dir, n_boot=n_boot)
    if dist.main and train_now:
        findings = [f for r in run.records().values() for f in r.get("diagnostics", [])]
        for line in summarize_findings(findings):
            warnings.warn(line, TrainingWarning, stacklevel=2)
    dist.barrier()  # the other ranks return once the summary exists
    return run_dir


def _fold_or_skip(
    exp: Experiment, split: Split, state: str, run: RunFolder, device, dist: Dist, log
) -> None:
    fold_dir = run.fold_dir(split.name)
    if state == "done":
        log(f"fold {split.name}: done earlier, skipped ({fold_dir / METRICS})")
        return
    if state == "damaged" and dist.main:
        warnings.warn(
            f"{fold_dir / METRICS} is damaged (not a readable record of a finished "
            f"fold); fold {split.name} is trained again",
            MilWarning,
            stacklevel=3,
        )
    metrics = run_fold(exp, split, fold_dir, device, dist, log)
    shown = ", ".join(f"{m}={v:.3f}" for m, v in metrics.items() if isinstance(v, float))
    log(f"fold {split.name}: {shown}")


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """``torch.set_num_threads(n)`` for the block only (a notebook keeps its own setting);
    ``n`` None: torch's count, at most the cores this process may use (:func:`usable_cores`)."""
    before = torch.get_num_threads()
    n = n or min(before, usable_cores())
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _forked_rng(device: torch.device):
    """The folds reseed torch; the caller's random state (CPU, and the CUDA device used)
    is restored afterwards."""
    devices = [device.index or 0] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def _quiet(*args, **kwargs) -> None:
    """The log of ranks other than 0."""


@dataclass
class FoldResult:
    """What one trained fold yields, before it is written."""

    history: pd.DataFrame
    state: dict
    norm: Standardizer | None
    data: BagDataset
    test: pd.DataFrame
    forward: Forward
    pred: pd.DataFrame
    train_pred: pd.DataFrame | None
    metrics: dict[str, Any]
    findings: list[dict[str, Any]]
    val_pred: pd.DataFrame | None = None
    members: list[Member] = field(default_factory=list)  # the ensemble, the model first
    selection: Selection | None = None  # select.mode: inner's choice


def run_fold(
    exp: Experiment,
    split: Split,
    fold_dir: Path,
    device: torch.device,
    dist: Dist = SINGLE,
    log=_quiet,
) -> dict[str, Any]:
    """Train and test one fold; write its folder (rank 0 only under torchrun)."""
    selection = None
    if exp.cfg.select.mode == "inner":  # chosen on inner folds of the training bags only
        inner = partial(_inner_fold, exp, device=device, dist=dist)
        selection = select_inner(exp, split, inner, log=log)
    task, train, val, test, fit_val = _fold_parts(exp, split)
    result = _train_and_test(exp, task, split, train, fit_val, test, device, dist, selection)
    if dist.main:
        sizes = {"n_train": len(train), "n_val": len(val), "n_test": len(test)}
        _write_fold(fold_dir, exp, task, split, result, sizes)
    return result.metrics


def _fold_parts(exp: Experiment, split: Split):
    """The fold's task (set up on its training bags), its partitions, and the validation bags
    early stopping reads (None where the task finds them useless: survival without events)."""
    train, val, test = (exp.fold_bags(split, p) for p in ("train", "val", "test"))
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"fold {split.name}: empty training or test partition in {exp.split_dir}")
    task = exp.task()
    task.setup_fold(train, fold_name=split.name)
    fit_val = val if len(val) and task.validation_usable(val) else None
    return task, train, val, test, fit_val


def _inner_fold(exp: Experiment, split: Split, device: torch.device, dist: Dist):
    """One inner fold of the selection: its task and every member's predictions."""
    task, train, _, test, fit_val = _fold_parts(exp, split)
    result = _train_and_test(exp, task, split, train, fit_val, test, device, dist, inner=True)
    return task, result.members


def fold_setup(
    exp: Experiment, task: Task, train_ids: list[str], member: str | None = None
) -> tuple[torch.nn.Module, Standardizer | None, BagDataset]:
    """:meth:`Experiment.fold_setup` (kept here for its importers)."""
    return exp.fold_setup(task, train_ids, member)


def _train_and_test(
    exp: Experiment,
    task: Task,
    split: Split,
    train: pd.DataFrame,
    val: pd.DataFrame | None,
    test: pd.DataFrame,
    device: torch.device,
    dist: Dist,
    selection: Selection | None = None,
    inner: bool = False,
) -> FoldResult:
    """``inner``: a selection's inner fold (every member's predictions, nothing scored)."""
    cfg = exp.cfg
    torch.manual_seed(cfg.train.seed + split.fold + 1000 * split.repeat)
    model, norm, data = fold_setup(exp, task, train["bag_id"].tolist())
    model = model.to(device)
    if dist.enabled:  # the same initial weights on every rank, then its own dropout draws
        torch.manual_seed(cfg.train.seed + split.fold + 1000 * split.repeat + 7919 * dist.rank)
    t0 = time.perf_counter()
    model, history, state = _fit_fold(exp, task, split, model, data, train, val, device, dist)
    train_seconds = time.perf_counter() - t0
    predictor = ModelPredictor(model, data, cfg.train, device, dist)
    val_pred, fwd, pred, train_pred = fold_predictions(
        exp, task, split, predictor, history, train, val, test
    )
    # the fold's ensemble: one place (seed replicas, linear members, a selection's choice)
    model_member = Member(cfg.model_name, pred, train_pred, val_pred)
    members, (pred, train_pred, val_pred), fwd = fold_ensemble(
        exp, task, split, model_member, fwd, (train, val, test), device, dist, selection
    )
    result = FoldResult(history, state, norm, data, test, fwd, pred, train_pred, {}, [], val_pred)
    result.members, result.selection = members, selection
    if inner:  # a selection's inner fold: only its members' predictions are read
        return result
    # the fold's (averaged) predictions scored; instance scores and faithfulness: the model's
    scored = score_fold(
        task,
        predictor,
        test,
        fold_scoring(exp),
        reference=train_pred,
        pred=pred,
        forward=fwd,
    )
    metrics = scored.metrics
    metrics["train_seconds"] = train_seconds
    metrics["epochs"] = int(history["epoch"].max() + 1)
    metrics["seconds_per_epoch"] = train_seconds / metrics["epochs"]
    metrics["steps"] = int(history["steps"].sum())
    result.metrics = metrics
    result.findings = _findings(exp, task, split, train, history, pred, model.trained_by_gradient)
    return result


def _fit_fold(
    exp: Experiment,
    task: Task,
    split: Split,
    model,
    data: BagDataset,
    train: pd.DataFrame,
    val: pd.DataFrame | None,
    device: torch.device,
    dist: Dist,
):
    """The fold's model fitted: by gradient (early stopping on ``val``) or in closed form."""
    cfg = exp.cfg
    if model.trained_by_gradient:
        history, state = fit(
            model,
            task,
            data,
            train,
            val,
            cfg.train,
            device,
            progress=exp.progress,
            desc=f"fold {split.name}",
            dist=dist,
        )
    else:  # the linear baselines: a closed-form fit, the penalty chosen on the validation bags
        history = fit_closed_form(model, task, data, train, val, cfg.train)
        model, state = model.to(device), model.state_dict()
    return model, history, state


def _findings(
    exp: Experiment,
    task: Task,
    split: Split,
    train: pd.DataFrame,
    history: pd.DataFrame,
    pred: pd.DataFrame,
    by_gradient: bool,
) -> list[dict[str, Any]]:
    """The fold's training diagnostics (:func:`mil.train.diagnostics.diagnose`)."""
    cfg = exp.cfg
    epochs = training_budget(task, train, cfg.train).epochs
    headline = task.headline() if task.stop_on != "loss" else None  # a ranking criterion's task
    findings = diagnose(
        history,
        cfg.train,
        task.constant_predictions(pred),
        split.name,
        epochs,
        headline=headline,
        stop=task.stop_criterion(cfg.train.stop_on),
    )
    if not by_gradient:  # no training curve to read: only constant predictions
        findings = [
            {
                **f,
                "message": f"{task.constant_predictions(pred)}, so thresholded metrics sit at "
                "chance whatever the ranking; history.csv lists the penalty grid and its validation loss",
            }
            for f in findings
            if f["kind"] == "constant predictions"
        ]
    return findings


def _write_fold(
    fold_dir: Path,
    exp: Experiment,
    task: Task,
    split: Split,
    r: FoldResult,
    sizes: dict[str, int],
) -> None:
    """The fold's folder; ``metrics.json`` last, since its presence marks the fold finished."""
    cfg = exp.cfg
    fold_dir.mkdir(parents=True, exist_ok=True)
    write_csv(fold_dir / HISTORY, r.history)
    write_csv(fold_dir / PREDICTIONS, r.pred)
    patients = task.patient_predictions(r.pred)
    if patients is not None:
        write_csv(fold_dir / PREDICTIONS_PATIENT, patients)
    if r.train_pred is not None:
        write_csv(fold_dir / PREDICTIONS_TRAIN, r.train_pred)
    if r.val_pred is not None:
        write_csv(fold_dir / PREDICTIONS_VAL, r.val_pred)
    test_bags = [r.data[b] for b in r.test["bag_id"]]
    write_scores(
        fold_dir / SCORES,
        test_bags,
        r.forward.scores,
        r.forward.extra_scores,
        model=cfg.model_name,
        fold=split.name,
    )
    save_model(
        fold_dir / MODEL, exp.checkpoint(task, cfg.model_name, cfg.model_hparams, r.state, r.norm)
    )
    write_artifacts(fold_dir, task.fold_artifacts(r.pred, r.train_pred))
    record = {"fold": split.name, "repeat": split.repeat, **sizes}
    if r.members:  # their files, and each one's own headline metric on this fold
        chosen = None if r.selection is None else r.selection.members
        write_members(fold_dir, exp, task, r.members, chosen)
        record["members"] = {m.name: task.metric_value(m.pred, task.headline()) for m in r.members}
    if r.selection is not None:
        record["selection"] = r.selection.record()
    record.update(classes=task.classes, task=task.name, metrics=r.metrics, diagnostics=r.findings)
    write_json(fold_dir / METRICS, record)
