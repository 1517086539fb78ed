"""Did a fold train? Divergence, under-training, a validation loss still falling,
over-fitting and constant predictions, read from the fold's history and test predictions.

Each finding names the fold, what was seen (with numbers) and what to change.
Thresholds (chosen so that a run that learned something does not trip them;
see docs/benchmarks.md, "Training diagnostics"):

* divergence: the training loss of the last epochs stayed above ``DIVERGED`` x the
  loss of the best constant prediction, or it ended above that loss at more than
  ``GREW`` x its first epoch's (a finite loss that grows: an unstable step size;
  a non-finite one stops training with an error in :mod:`mil.train.loop`);
* under-training (when not diverged): the training loss of the last epochs stayed above
  ``UNDERTRAINED`` x the loss of the best constant prediction (the class prior;
  a constant risk; each bin's hazard) on the same batches;
* still improving: the run used every epoch and the validation loss was
  lowest at the last one, having fallen over the last ``LOOKBACK`` epochs by at
  least ``STILL_FALLING`` of its whole range (a converged curve creeping
  towards 0 does not count);
* over-fitting: the validation loss of the kept weights, and of the
  ``LOOKBACK`` epochs before them, is above ``OVERFIT`` x its minimum while the
  training loss fell below ``FITTED`` x the constant loss;
* constant predictions: the task's own test (one predicted class for every
  test bag, or probabilities that do not vary; one risk for all); the advice
  tells a model that never fitted from one whose kept weights predate the fit of
  the training bags (the training loss later fell below ``FITTED`` x the
  constant loss while the validation loss did not improve).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from mil.schema import TrainConfig

DIVERGED = 10.0
GREW = 2.0
UNDERTRAINED = 0.95
STILL_FALLING = 0.02
LOOKBACK = 3
OVERFIT = 1.2
FITTED = 0.5
WARMUP_GAP = 0.01
KEPT_GAP = 0.05


def diagnose(
    history: pd.DataFrame,
    cfg: TrainConfig,
    constant: str | None,
    fold: str,
    epochs: int | None = None,
    headline: str | None = None,
    stop: tuple[str, int] = ("val_loss", -1),
) -> list[dict[str, Any]]:
    """Findings about one fold: ``[{"fold", "kind", "message"}]`` (empty: it trained).

    ``history``: the fold's ``history.csv`` (``train_loss``, ``constant_loss``,
    ``steps``, ``val_loss`` when validated, ``best``); ``constant``: the task's
    reason the test predictions are constant, or None; ``epochs``: the epochs the fold
    could run (:func:`mil.train.optim.training_budget`; default ``cfg.epochs``);
    ``headline``: the task's headline metric (``val_<headline>`` in the history), whose value
    at the kept epoch is checked against its best; ``stop``: the stopping criterion's column
    and sign (:meth:`Task.stop_criterion`), which "still improving" follows and without which
    (a metric, not the loss) "over-fitting" is the kept metric's gap instead.
    """
    found = []
    diverged = _diverged(history, cfg)
    kept_kind, kept_message = _kept_metric(history, cfg, headline) or (None, None)
    for kind, message in (
        ("divergence", diverged),
        (kept_kind, kept_message),
        ("under-training", None if diverged else _undertrained(history, cfg)),
        ("still improving", _still_improving(history, epochs or cfg.epochs, *stop)),
        ("over-fitting", _overfitted(history, cfg) if stop[0] == "val_loss" else None),
        ("constant predictions", _constant(constant, history, cfg, bool(diverged))),
    ):
        if message:
            found.append({"fold": fold, "kind": kind, "message": message})
    return found


def _diverged(h: pd.DataFrame, cfg: TrainConfig) -> str | None:
    if "constant_loss" not in h or not len(h):
        return None
    loss = h["train_loss"].to_numpy(float)
    end, first = float(loss[-min(LOOKBACK, len(loss)) :].min()), float(loss[0])
    constant = float(h["constant_loss"].tail(LOOKBACK).mean())
    if not constant > 0:
        return None
    grew = len(loss) > 1 and loss[-1] > max(GREW * first, constant)
    if end < DIVERGED * constant and not grew:
        return None
    ratio = end / constant
    times = f"{ratio:.3g} times" if ratio >= 10 else f"{ratio:.0%} of"
    rise = f", rising from {first:.3g} in epoch 1 to {loss[-1]:.3g}" if grew else ""
    clip = f"lower it (now {cfg.grad_clip:g})" if cfg.grad_clip else "set it, e.g. 1.0"
    return (
        f"the training loss ended at {end:.3g}, {times} a constant prediction's "
        f"({constant:.3g}){rise}: training diverged (the optimizer's steps are too large). "
        f"Lower train.lr (now {cfg.lr:g}), or clip the gradients: train.grad_clip ({clip})"
    )


def _kept_metric(h: pd.DataFrame, cfg: TrainConfig, headline: str | None) -> tuple[str, str] | None:
    """The kept epoch's validation ``headline`` against the fold's best: a warm-up epoch kept
    where it was more than ``WARMUP_GAP`` below the best, or an epoch early stopping kept
    ``KEPT_GAP`` below it (the stopping criterion and the metric disagree)."""
    col = f"val_{headline}"
    if headline is None or col not in h or "best" not in h or not h["best"].any():
        return None
    v = h[col].to_numpy(float)
    kept = int(np.flatnonzero(h["best"].to_numpy(bool))[-1])
    if not np.isfinite(v[kept]) or not np.isfinite(v).any():
        return None
    best = int(np.nanargmax(v))
    gap = float(v[best] - v[kept])
    before = int(h["steps"].iloc[:kept].sum()) if "steps" in h else cfg.warmup_steps
    seen = f"validation {headline} {v[kept]:.3f} at the kept epoch {kept + 1}, best {v[best]:.3f} at epoch {best + 1}"
    if cfg.warmup_steps and before < cfg.warmup_steps and gap > WARMUP_GAP:
        return "warm-up epoch kept", (
            f"the kept weights are from epoch {kept + 1}, inside the {cfg.warmup_steps}-step "
            f"learning-rate warm-up ({seen}): the stopping criterion rated a barely trained model "
            f"best. Set train.stop_on: {headline}, or train.best_from_epoch past the warm-up"
        )
    if gap > KEPT_GAP and cfg.patience is not None:  # fixed epochs keep the last, as asked
        return "kept below best", (
            f"{seen}: the stopping criterion (train.stop_on = {cfg.stop_on}) and the metric "
            f"disagree; with few validation patients both are noisy. Consider train.stop_on: "
            f"{headline}, or a larger splits.val_fraction"
        )
    return None


def _undertrained(h: pd.DataFrame, cfg: TrainConfig) -> str | None:
    if "constant_loss" not in h or not len(h):
        return None
    last = h.tail(min(LOOKBACK, len(h)))
    loss, constant = float(last["train_loss"].min()), float(last["constant_loss"].mean())
    if not (constant > 0 and loss >= UNDERTRAINED * constant):
        return None
    steps, per_epoch = int(h["steps"].sum()), int(h["steps"].iloc[0])
    return (
        f"the training loss ended at {loss:.3g}, {loss / constant:.0%} of a constant "
        f"prediction's ({constant:.3g}), after {_n(steps, 'optimizer step')} "
        f"({_n(len(h), 'epoch')} of {per_epoch}): the model barely trained. Raise train.min_steps or "
        f"train.epochs, or train.lr (now {cfg.lr:g}); a smaller train.batch_size (now "
        f"{cfg.batch_size}) gives more steps per epoch"
    )


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _still_improving(
    h: pd.DataFrame, epochs: int, column: str = "val_loss", sign: int = -1
) -> str | None:
    if column not in h or len(h) < epochs or len(h) <= LOOKBACK:
        return None
    val = -sign * h[column].to_numpy(float)  # lower is better
    if not np.isfinite(val).all() or val[-1] > val.min():
        return None
    before = val[-1 - LOOKBACK]
    if not before - val[-1] > STILL_FALLING * (
        val.max() - val.min()
    ):  # a flat curve is not improving
        return None
    name = column.removeprefix("val_")
    return (
        f"the validation {name} was still {'falling' if sign < 0 else 'rising'} at the last epoch "
        f"({-sign * before:.3g} -> {-sign * val[-1]:.3g} over the last {LOOKBACK} of {len(h)} "
        f"epochs); raise train.epochs (or train.min_steps)"
    )


def _overfitted(h: pd.DataFrame, cfg: TrainConfig) -> str | None:
    if "val_loss" not in h or "constant_loss" not in h or len(h) <= cfg.best_from_epoch:
        return None
    val = h["val_loss"].to_numpy(float)
    kept = int(np.flatnonzero(h["best"].to_numpy(bool))[-1]) if h["best"].any() else len(h) - 1
    if not np.isfinite(val).all():
        return None
    # the lowest validation loss among the epochs early stopping could have kept
    low = cfg.best_from_epoch + int(val[cfg.best_from_epoch :].argmin())
    train_loss, constant = float(h["train_loss"].iloc[kept]), float(h["constant_loss"].iloc[kept])
    recent = val[max(low + 1, kept - LOOKBACK) : kept + 1]
    if not len(recent) or recent.min() <= OVERFIT * val[low] or train_loss >= FITTED * constant:
        return None
    return (
        f"the validation loss rose from {val[low]:.3g} (epoch {low + 1}) to {val[kept]:.3g} at "
        f"epoch {kept + 1}, whose weights were kept, while the training loss fell to "
        f"{train_loss:.3g}; use early stopping (train.patience) or fewer epochs, or regularise "
        f"more (train.weight_decay, model dropout)"
    )


def _constant(
    reason: str | None, h: pd.DataFrame, cfg: TrainConfig, diverged: bool = False
) -> str | None:
    if reason is None:
        return None
    said = f"{reason}, so thresholded metrics (balanced accuracy, F1; risk groups) sit at chance whatever the ranking"
    if diverged:
        return f"{said}. Training diverged (see divergence): lower train.lr (now {cfg.lr:g})"
    kept = (
        int(np.flatnonzero(h["best"].to_numpy(bool))[-1])
        if "best" in h and h["best"].any()
        else len(h) - 1
    )
    if "constant_loss" in h and len(h) > kept + 1:
        later = float(h["train_loss"].iloc[kept + 1 :].min())
        constant = float(h["constant_loss"].iloc[kept])
        if constant > 0 and later < FITTED * constant <= float(h["train_loss"].iloc[kept]):
            return (
                f"{said}. The kept weights are epoch {kept + 1}'s (the lowest validation loss), "
                f"from before the model fitted the training bags; later epochs brought the "
                f"training loss to {later:.3g} without lowering the validation loss: the model "
                f"memorised the training bags (over-fitting). Regularise more (data.standardize: "
                f"whiten for high-dimensional features, model dropout, train.weight_decay) or "
                f"compare with a linear baseline (mil train --baseline)"
            )
    return f"{said}. If the training loss barely fell (history.csv), raise train.epochs or train.lr (now {cfg.lr:g})"


def summarize_findings(findings: list[dict[str, Any]]) -> list[str]:
    """One line per kind of finding, naming its folds (for the end of ``mil train``)."""
    lines = []
    for kind in dict.fromkeys(f["kind"] for f in findings):
        these = [f for f in findings if f["kind"] == kind]
        folds = ", ".join(f["fold"] for f in these)
        first = these[0]
        lines.append(
            f"{kind} in fold{'s' if len(these) > 1 else ''} {folds} (fold {first['fold']}: "
            f"{first['message']})"
        )
    return lines
