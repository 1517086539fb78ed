"""``mil train --refit``: one model refit on every bag of a finished cross-validation.

Cross-validation estimates how well a recipe generalises; the model a user ships
(or scores an external cohort with) is then often fitted once on all the data.
The refit chooses nothing by looking at data it will be scored on:

- **gradient-trained models** train for the median over folds of the epoch
  count cross-validation kept (the early-stopped epoch + 1; with fixed epochs,
  all of them). The learning-rate schedule is laid out over the median of the
  folds' step budgets (``train.epochs``, raised to ``train.min_steps`` as each
  fold was), so the refit's learning rate at each epoch is the folds' and it
  stops where they stopped. No bag is held out for validation.
- **the linear baselines** fit once at the geometric median of the penalties the
  folds chose on their validation bags.
- the preprocessing (``data.standardize``, the scalers of ``data.tabular``) and the
  task's fold state (class weights, survival bins) are fitted on every bag, as a fold's
  are on its training bags (:func:`mil.train.runner.fold_setup`); a binary decision threshold
  is the median of the folds' (:meth:`mil.tasks.Task.ensemble_operating_point`).

It writes ``<run>/refit/model.pt`` and ``history.csv``, then ``refit.json``
(last: its presence marks the refit finished, so a re-run skips it, unless
``refit.json`` or ``model.pt`` cannot be read: then the refit is made again).
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mil.config import Config, other_preprocessing
from mil.errors import DataError, MilError
from mil.io import read_json, write_csv, write_json
from mil.results import HISTORY, METRICS, MODEL, REFIT, REFIT_JSON, RunFolder
from mil.results.checkpoint import read_checkpoint, save_model
from mil.results.members import member_dir
from mil.train.closed_form import fit_closed_form
from mil.train.experiment import Experiment
from mil.train.loop import fit
from mil.train.members import refit_members, write_members
from mil.train.optim import training_budget
from mil.train.replicas import REPLICA_SEED
from mil.train.runner import fold_setup
from mil.train.selection import DEFAULT, candidates, fitted_members


def refit_done(run_dir: str | Path) -> bool:
    """Whether ``<run_dir>/refit/refit.json`` exists (the refit finished)."""
    return (Path(run_dir) / REFIT / REFIT_JSON).is_file()


def fold_history(run: RunFolder, fold: str) -> pd.DataFrame:
    """A finished fold's ``history.csv`` with the columns the refit reads (``epoch``,
    ``best``); a missing, empty or damaged one is a :class:`DataError` that says how to
    train the fold again (its ``metrics.json`` marks it finished, so a re-run skips it)."""
    path = run.fold_file(fold, HISTORY)
    redo = (
        f"the refit reads every fold's history for its training budget. Delete "
        f"{run.fold_file(fold, METRICS)} and re-run `mil train` on this run folder "
        f"(--out {run.path}) to train fold {fold} again, then refit"
    )
    try:
        hist = pd.read_csv(path)
    except FileNotFoundError:
        raise DataError(f"{path} is missing; {redo}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # pandas' errors are ValueErrors
        raise DataError(f"{path}: cannot read this history ({exc}); {redo}") from None
    missing = [c for c in ("epoch", "best") if c not in hist.columns]
    if missing:
        raise DataError(f"{path}: not a fold history (no column {missing[0]!r}); {redo}")
    if not len(hist) or not pd.api.types.is_numeric_dtype(hist["epoch"]):
        raise DataError(f"{path}: not a fold history (no epochs, or epochs not numbers); {redo}")
    return hist


def chosen_budget(exp: Experiment, run: RunFolder) -> dict[str, Any]:
    """What cross-validation chose, from the finished folds' ``history.csv``: per fold the
    kept epoch count (gradient models) or penalty (linear baselines) and, for gradient
    models, the fold's step budget in epochs; and the refit's choice (their medians)."""
    folds = {s.name: s for s in exp.splits}
    records = run.records()
    missing = [f for f in folds if f not in records]
    if missing:
        raise MilError(
            f"{run.path}: fold {missing[0]} is not finished; the refit takes its training "
            f"budget from every fold (run `mil train` to the end first)"
        )
    task = exp.task()
    kept, budgets, penalties = {}, {}, {}
    for name in folds:
        hist = fold_history(run, name)
        best = hist.loc[hist["best"].astype(bool)]
        row = best.iloc[-1] if len(best) else hist.iloc[-1]
        for col in ("C", "alpha"):  # a linear baseline's penalty grid
            if col in hist.columns:
                penalties[name] = float(row[col])
        kept[name] = int(row["epoch"]) + 1
        train = exp.fold_bags(folds[name], "train")
        budgets[name] = training_budget(task, train, exp.cfg.train).epochs
    out: dict[str, Any] = {"per_fold_epochs": kept, "per_fold_budget_epochs": budgets}
    if penalties:
        out["per_fold_penalty"] = penalties
        out["penalty"] = float(np.exp(np.median(np.log(list(penalties.values())))))
    else:
        out["epochs"] = int(round(float(np.median(list(kept.values())))))
        out["budget_epochs"] = max(
            out["epochs"], int(round(float(np.median(list(budgets.values())))))
        )
    return out


def _fit_all(model, task, data, bags, train_cfg, device, progress, desc: str, choice: dict):
    """A gradient model trained on every bag for the budget the folds chose."""
    return fit(
        model.to(device),
        task,
        data,
        bags,
        None,
        train_cfg,
        device,
        progress=progress,
        desc=desc,
        stop_after=choice["epochs"],
    )


def refit(
    cfg: Config,
    run_dir: str | Path,
    device: str | torch.device = "cpu",
    progress: bool = True,
    log=print,
) -> Path:
    """Refit the run's model on every bag (see the module); returns ``<run_dir>/refit``.
    A finished refit is left as it is."""
    device = torch.device(device)
    run = RunFolder(run_dir)
    out = run.path / REFIT
    if _finished(run.path, log):
        log(f"refit: done earlier, skipped ({out / REFIT_JSON})")
        return out
    exp = Experiment(cfg, run.path, progress=progress)
    choice = chosen_budget(exp, run)
    bags = exp.cohort.bags.reset_index(drop=True)
    exp.store.preload(exp.cohort.slides["slide_id"].tolist(), progress=progress)
    task = exp.task()
    task.setup_fold(bags, fold_name=REFIT)
    task.ensemble_operating_point([r["metrics"] for r in run.records().values()])
    torch.manual_seed(cfg.train.seed + 104729)
    model, norm, data = fold_setup(exp, task, bags["bag_id"].tolist())  # as a fold's
    t0 = time.perf_counter()
    if model.trained_by_gradient:
        train_cfg = dataclasses.replace(
            cfg.train, epochs=choice["budget_epochs"], min_steps=None, patience=None
        )
        history, state = _fit_all(
            model, task, data, bags, train_cfg, device, progress, "refit", choice
        )
    else:
        history = fit_closed_form(model, task, data, bags, None, cfg.train, (choice["penalty"],))
        state = model.state_dict()
    replicas = [(model.to(device), norm, data, history)]
    if model.trained_by_gradient:  # train.seeds: the replicas, refit as the model
        for j in range(1, cfg.train.seeds):
            seed = cfg.train.seed + REPLICA_SEED * j
            torch.manual_seed(seed + 104729)
            rep, rep_norm, rep_data = fold_setup(exp, task, bags["bag_id"].tolist())
            rep_cfg = dataclasses.replace(train_cfg, seed=seed)
            desc = f"refit seed {j}"
            rep_history, _ = _fit_all(
                rep, task, rep_data, bags, rep_cfg, device, progress, desc, choice
            )
            replicas.append((rep, rep_norm, rep_data, rep_history))
    names, chosen = refit_choice(cfg, run)
    alt = _other_preprocessing(exp, task, bags, chosen, device, progress, choice)
    seconds = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    if (names or len(replicas) > 1 or alt) and model.trained_by_gradient:  # the ensemble, refit
        choice["member_penalty"] = member_penalties(run, names)
        members = refit_members(
            exp, task, bags, replicas, choice["member_penalty"], device, names, alt
        )
        write_members(out, exp, task, members, chosen)
    if chosen is not None:  # select: the members most folds chose
        choice["selection"] = chosen
    write_csv(out / HISTORY, history)
    save_model(out / MODEL, exp.checkpoint(task, cfg.model_name, cfg.model_hparams, state, norm))
    record = {
        "n_bags": len(bags),
        "n_patients": int(bags["patient_id"].nunique()),
        "train_seconds": seconds,
        **choice,
        "epochs_trained": int(history["epoch"].max()) + 1 if model.trained_by_gradient else None,
        "threshold": task.state().get("threshold"),
    }
    write_json(out / REFIT_JSON, record)
    what = (
        f"{record['epochs_trained']} epochs"
        if model.trained_by_gradient
        else (f"penalty {choice['penalty']:.3g}")
    )
    log(f"refit: {len(bags)} bags, {what} (chosen by cross-validation) -> {out / MODEL}")
    return out


def _other_preprocessing(
    exp: Experiment, task, bags: pd.DataFrame, chosen, device, progress: bool, choice
) -> tuple[str, tuple] | None:
    """The model on the other preprocessing refit as the model is (name, (model, its
    preprocessing, view of the bags, history)), where the selection chose it; else None."""
    alt = other_preprocessing(exp.cfg)
    if alt is None or chosen is None or alt[0] not in chosen:
        return None
    train_cfg = dataclasses.replace(
        exp.cfg.train, epochs=choice["budget_epochs"], min_steps=None, patience=None
    )
    torch.manual_seed(exp.cfg.train.seed + 104729)  # the refit model's seed
    model, norm, data = exp.fold_setup(task, bags["bag_id"].tolist(), standardize=alt[1])
    desc = f"refit {alt[0]}"
    history, _ = _fit_all(model, task, data, bags, train_cfg, device, progress, desc, choice)
    return alt[0], (model.to(device), norm, data, history)


def refit_choice(cfg: Config, run: RunFolder) -> tuple[list[str], list[str] | None]:
    """The linear members the refit fits and, under ``select:``, the members it predicts with:
    those of the candidate most folds chose (a tie: ``default`` if tied, else the first in
    :func:`~mil.train.selection.candidates`' order)."""
    if cfg.select.mode == "none":
        return list(cfg.members), None
    options = candidates(cfg)
    votes = Counter(r["selection"]["chosen"] for r in run.records().values() if "selection" in r)
    top = max(votes.values(), default=0)
    tied = [c for c in options if votes.get(c, 0) == top]
    best = DEFAULT if DEFAULT in tied or not tied else tied[0]
    chosen = options[best]
    return [n for n in fitted_members(cfg) if n in chosen], chosen


def member_penalties(run: RunFolder, names: list[str]) -> dict[str, float]:
    """Per linear member of the ensemble, the geometric median of the penalties its folds
    chose on their validation bags (``members/<name>/history.csv``)."""
    out = {}
    for name in names:
        found = []
        for fold in run.records():
            path = member_dir(run.fold_dir(fold), name) / HISTORY
            try:
                hist = pd.read_csv(path)
                row = hist.loc[hist["best"].astype(bool)].iloc[-1]
                found.append(float(row["C"] if "C" in hist.columns else row["alpha"]))
            except (OSError, ValueError, KeyError, IndexError) as exc:
                raise DataError(
                    f"{path}: cannot read the ensemble member's penalty ({exc}); delete "
                    f"{run.fold_file(fold, METRICS)} and re-run `mil train` to train fold {fold} again"
                ) from None
        out[name] = float(np.exp(np.median(np.log(found))))
    return out


def _finished(run_dir: Path, log) -> bool:
    """Whether an earlier refit finished and its files can be read. A damaged ``refit.json``
    or ``model.pt`` (a partial copy, a full disk) is said, and its ``refit.json`` removed, so
    that the refit is made again (a kill during the new one then leaves no stale record)."""
    if not refit_done(run_dir):
        return False
    record, model = run_dir / REFIT / REFIT_JSON, run_dir / REFIT / MODEL
    for path in (record, model):
        try:
            read_refit(run_dir) if path == record else read_checkpoint(path)
        except MilError:
            log(f"refit: {path} of the earlier refit cannot be read; making the refit again")
            record.unlink(missing_ok=True)
            return False
    return True


def read_refit(run_dir: str | Path) -> dict[str, Any]:
    """``refit.json`` of a run; a :class:`MilError` if the run has no finished refit, or one
    whose record cannot be read."""
    path = Path(run_dir) / REFIT / REFIT_JSON
    redo = f"make the refit again: `mil train CONFIG --out {run_dir} --refit`"
    if not path.is_file():
        raise MilError(
            f"{run_dir}: no refit model ({path} is missing); make it with "
            f"`mil train CONFIG --out {run_dir} --refit`"
        )
    record = read_json(path, "refit record", redo)
    if not isinstance(record, dict):
        raise DataError(
            f"{path}: not a refit record (a JSON object; found a {type(record).__name__}); {redo}"
        )
    return record
