"""The cross-validation runner: cohort -> splits -> one fit per fold -> results folder.

Layout of a run folder::

    config.yaml             resolved config
    splits/                 the split files used
    fold_<k>/history.csv    per-epoch losses and validation metrics
    fold_<k>/predictions.csv, predictions_patient.csv
    fold_<k>/attention.h5   per-instance scores of the test bags (with coords)
    fold_<k>/model.pt       weights + metadata (load with weights_only=True)
    fold_<k>/metrics.json   test metrics; written last: its presence marks the fold done
    summary.csv, summary.json

Every file is written atomically, so an interrupted run resumes from the
folds whose ``metrics.json`` exists.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import torch
import yaml
from sklearn.metrics import roc_auc_score

from mil.config import (
    DEFAULT_PATIENT_COL,
    Config,
    config_from_dict,
    dump_config,
    read_yaml_mapping,
)
from mil.data.cohort import Cohort
from mil.data.dataset import BagDataset, FeatureStore
from mil.errors import ConfigError, DataError, MilWarning
from mil.io import atomic_path, remove_orphan_temps, run_lock, write_csv, write_json, write_text
from mil.models import create, get
from mil.splits import Split, load_or_make_splits, write_splits
from mil.tasks import Task, make_task
from mil.train.distributed import SINGLE, Dist, setup
from mil.train.loop import diverged, fit, predict
from mil.train.summary import summarize


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


class Experiment:
    """Everything a run needs, loaded once: cohort, features, splits, task."""

    def __init__(
        self, cfg: Config, run_dir: Path, force_splits: bool = False, progress: bool = True
    ):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.progress = progress
        if cfg.data.instances:
            from mil.data.instances import load_instances

            # one table of instances: the bags live in memory, no feature files
            self.cohort, self.store = load_instances(cfg)
        else:
            self._load_feature_files(cfg)
        split_dir = Path(cfg.splits.dir) if cfg.splits.dir else self.run_dir / "splits"
        self.splits, made = load_or_make_splits(
            split_dir,
            self.cohort,
            cfg.splits.folds,
            cfg.splits.val_fraction,
            cfg.splits.seed,
            cfg.splits.repeats,
            force=force_splits,
            assignment=cfg.splits.assignment,
            site_col=cfg.data.site_col if cfg.splits.by_site else None,
        )
        self.split_dir = split_dir
        self.model_cls = get(cfg.model_name)
        graph_fn, kind = None, None
        if getattr(self.model_cls, "graph", None):
            from mil.data.graph import bag_graph

            probe = create(cfg.model_name, in_dim=1, n_out=1, **cfg.model_hparams)
            kind, k = probe.graph, probe.graph_k
            graph_fn = lambda bag: bag_graph(bag, kind, k)  # noqa: E731
        # the bags as read; each fold sees them through its own view (BagDataset.with_transform)
        self.data = BagDataset(
            self.cohort.bag_slides,
            self.store,
            graph_fn=graph_fn,
            graph_uses_features=kind != "spatial",
        )

    def _load_feature_files(self, cfg: Config) -> None:
        """Cohort CSV + feature folder."""
        self.cohort = Cohort.from_config(cfg)
        self.store = FeatureStore.from_dir(
            cfg.data.features, budget_gb=cfg.data.cache_gb, cache_dtype=cfg.data.cache_dtype
        )
        missing = [s for s in self.cohort.slides["slide_id"] if s not in self.store.index]
        if missing:
            raise DataError(
                f"{len(missing)} slides of {cfg.data.csv} have no feature file in {cfg.data.features}: "
                f"{', '.join(missing[:5])}{', …' if len(missing) > 5 else ''} (run `mil check` for a full report)"
            )

    def task(self) -> Task:
        return make_task(self.cfg, self.cohort.classes)

    def fold_bags(self, split: Split, part: str) -> pd.DataFrame:
        ids = set(self.cohort.bags_of_slides(split.part(part)))
        b = self.cohort.bags
        return b[b["bag_id"].isin(ids)].reset_index(drop=True)


def prepare_run_dir(cfg: Config, run_dir: Path) -> bool:
    """Write ``config.yaml``; refuse a folder that holds a run of another config.

    Reporting-only keys may change on a finished run: ``data.subgroup_cols``,
    and ``data.site_col`` where the folds are not site-preserved. The saved
    config takes the new values, and the summary joins those columns from the
    cohort CSV (no fold is retrained). Returns whether ``config.yaml`` was written.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    text = dump_config(cfg)
    path = run_dir / "config.yaml"
    if path.is_file():
        old = read_yaml_mapping(path, "run's saved config")
        try:  # fill keys that a newer mil added (with defaults) into the saved config
            old = yaml.safe_load(dump_config(config_from_dict(old, source=str(path))))
        except ConfigError:
            pass  # a key this mil no longer has: the configs differ
        new = yaml.safe_load(text)
        if _run_identity(old) != _run_identity(new):
            raise ConfigError(
                f"{run_dir} holds a run of a different config ({path}); "
                f"use another --out folder, or delete that one to start again"
            )
        if old == new:
            return False
    write_text(path, text)
    return True


