"""Which metric keys are scores (averaged over folds, given a bootstrap 95% CI) and which are
statistics a table must not average or give a CI: p-values (``*_p``), time horizons
(``*_tau``), timings, a fold's training length and settings each fold chose (the operating
threshold); and the label a table prints for a key."""

from __future__ import annotations

from typing import Literal

#: a p-value (``logrank_p``): its median over folds, never a mean or a CI
P_VALUE_SUFFIX = "_p"
#: a setting that varies by fold (``c_index_uno_tau``, Uno's truncation time): its range
HORIZON_SUFFIX = "_tau"
#: a fold's training time (mean over folds, no CI), in the order tables list them
TIMINGS = ("seconds_per_epoch", "train_seconds")
#: a fold's training length (``metrics.json``), not a metric of its predictions
COUNTS = ("epochs", "steps")
#: a setting each fold chose on its own validation bags (its range over folds, no mean or CI),
#: and what a table says it is
SETTINGS = {"threshold": "the decision threshold chosen on each fold's validation predictions"}
#: the header a table prints for a key, where it prints other than the key
LABELS = {"seconds_per_epoch": "s / epoch", "train_seconds": "train s / fold"}

Kind = Literal["score", "p_value", "horizon", "timing", "count", "setting"]


def is_p_value(name: str) -> bool:
    """Whether ``name`` is a p-value (``*_p``)."""
    return name.endswith(P_VALUE_SUFFIX)


def is_horizon(name: str) -> bool:
    """Whether ``name`` is a time horizon that varies by fold (``*_tau``)."""
    return name.endswith(HORIZON_SUFFIX)


def is_timing(name: str) -> bool:
    """Whether ``name`` is a fold's training time (``train_seconds``, ``seconds_per_epoch``)."""
    return name in TIMINGS


def kind(name: str) -> Kind:
    """What the metric key ``name`` is: a ``score`` (mean ± sd over folds and a 95% CI), a
    ``p_value``, a ``horizon``, a ``timing``, a ``count`` (epochs, steps) or a ``setting``
    chosen per fold (the operating threshold)."""
    if is_p_value(name):
        return "p_value"
    if is_horizon(name):
        return "horizon"
    if is_timing(name):
        return "timing"
    if name in COUNTS:
        return "count"
    if name in SETTINGS:
        return "setting"
    return "score"


def gets_ci(name: str) -> bool:
    """Whether a results table shows ``name`` as a score with its 95% CI."""
    return kind(name) == "score"


def metric_label(name: str) -> str:
    """The header a table prints for the metric key ``name`` (the key itself where it has
    no other)."""
    return LABELS.get(name, name)
