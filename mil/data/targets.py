"""What a task reads from the cohort table as its targets: the interface the cohort, the splits
and ``mil check`` call, and the checks every reader shares (missing values, numbers).

A task (:mod:`mil.tasks`) owns its targets: its :meth:`~mil.tasks.Task.target_reader` gives
a :class:`Targets`, which :mod:`mil.config` puts into ``cfg.task.targets``. The data layer
calls it and never asks which task it serves.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from mil.errors import DataError

#: columns of ``predictions.csv`` every task writes (a subgroup column must not take these names)
PREDICTION_ID_COLUMNS = ("bag_id", "patient_id", "fold", "pred")


class Targets:
    """A task's targets in the cohort table: which columns, read and checked how, and what
    the folds are stratified on.

    ``read`` turns the table's target columns into the bag columns :attr:`columns` (a
    :class:`DataError` names the column, the slide and the value it refuses); ``strata`` gives
    per-slide stratification labels, finest first; ``counts`` the split descriptor's rows.
    """

    #: the targets' columns of ``Cohort.slides`` / ``Cohort.bags`` (``label``; ``time``, ``event``)
    columns: tuple[str, ...] = ()
    #: further columns (or prefixes, ending in ``_``) of the task's ``predictions.csv``
    reserved: tuple[str, ...] = ()
    #: an empty cell of a source column is a missing label the task reads (``multitarget``),
    #: not an error ``mil check`` reports
    missing_allowed: bool = False

    def source_columns(self, data: Any) -> dict[str, str]:
        """The cohort-table columns the targets come from -> the config key naming each
        (``label_col`` for ``data.label_col``; a dotted key as it is, ``task.count_col``), in
        the order of :attr:`columns`."""
        raise NotImplementedError

    def read(
        self, df: pd.DataFrame, slide_ids: pd.Series, data: Any, source: str
    ) -> tuple[pd.DataFrame, list[str]]:
        """The targets of each row of ``df`` (a frame of :attr:`columns`, ``df``'s index) and
        the class names in index order ([] for a task without classes)."""
        raise NotImplementedError

    def strata(self, slides: pd.DataFrame) -> list[tuple[str, np.ndarray]]:
        """Per-slide stratification labels, finest first (named as the report says them):
        what a split may fall back to when a training fold is too small for the finest."""
        return [("none", np.zeros(len(slides), dtype=int))]

    def counts(self, part: pd.DataFrame, classes: list[str]) -> pd.Series:
        """Slides of one partition by outcome, for ``splits_<k>_descriptor.csv``."""
        return pd.Series({"slides": len(part)})

    def check(self, df: pd.DataFrame, data: Any, folds: int) -> list[tuple[str, str]]:
        """``mil check``'s warnings about the targets (``(where, what)``): a class smaller than
        ``folds``, an event column that looks like a censoring flag."""
        return []

    def overview(self, df: pd.DataFrame, data: Any) -> str | None:
        """One line for ``mil check``'s report (class counts, a target's range)."""
        return None

    def __eq__(self, other: object) -> bool:  # readers are values: two configs compare equal
        return type(other) is type(self) and vars(other) == vars(self)

    __hash__ = None  # type: ignore[assignment]

    def is_reserved(self, col: str) -> bool:
        """Whether ``col`` names a column of the task's predictions."""
        names = (*PREDICTION_ID_COLUMNS, *self.columns, *self.reserved)
        return col in names or any(n.endswith("_") and col.startswith(n) for n in self.reserved)


# ---- checks every reader shares ---------------------------------------------------------------


def no_missing(col: pd.Series, slide_ids: pd.Series, name: str, source: str) -> None:
    """A :class:`DataError` naming the slides without a value in column ``name``."""
    missing = col.isna() | (col.astype(str).str.strip() == "")
    if missing.any():
        ids = slide_ids[missing].tolist()
        raise DataError(
            f"{source}: {len(ids)} rows have no value in column {name!r} (slides {', '.join(ids[:5])}"
            f"{', …' if len(ids) > 5 else ''}); fill them in or remove those rows"
        )


def shown(v) -> str:
    """A CSV value for a message: ``-3.0``, ``inf``, ``'yes'`` (never ``np.float64(-3.0)``)."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return repr(v) if isinstance(v, str) else str(v)


def label_str(v) -> str:
    """A label as text: ``1.0`` -> ``"1"``, surrounding spaces removed."""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).strip()


def finite_numbers(
    col: pd.Series, slide_ids: pd.Series, name: str, source: str, what: str = "finite numbers"
) -> pd.Series:
    """Column ``name`` as floats; a value that is not a finite number is a :class:`DataError`
    naming its slide and the value."""
    values = pd.to_numeric(col, errors="coerce")
    bad = values.isna() | ~np.isfinite(values.fillna(0.0).to_numpy(float))
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            f"{source}: column {name!r} must hold {what} (slide {slide_ids.iloc[i]}: "
            f"{shown(col.iloc[i])})"
        )
    return values.astype(float)


def quantile_strata(values: pd.Series | np.ndarray, n_bins: int) -> np.ndarray:
    """Per-row quantile bin (``0 .. n_bins - 1``) of ``values`` by rank, ties broken by order."""
    v = pd.Series(np.asarray(values, dtype=float))
    bins = min(n_bins, len(v))
    if bins < 2:
        return np.zeros(len(v), dtype=int)
    return pd.qcut(v.rank(method="first"), bins, labels=False).to_numpy(int)