def _run_identity(raw: dict) -> dict:
    """The parts of a resolved config that decide a run's results (compared on resume)."""
    raw = copy.deepcopy(raw)
    for key in ("device", "threads"):
        raw.get("train", {}).pop(key, None)
    data = raw.get("data", {})
    data.pop("subgroup_cols", None)
    if not raw.get("splits", {}).get("by_site"):
        data.pop("site_col", None)
    # runs saved before data.patient_col defaulted to null wrote the default "case_id",
    # which resolves to the same patients
    if data.get("patient_col") is None:
        data["patient_col"] = DEFAULT_PATIENT_COL
    return raw


def fold_state(fold_dir: Path) -> str:
    """``"done"`` (a readable ``metrics.json``), ``"todo"`` (none) or ``"damaged"``."""
    path = fold_dir / "metrics.json"
    if not path.is_file():
        return "todo"
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return "damaged"
    return "done" if isinstance(record, dict) and "metrics" in record else "damaged"


def summary_stale(run_dir: Path, n_boot: int) -> bool:
    """Whether ``summary.json``/``report.md`` are missing or older than what they summarise."""
    summary, report = run_dir / "summary.json", run_dir / "report.md"
    if not summary.is_file() or not report.is_file():
        return True
    try:
        if json.loads(summary.read_text()).get("n_boot") != n_boot:
            return True
    except (OSError, UnicodeDecodeError, ValueError):
        return True
    made = min(summary.stat().st_mtime_ns, report.stat().st_mtime_ns)
    sources = [run_dir / "config.yaml", *run_dir.glob("fold_*/metrics.json")]
    return any(p.stat().st_mtime_ns > made for p in sources if p.is_file())


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
    """
    run_dir = Path(run_dir) if run_dir else Path("results") / cfg.name
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
            write_splits(run_dir / "splits", exp.splits, exp.cohort, unless_same=True)
    if dist.main:
        dist.barrier()
    todo = list(range(len(exp.splits))) if folds is None else list(folds)
    bad = [k for k in todo if not 0 <= k < len(exp.splits)]
    if bad:
        raise ConfigError(
            f"--folds: fold {bad[0]} does not exist (the run has folds 0..{len(exp.splits) - 1})"
        )
    # rank 0's view of which folds are finished, so that every rank runs the same folds
    states = dist.broadcast([fold_state(run_dir / f"fold_{exp.splits[k].name}") for k in todo])
    train_now = [k for k, st in zip(todo, states) if st != "done"]
    exp.store.preload(
        [s for k in train_now for p in ("train", "val", "test") for s in exp.splits[k].part(p)],
        progress=progress,
    )
    with torch_threads(cfg.train.threads):
        for k, state in zip(todo, states):
            fold_dir = run_dir / f"fold_{exp.splits[k].name}"
            if state == "done":
                log(
                    f"fold {exp.splits[k].name}: done earlier, skipped ({fold_dir / 'metrics.json'})"
                )
                continue
            if state == "damaged" and dist.main:
                warnings.warn(
                    f"{fold_dir / 'metrics.json'} is damaged (not a readable record of a finished "
                    f"fold); fold {exp.splits[k].name} is trained again",
                    MilWarning,
                    stacklevel=2,
                )
            metrics = run_fold(exp, exp.splits[k], fold_dir, device, dist)
            shown = ", ".join(f"{m}={v:.3f}" for m, v in metrics.items() if isinstance(v, float))
            log(f"fold {exp.splits[k].name}: {shown}")
    # a no-op re-run of a finished run writes nothing
    if dist.main and (train_now or summary_stale(run_dir, n_boot)):
        summarize(run_dir, n_boot=n_boot)
    dist.barrier()  # the other ranks return once the summary exists
    return run_dir


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """``torch.set_num_threads(n)`` for the block only (a notebook keeps its own setting)."""
    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _quiet(*args, **kwargs) -> None:
    """The log of ranks other than 0."""


def run_fold(
    exp: Experiment, split: Split, fold_dir: Path, device: torch.device, dist: Dist = SINGLE
) -> dict[str, Any]:
    """Train and test one fold; write its folder (rank 0 only under torchrun)."""
    cfg = exp.cfg
    train, val, test = (exp.fold_bags(split, p) for p in ("train", "val", "test"))
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"fold {split.name}: empty training or test partition in {exp.split_dir}")
    task = exp.task()
    task.fold_name = split.name  # for messages that name the fold
    task.setup_fold(train)
    # a task may find the validation bags useless for early stopping (survival: no events)
    usable = getattr(task, "validation_usable", None)
    fit_val = val if len(val) and (usable is None or usable(val)) else None
    torch.manual_seed(cfg.train.seed + split.fold + 1000 * split.repeat)
    in_dim = exp.store.dim
    # the fold's own view of the bags: its standardisation, and graphs built under it
    norm = feature_stats(exp.data, train["bag_id"].tolist()) if cfg.data.standardize else None
    data = exp.data.with_transform(None if norm is None else norm.apply)
    model = create(cfg.model_name, in_dim=in_dim, n_out=task.n_out, **cfg.model_hparams).to(device)
    if dist.enabled:  # the same initial weights on every rank, then its own dropout draws
        torch.manual_seed(cfg.train.seed + split.fold + 1000 * split.repeat + 7919 * dist.rank)
    t0 = time.perf_counter()
    history, state = fit(
        model,
        task,
        data,
        train,
        fit_val,
        cfg.train,
        device,
        progress=exp.progress,
        desc=f"fold {split.name}",
        dist=dist,
    )
    train_seconds = time.perf_counter() - t0
    infer = partial(
        predict,
        model,
        data,
        max_instances=cfg.train.max_instances,
        device=device,
        precision=cfg.train.precision,
        dist=dist,
    )
    fwd = infer(test["bag_id"].tolist(), keep_scores=True)
    if not torch.isfinite(fwd.logits).all():
        raise diverged(
            f"fold {split.name}",
            int(history["epoch"].max()),
            "the model's test outputs are NaN or infinite",
            cfg.train,
        )
    pred = task.predictions(test, fwd.logits.numpy())
    for col in exp.cohort.group_cols:  # site and subgroup columns, for subgroup metrics
        pred[col] = test[col].to_numpy()
    train_pred = None
    if getattr(task, "needs_train_predictions", False):
        tfwd = infer(train["bag_id"].tolist())
        train_pred = task.predictions(train, tfwd.logits.numpy())
    metrics = task.metrics(pred, train_pred)
    witness = instance_auc(exp.data, pred, fwd.scores, task.positive_bags(pred))
    if witness is not None:
        metrics["witness_auc"] = witness
    metrics["train_seconds"] = train_seconds
    metrics["epochs"] = int(history["epoch"].max() + 1)
    metrics["seconds_per_epoch"] = train_seconds / metrics["epochs"]
    if not dist.main:
        return metrics

    fold_dir.mkdir(parents=True, exist_ok=True)
    write_csv(fold_dir / "history.csv", history)
    write_csv(fold_dir / "predictions.csv", pred)
    if hasattr(task, "patient_predictions"):
        write_csv(fold_dir / "predictions_patient.csv", task.patient_predictions(pred))
    if train_pred is not None:
        write_csv(fold_dir / "predictions_train.csv", train_pred)
    write_scores(fold_dir / "attention.h5", data, test["bag_id"].tolist(), fwd, cfg, split)
    save_model(fold_dir / "model.pt", state, cfg, in_dim, task, norm)
    extra = getattr(task, "fold_artifacts", None)
    if extra is not None:
        extra(fold_dir, pred, train_pred)
    write_json(
        fold_dir / "metrics.json",
        {
            "fold": split.name,
            "repeat": split.repeat,
            "n_train": len(train),
            "n_val": len(val),
            "n_test": len(test),
            "classes": task.classes,
            "task": task.name,
            "metrics": metrics,
        },
    )
    return metrics


@dataclass
class Standardizer:
    """Per-feature standardisation ``(x - mean) / std`` with statistics of the training bags only."""

    mean: torch.Tensor
    std: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


def feature_stats(data: BagDataset, bag_ids: Sequence[str]) -> Standardizer:
    """Mean and sd of every feature over all instances of ``bag_ids`` (float64 sums, one pass)."""
    total, sq, n = 0.0, 0.0, 0
    for b in bag_ids:
        for s in data.bag_slides[b]:
            x = data.store.get(s)[0].double()
            total = total + x.sum(0)
            sq = sq + (x * x).sum(0)
            n += x.shape[0]
    mean = total / n
    var = (sq / n - mean * mean).clamp(min=0)
    std = var.sqrt()
    std[std < 1e-8] = 1.0  # constant features pass through centred
    return Standardizer(mean=mean.float(), std=std.float())


def instance_auc(
    data: BagDataset, pred: pd.DataFrame, scores: list | None, positive: np.ndarray
) -> float | None:
    """Mean over positive test bags of the instance ROC AUC of scores vs instance labels.

    Defined only where feature files carry ``instance_label`` (the demo's
    planted witnesses, or annotated tumour tiles); bags whose instances are all
    one label are skipped.
    """
    if scores is None:
        return None
    aucs = []
    for bag_id, s, pos in zip(pred["bag_id"], scores, positive):
        if not pos:
            continue
        labels = data.instance_labels(bag_id)
        if labels is None or len(np.unique(labels)) < 2:
            continue
        aucs.append(roc_auc_score(labels, s.numpy()))
    return float(np.mean(aucs)) if aucs else None


def write_scores(
    path: Path, data: BagDataset, bag_ids: list[str], fwd, cfg: Config, split: Split
) -> None:
    """Per-instance scores of each test bag, beside its coordinates, in one h5 file."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["model"] = cfg.model_name
        f.attrs["fold"] = split.name
        f.attrs["has_scores"] = fwd.scores is not None
        # "scores" holds the model's main instance scores; "scores_<kind>" the extra kinds
        f.attrs["score_kinds"] = ",".join(fwd.extra_scores)
        for i, bag_id in enumerate(bag_ids):
            g = f.create_group(bag_id.replace("/", "|"))
            g.attrs["bag_id"] = bag_id
            bag = data[bag_id]
            g.attrs["slides"] = list(bag.slides)
            g.attrs["slide_ptr"] = list(bag.slide_ptr)
            if bag.coords is not None:
                g.create_dataset("coords", data=bag.coords.numpy())
            if fwd.scores is not None:
                g.create_dataset("scores", data=fwd.scores[i].numpy().astype(np.float32))
            for kind, vals in fwd.extra_scores.items():
                g.create_dataset(f"scores_{kind}", data=vals[i].numpy().astype(np.float32))


