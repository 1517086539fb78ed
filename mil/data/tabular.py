"""Tabular modalities (omics, pathways, clinical covariates) read from CSVs and joined to the
cohort's patients, with their feature groups and the training-fold scaler.

A patient absent from a table keeps its bags: its values are zeros and its availability mask
says the modality is missing. Scaling statistics come from the training fold's patients only
(:meth:`TabularTable.fit`), and the fitted :class:`TabularScaler` is saved with the fold model.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from mil.data.cohort import AVAILABILITY_COL
from mil.data.tabular_groups import read_groups
from mil.data.tabular_read import (
    MISSING_LEVEL,
    TabularSpec,
    encode,
    level_name,
    parse_tabular,
    read_table,
)
from mil.errors import DataError, MilWarning

__all__ = [
    "MISSING_LEVEL",
    "Modality",
    "TabularScaler",
    "TabularSpec",
    "TabularTable",
    "attach_tabular",
    "check_availability_col",
    "encode",
    "join_modality",
    "join_tabular",
    "level_name",
    "parse_tabular",
    "read_groups",
    "read_table",
]


@dataclass
class Modality:
    """One table joined to the cohort's patients.

    ``values [P, F]``: raw values (one-hot columns as 0/1; NaN: a missing cell) in the order of
    :attr:`TabularTable.patients`; ``present [P]``: the patient has a row; ``scaled [F]``: a
    numeric column (scaled) rather than a one-hot indicator; ``groups``: feature positions of
    each group (a feature may be in several, or none).
    """

    name: str
    features: list[str]
    values: np.ndarray
    present: np.ndarray
    scaled: np.ndarray
    groups: list[list[int]]
    group_names: list[str]
    scaling: str = "standard"


@dataclass
class TabularTable:
    """The cohort's tabular modalities; ``bag_patient`` maps each bag to its patient."""

    patients: list[str]
    bag_patient: dict[str, str]
    modalities: list[Modality]

    def layout(self) -> list[dict[str, Any]]:
        """What a fusion model needs to know of the values ``[F]`` (modalities concatenated in
        this order): each modality's name, width and groups (positions within it)."""
        return [
            {
                "name": m.name,
                "dim": len(m.features),
                "groups": [list(g) for g in m.groups],
                "group_names": list(m.group_names),
                "features": list(m.features),
                "scaled": [bool(v) for v in m.scaled],
            }
            for m in self.modalities
        ]

    def aligned(self, layout: list[dict[str, Any]], where: str) -> TabularTable:
        """This (external) cohort's tables laid out as a run's models read theirs (``layout``,
        from the fold checkpoints): the run's modalities, in its column order, matched by
        name. A modality the cohort lacks is missing for every patient (with a warning); a
        one-hot level it never takes is 0, a level the run never saw is read as ``missing``
        (with a warning); a numeric column it lacks is a :class:`DataError`
        naming the modality and column. A layout without feature names (older runs) is
        matched by position and width."""
        by_name = {m.name: m for m in self.modalities}
        out = []
        for spec in layout:
            name, dim = spec["name"], int(spec["dim"])
            m = by_name.get(name)
            if m is None:
                warnings.warn(
                    f"{where}: the run's models read the table {name!r}, which this cohort's "
                    f"data.tabular does not list; every patient is treated as missing it",
                    MilWarning,
                    stacklevel=3,
                )
                values = np.full((len(self.patients), dim), np.nan)
                present = np.zeros(len(self.patients), bool)
            elif spec.get("features") is None:
                if len(m.features) != dim:
                    raise DataError(
                        f"{where}: table {name!r} has {len(m.features)} columns, the run's models read {dim}"
                    )
                values, present = m.values, m.present
            else:
                values, present = _columns_of(m, spec, where, self.patients), m.present
            scaled = np.array(spec.get("scaled", [True] * dim), bool)
            feats = spec.get("features") or [f"{name}_{i}" for i in range(dim)]
            out.append(
                Modality(
                    name,
                    list(feats),
                    values,
                    present,
                    scaled,
                    [list(g) for g in spec["groups"]],
                    list(spec["group_names"]),
                )
            )
        return TabularTable(self.patients, self.bag_patient, out)

    def patterns(self) -> dict[str, str]:
        """Patient -> availability pattern, e.g. ``slides+rna`` (``slides`` alone: no table)."""
        present = np.stack([m.present for m in self.modalities], 1)
        names = [m.name for m in self.modalities]
        return {
            p: "+".join(["slides", *[n for n, ok in zip(names, row) if ok]])
            for p, row in zip(self.patients, present)
        }

    def fit(self, bag_ids: list[str]) -> TabularScaler:
        """Column statistics of the patients of ``bag_ids`` only (each patient once)."""
        rows = sorted({self.patients.index(self.bag_patient[b]) for b in bag_ids})
        centers, scales = [], []
        for m in self.modalities:
            use = [r for r in rows if m.present[r]]
            v = m.values[use] if use else np.full((1, len(m.features)), np.nan)
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column: 0 and 1
                if m.scaling == "minmax":
                    c, s = np.nanmin(v, 0), np.nanmax(v, 0) - np.nanmin(v, 0)
                else:
                    c, s = np.nanmean(v, 0), np.nanstd(v, 0)
            c = np.where(m.scaled & np.isfinite(c), c, 0.0)
            s = np.where(m.scaled & np.isfinite(s) & (s > 1e-8), s, 1.0)
            centers.append(c)
            scales.append(s)
        scaler = TabularScaler(
            torch.tensor(np.concatenate(centers), dtype=torch.float32),
            torch.tensor(np.concatenate(scales), dtype=torch.float32),
        )
        return scaler.bind(self)


