"""The built-in tasks' targets in the cohort table: class labels (classification) and time and
event (survival), read, checked, stratified and counted (:class:`mil.data.targets.Targets`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from mil.data.targets import Targets, label_str, no_missing, quantile_strata, shown
from mil.errors import DataError


def class_names(labels: pd.Series, aliases: dict[str, list[str]] | None = None) -> pd.Series:
    """Each label as the cohort names its class (``1.0`` -> ``"1"``, spaces stripped), an
    alias of ``data.class_aliases`` (``{class: [aliases]}``) read as its class."""
    names = labels.map(label_str)
    if aliases:
        to_class = {label_str(a): label_str(c) for c, some in aliases.items() for a in some}
        names = names.map(lambda n: to_class.get(n, n))
    return names


def _stable_classes(raw: pd.Series) -> list[str]:
    """Classes sorted numerically when all labels are numbers, else as strings."""
    values = raw.dropna().unique()
    try:
        nums = sorted({float(v) for v in values})
        return [label_str(v) for v in nums]
    except (TypeError, ValueError):
        return sorted({label_str(v) for v in values})


class LabelTargets(Targets):
    """``label`` (the class index) from ``data.label_col``; classes in ``data.classes`` order,
    else sorted (numerically where every label is a number); folds stratified on the class."""

    columns = ("label",)
    reserved = ("label_index", "prob_")

    def source_columns(self, data: Any) -> dict[str, str]:
        return {data.label_col: "label_col"}

    def read(
        self, df: pd.DataFrame, slide_ids: pd.Series, data: Any, source: str
    ) -> tuple[pd.DataFrame, list[str]]:
        raw = df[data.label_col]
        no_missing(raw, slide_ids, data.label_col, source)
        labels = class_names(raw, data.class_aliases)
        if data.classes is not None:
            classes = [str(c) for c in data.classes]
            unknown = sorted(set(labels) - set(classes))
            if unknown:
                bad = slide_ids[labels.isin(unknown).to_numpy()].iloc[0]
                raise DataError(
                    f"{source}: label {unknown[0]!r} (slide {bad}) is not in data.classes {classes}"
                )
        else:
            classes = _stable_classes(labels if data.class_aliases else raw)
        if len(classes) < 2:
            raise DataError(
                f"{source}: column {data.label_col!r} has a single class {classes}; need at least 2"
            )
        label = labels.map({c: i for i, c in enumerate(classes)}).astype(int)
        return pd.DataFrame({"label": label.to_numpy()}, index=df.index), classes

    def strata(self, slides: pd.DataFrame) -> list[tuple[str, np.ndarray]]:
        return [("class", slides["label"].to_numpy())]

    def counts(self, part: pd.DataFrame, classes: list[str]) -> pd.Series:
        counts = part["label"].value_counts().reindex(range(len(classes)), fill_value=0)
        counts.index = classes
        return counts

    def check(self, df: pd.DataFrame, data: Any, folds: int) -> list[tuple[str, str]]:
        if data.label_col not in df.columns:
            return []
        counts = df[data.label_col].value_counts()
        return [
            (str(label), f"class has {n} slides, fewer than {folds} folds")
            for label, n in counts.items()
            if n < folds
        ]

    def overview(self, df: pd.DataFrame, data: Any) -> str | None:
        if data.label_col not in df.columns:
            return None
        counts = df[data.label_col].value_counts()
        return "class counts: " + ", ".join(f"{k}: {v}" for k, v in counts.items())


class SurvivalTargets(Targets):
    """``time`` (finite, >= 0) and ``event`` (1 = observed, after ``data.censored_value``) from
    ``data.time_col`` and ``data.event_col``; folds stratified on event status x time quantile
    (then event status alone)."""

    columns = ("time", "event")
    reserved = ("risk", "surv_")

    def __init__(self, n_time_bins: int = 2) -> None:
        self.n_time_bins = n_time_bins

    def source_columns(self, data: Any) -> dict[str, str]:
        return {data.time_col: "time_col", data.event_col: "event_col"}

    def read(
        self, df: pd.DataFrame, slide_ids: pd.Series, data: Any, source: str
    ) -> tuple[pd.DataFrame, list[str]]:
        for col in (data.time_col, data.event_col):
            no_missing(df[col], slide_ids, col, source)
        time = pd.to_numeric(df[data.time_col], errors="coerce")
        invalid = time.isna() | (time < 0) | ~np.isfinite(time.fillna(0.0).to_numpy(float))
        if invalid.any():
            i = int(np.flatnonzero(invalid.to_numpy())[0])
            raise DataError(
                f"{source}: column {data.time_col!r} must hold finite non-negative numbers "
                f"(slide {slide_ids.iloc[i]}: {shown(df[data.time_col].iloc[i])})"
            )
        event = _events(df, slide_ids, data, source)
        if event.sum() == 0:
            raise DataError(
                f"{source}: column {data.event_col!r}: every patient is censored; survival needs events"
            )
        return pd.DataFrame({"time": time.astype(float), "event": event}, index=df.index), []

    def strata(self, slides: pd.DataFrame) -> list[tuple[str, np.ndarray]]:
        # time quantiles within events and within censored patients, so no stratum is tiny
        event = slides["event"].to_numpy(int)
        q = np.zeros(len(slides), dtype=int)
        for e in (0, 1):
            idx = np.flatnonzero(event == e)
            q[idx] = quantile_strata(slides["time"].iloc[idx], self.n_time_bins)
        return [
            ("event status x time quantile", event * self.n_time_bins + q),
            ("event status", event),
        ]

    def counts(self, part: pd.DataFrame, classes: list[str]) -> pd.Series:
        counts = part["event"].value_counts().reindex([0, 1], fill_value=0)
        counts.index = ["censored", "event"]
        return counts

    def check(self, df: pd.DataFrame, data: Any, folds: int) -> list[tuple[str, str]]:
        if "censor" not in data.event_col.lower() or data.censored_value:
            return []
        return [
            (
                data.event_col,
                f"the event column is named {data.event_col!r} but data.censored_value is "
                f"{'not set' if data.censored_value is None else data.censored_value}: its 1s are read "
                f"as events. If 1 means censored (CLAM, Patch-GCN), set data.censored_value: 1",
            )
        ]


def _events(df: pd.DataFrame, slide_ids: pd.Series, data: Any, source: str) -> np.ndarray:
    """``data.event_col`` as 0/1 (1 = observed) after ``data.censored_value``."""
    ev = pd.to_numeric(df[data.event_col], errors="coerce")
    if data.censored_value is not None:
        # two codes, one of them the censored value; otherwise the mapping would
        # silently read every other code (a typo, a third status) as an event
        codes = [shown(c) for c in sorted(ev.dropna().unique().tolist())]
        if data.censored_value not in ev.dropna().unique() or len(codes) > 2:
            raise DataError(
                f"{source}: column {data.event_col!r} holds the values {', '.join(codes[:10])}, "
                f"but data.censored_value = {data.censored_value} needs two codes, one of them "
                f"{data.censored_value} (censored); check data.event_col and data.censored_value"
            )
        ev = (ev != data.censored_value).astype(float).where(ev.notna())
    if ev.isna().any() or not ev.isin([0, 1]).all():
        i = int(np.flatnonzero((~ev.isin([0, 1])).to_numpy())[0])
        raise DataError(
            f"{source}: column {data.event_col!r} must be 0/1 after mapping "
            f"(data.censored_value={data.censored_value}); slide {slide_ids.iloc[i]} has "
            f"{shown(df[data.event_col].iloc[i])}"
        )
    return ev.astype(int).to_numpy()


def label_columns(classes: list[str], bags: pd.DataFrame) -> dict[str, Any]:
    """A class or grade prediction row's outcome: ``label`` (the name) and ``label_index``."""
    index = bags["label"].to_numpy(int)
    return {"label": [classes[i] for i in index], "label_index": index}