def save_model(
    path: Path, state: dict, cfg: Config, in_dim: int, task: Task, norm: Standardizer | None = None
) -> None:
    """Weights and what is needed to rebuild the model; loadable with ``weights_only=True``."""
    payload = {
        "standardize": None if norm is None else {"mean": norm.mean, "std": norm.std},
        "state_dict": state,
        "model": cfg.model_name,
        "hparams": cfg.model_hparams,
        "in_dim": int(in_dim),
        "n_out": int(task.n_out),
        "task": task.name,
        "classes": list(task.classes),
        "task_state": task.state(),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def read_checkpoint(path: str | Path, map_location: str = "cpu") -> dict[str, Any]:
    """A ``model.pt`` payload (``torch.load(weights_only=True)``); a missing, damaged or
    foreign file is a :class:`DataError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch/pickle raise many types for a damaged file
        raise DataError(
            f"{path}: cannot read this checkpoint ({type(exc).__name__}: {str(exc)[:200]}); "
            f"the file is damaged or not a mil model.pt. Delete {path.parent / 'metrics.json'} "
            f"and re-run `mil train` on the run folder to train the fold again"
        ) from None
    missing = (
        [k for k in ("state_dict", "model", "hparams", "in_dim", "n_out") if k not in payload]
        if isinstance(payload, dict)
        else ["state_dict"]
    )
    if missing:
        raise DataError(
            f"{path}: not a mil checkpoint (no {missing[0]!r}); was it written by `mil train`?"
        )
    return payload


def load_model(path: str | Path, map_location: str = "cpu"):
    """Rebuild a model saved by :func:`save_model` (``torch.load(weights_only=True)``)."""
    payload = read_checkpoint(path, map_location=map_location)
    model = create(
        payload["model"], in_dim=payload["in_dim"], n_out=payload["n_out"], **payload["hparams"]
    )
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model, payload