@dataclass
class TabularScaler:
    """``(value - center) / scale`` per column (one-hot columns: 0 and 1), missing cells and
    missing modalities 0; ``bag(bag_id)`` gives the values ``[F]`` and availability ``[M]``."""

    center: torch.Tensor
    scale: torch.Tensor
    _values: torch.Tensor | None = field(default=None, repr=False)
    _mask: torch.Tensor | None = field(default=None, repr=False)
    _table: TabularTable | None = field(default=None, repr=False)
    _row: dict[str, int] = field(default_factory=dict, repr=False)

    def bind(self, table: TabularTable) -> TabularScaler:
        """Scale every patient of ``table`` once (a few numbers per patient)."""
        raw = np.concatenate([m.values for m in table.modalities], 1)
        present = np.stack([m.present for m in table.modalities], 1)
        cols = np.concatenate([np.full(len(m.features), i) for i, m in enumerate(table.modalities)])
        v = (torch.tensor(raw, dtype=torch.float32) - self.center) / self.scale
        v = torch.nan_to_num(v, nan=0.0) * torch.tensor(present[:, cols], dtype=torch.float32)
        self._values, self._mask = v, torch.tensor(present, dtype=torch.float32)
        self._table = table
        self._row = {p: i for i, p in enumerate(table.patients)}
        return self

    def bag(self, bag_id: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._table is None:
            return None
        r = self._row[self._table.bag_patient[bag_id]]
        return self._values[r], self._mask[r]

    def state(self) -> dict[str, torch.Tensor]:
        return {"center": self.center, "scale": self.scale}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> TabularScaler:
        return cls(state["center"].float(), state["scale"].float())


def _columns_of(m: Modality, spec: dict[str, Any], where: str, patients: list[str]) -> np.ndarray:
    """``m``'s values in the columns ``spec["features"]`` (see :meth:`TabularTable.aligned`).
    One-hot levels match by :func:`level_name` (a run from before it may read ``stage=4.0``
    where this cohort has ``stage=4``); a patient whose level the run never saw is read as
    the variable's ``missing`` level, with a warning."""
    feats = list(spec["features"])
    scaled = list(spec.get("scaled", [True] * len(feats)))
    suffix = "=" + MISSING_LEVEL
    variables = [f[: -len(suffix)] for f, s in zip(feats, scaled) if not s and f.endswith(suffix)]
    variables.sort(key=len, reverse=True)  # the longest name first: 'stage=x' before 'stage'
    keys = [f if s else _level_key(f, variables) for f, s in zip(feats, scaled)]
    pos = {f if m.scaled[i] else _level_key(f, variables): i for i, f in enumerate(m.features)}
    cols = []
    for f, key, s in zip(feats, keys, scaled):
        if key in pos:
            cols.append(m.values[:, pos[key]])
        elif not s:  # a one-hot level no patient of this cohort has
            cols.append(np.where(m.present, 0.0, np.nan))
        else:
            raise DataError(
                f"{where}: table {m.name!r} has no column {f!r}, which the run's models read; "
                f"list the same columns as the training cohort's data.tabular"
            )
    values = np.stack(cols, 1) if cols else np.zeros((len(m.present), 0))
    for var in variables:
        _unseen_as_missing(m, var, pos, keys, values, where, patients)
    return values


def _unseen_as_missing(
    m: Modality,
    var: str,
    pos: dict[str, int],
    keys: list[str],
    values: np.ndarray,
    where: str,
    patients: list[str],
) -> None:
    """Patients of ``m`` whose level of ``var`` is none of the run's (``keys``) get the run's
    ``var=missing`` in ``values``: the one state of the variable its models know for 'no
    known level' (all-zero one-hots never occurred in training)."""
    run, variables = set(keys), [var]
    hits = {
        k: m.values[:, i] == 1
        for k, i in pos.items()
        if not m.scaled[i] and k not in run and _level_key(k, variables, var=True) == var
    }
    hits = {k: h for k, h in hits.items() if h.any()}
    if not hits:
        return
    hit = np.logical_or.reduce(list(hits.values()))
    values[hit, keys.index(f"{var}={MISSING_LEVEL}")] = 1.0
    levels = ", ".join(repr(k[len(var) + 1 :]) for k in list(hits)[:5])
    warnings.warn(
        f"{where}: table {m.name!r}, column {var!r}: {int(hit.sum())} patient(s) (e.g. "
        f"{patients[int(np.argmax(hit))]}) have a level the run's models never saw ({levels}); "
        f"they are read as {var}={MISSING_LEVEL}, as a blank cell would be",
        MilWarning,
        stacklevel=5,
    )


def _level_key(feature: str, variables: list[str], var: bool = False) -> str | None:
    """``var=level`` with the level named by :func:`level_name` (``var``: the variable alone);
    a feature of no variable in ``variables`` (longest first) is itself (``var``: None)."""
    for v in variables:
        if feature.startswith(v + "="):
            return v if var else f"{v}={level_name(feature[len(v) + 1 :])}"
    return None if var else feature


def join_modality(spec: TabularSpec, patients: list[str]) -> Modality:
    """``spec``'s table aligned to ``patients`` (a missing one: NaN values, not present)."""
    df = read_table(spec)
    enc, numeric = encode(df, spec)
    present = np.array([p in enc.index for p in patients])
    if not present.any():
        raise DataError(
            f"{spec.csv}: no patient of the cohort is in column {spec.id_col!r} (modality {spec.name}); "
            f"e.g. the cohort has {patients[0]!r}, the table {enc.index[0] if len(enc) else 'no rows'!r}"
        )
    if spec.required and not present.all():
        lost = [p for p, ok in zip(patients, present) if not ok]
        raise DataError(
            f"{spec.csv}: patient {lost[0]} ({len(lost)} in all) is not in column {spec.id_col!r} "
            f"(modality {spec.name} is required); drop required to keep them as missing"
        )
    _warn_partial_overlap(spec, patients, present, enc.index)
    values = enc.reindex(patients).to_numpy(float)
    groups, names = read_groups(spec, list(enc.columns))
    return Modality(
        spec.name, list(enc.columns), values, present, numeric, groups, names, spec.scaling
    )


def _warn_partial_overlap(
    spec: TabularSpec, patients: list[str], present: np.ndarray, ids: pd.Index
) -> None:
    """Patients without a row are a missing modality (by design); but when the table also has
    rows that match no patient, ids may be spelt differently: say how many of each."""
    stray = ids.difference(pd.Index(patients))
    if present.all() or not len(stray):
        return
    lost = [p for p, ok in zip(patients, present) if not ok]
    warnings.warn(
        f"{spec.csv}: {len(lost)} of {len(patients)} patients of the cohort (e.g. {lost[0]!r}) have no "
        f"row in column {spec.id_col!r} and are treated as missing modality {spec.name}, while "
        f"{len(stray)} of its rows (e.g. {stray[0]!r}) match no patient; check how the ids are spelt",
        MilWarning,
        stacklevel=3,
    )


def join_tabular(specs: list[TabularSpec], bags: pd.DataFrame) -> TabularTable:
    """Every modality of ``specs`` joined to the patients of a cohort's ``bags``."""
    patients = list(dict.fromkeys(bags["patient_id"]))
    mods = [join_modality(s, patients) for s in specs]
    return TabularTable(patients, dict(zip(bags["bag_id"], bags["patient_id"])), mods)


def check_availability_col(cohort) -> None:
    """The cohort CSV must leave :data:`AVAILABILITY_COL` to ``data.tabular``."""
    if AVAILABILITY_COL in cohort.slides.columns:
        raise DataError(
            f"{cohort.source}: the column {AVAILABILITY_COL!r} is set by data.tabular; rename it in the CSV"
        )


def attach_tabular(cohort, specs: list[TabularSpec]):
    """``cohort`` with its tabular modalities (``cohort.tabular``) and each bag's availability
    pattern in the subgroup column :data:`AVAILABILITY_COL`."""
    check_availability_col(cohort)
    table = join_tabular(specs, cohort.bags)
    pattern = table.patterns()
    for frame in (cohort.slides, cohort.bags):
        frame[AVAILABILITY_COL] = frame["patient_id"].map(pattern).to_numpy()
    if AVAILABILITY_COL not in cohort.group_cols:
        cohort.group_cols.append(AVAILABILITY_COL)
    cohort.tabular = table
    return cohort
