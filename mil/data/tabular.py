"""Tabular modalities (omics, pathways, clinical covariates) read from CSVs and joined to the
cohort's patients, with their feature groups and the training-fold scaler.

A patient absent from a table keeps its bags: its values are zeros and its availability mask
says the modality is missing. Scaling statistics come from the training fold's patients only
(:meth:`TabularTable.fit`), and the fitted :class:`TabularScaler` is saved with the fold model.
"""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mil.data.cohort import AVAILABILITY_COL, normalize_id
from mil.errors import ConfigError, DataError, MilWarning

#: a gene of MCAT's ``signatures.csv`` joins its group with these columns of the omics table
GENE_SUFFIXES = ("", "_mut", "_cnv", "_rnaseq", "_rna", "_mrna")
SPEC_KEYS = ("name", "csv", "id_col", "columns", "categorical", "groups", "scaling", "required")
SCALINGS = ("standard", "minmax")
MISSING_LEVEL = "missing"


@dataclass(frozen=True)
class TabularSpec:
    """One ``data.tabular`` entry.

    ``columns``: the table's feature columns (names or glob patterns such as ``*_rnaseq``;
    null: every column but ``id_col``); ``categorical``: columns one-hot encoded with a
    ``missing`` level; ``groups``: MCAT's ``signatures.csv`` (one column of gene symbols per
    group) or a 0/1 composition matrix (first column: feature names, one column per group);
    ``scaling``: per-column z-scores (``standard``) or SurvPath's min-max; ``required``: a
    cohort patient absent from the table is an error instead of a missing modality.
    """

    name: str
    csv: str
    id_col: str = "case_id"
    columns: tuple[str, ...] | None = None
    categorical: tuple[str, ...] = ()
    groups: str | None = None
    scaling: str = "standard"
    required: bool = False


def parse_tabular(raw: list[dict[str, Any]], source: str) -> list[TabularSpec]:
    """``data.tabular`` as specs; an unknown key or a bad value is a :class:`ConfigError`."""
    specs: list[TabularSpec] = []
    for i, item in enumerate(raw):
        key = f"data.tabular[{i}]"
        unknown = sorted(set(item) - set(SPEC_KEYS))
        if unknown:
            raise ConfigError(f"{source}: unknown key '{key}.{unknown[0]}'; valid keys: {', '.join(SPEC_KEYS)}")
        for need in ("name", "csv"):
            if not isinstance(item.get(need), str) or not item[need]:
                raise ConfigError(f"{source}: {key}.{need} must be given (a string)")
        name = item["name"]
        if name == "slides" or not name.replace("_", "").isalnum() or any(s.name == name for s in specs):
            raise ConfigError(f"{source}: {key}.name = {name!r}: a modality name is a unique word other than 'slides'")
        for lst in ("columns", "categorical"):
            v = item.get(lst)
            if v is not None and (not isinstance(v, list) or not all(isinstance(c, str) for c in v)):
                raise ConfigError(f"{source}: {key}.{lst} must be a list of column names, found {v!r}")
        if item.get("scaling", "standard") not in SCALINGS:
            raise ConfigError(f"{source}: {key}.scaling = {item['scaling']!r}; expected one of {list(SCALINGS)}")
        if not isinstance(item.get("required", False), bool):
            raise ConfigError(f"{source}: {key}.required must be true or false")
        cols = item.get("columns")
        specs.append(TabularSpec(
            name=name, csv=str(item["csv"]), id_col=str(item.get("id_col", "case_id")),
            columns=None if cols is None else tuple(cols), categorical=tuple(item.get("categorical") or ()),
            groups=item.get("groups"), scaling=item.get("scaling", "standard"),
            required=bool(item.get("required", False)),
        ))  # fmt: skip
    return specs


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
            {"name": m.name, "dim": len(m.features), "groups": [list(g) for g in m.groups],
             "group_names": list(m.group_names), "features": list(m.features),
             "scaled": [bool(v) for v in m.scaled]}
            for m in self.modalities
        ]  # fmt: skip

    def aligned(self, layout: list[dict[str, Any]], where: str) -> TabularTable:
        """This (external) cohort's tables laid out as a run's models read theirs (``layout``,
        from the fold checkpoints): the run's modalities, in its column order, matched by
        name. A modality the cohort lacks is missing for every patient (with a warning); a
        one-hot level it never takes is 0; a numeric column it lacks is a :class:`DataError`
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
                    MilWarning, stacklevel=3,
                )  # fmt: skip
                values = np.full((len(self.patients), dim), np.nan)
                present = np.zeros(len(self.patients), bool)
            elif spec.get("features") is None:
                if len(m.features) != dim:
                    raise DataError(f"{where}: table {name!r} has {len(m.features)} columns, the run's models read {dim}")
                values, present = m.values, m.present
            else:
                values, present = _columns_of(m, spec, where), m.present
            scaled = np.array(spec.get("scaled", [True] * dim), bool)
            feats = spec.get("features") or [f"{name}_{i}" for i in range(dim)]
            out.append(Modality(name, list(feats), values, present, scaled,
                                [list(g) for g in spec["groups"]], list(spec["group_names"])))  # fmt: skip
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


def _columns_of(m: Modality, spec: dict[str, Any], where: str) -> np.ndarray:
    """``m``'s values in the columns ``spec["features"]`` (see :meth:`TabularTable.aligned`)."""
    pos = {f: i for i, f in enumerate(m.features)}
    cols = []
    for f, scaled in zip(spec["features"], spec.get("scaled", [True] * len(spec["features"]))):
        if f in pos:
            cols.append(m.values[:, pos[f]])
        elif not scaled:  # a one-hot level no patient of this cohort has
            cols.append(np.where(m.present, 0.0, np.nan))
        else:
            raise DataError(
                f"{where}: table {m.name!r} has no column {f!r}, which the run's models read; "
                f"list the same columns as the training cohort's data.tabular"
            )
    return np.stack(cols, 1) if cols else np.zeros((len(m.present), 0))


def read_table(spec: TabularSpec) -> pd.DataFrame:
    """The table of ``spec`` indexed by patient id (one row each; repeated identical rows, as
    in MCAT's one-row-per-slide CSVs, are one); errors name the file and column."""
    path = Path(spec.csv)
    if not path.is_file():
        raise DataError(f"data.tabular {spec.name}: table not found: {path}")
    try:
        df = pd.read_csv(path, dtype={spec.id_col: str})
    except Exception as exc:
        raise DataError(f"{path}: cannot read the table of modality {spec.name} ({exc})") from None
    if spec.id_col not in df.columns:
        raise DataError(f"{path}: no column {spec.id_col!r} (data.tabular {spec.name}.id_col); columns: {', '.join(map(str, df.columns[:10]))}")
    df[spec.id_col] = df[spec.id_col].map(normalize_id)
    cols = _select_columns(df, spec, path)
    df = df[[spec.id_col, *cols]].drop_duplicates()
    dup = df[spec.id_col][df[spec.id_col].duplicated()]
    if len(dup):
        raise DataError(f"{path}: patient {dup.iloc[0]} has rows with different values (column {spec.id_col!r} must identify a patient)")
    return df.set_index(spec.id_col)


def _select_columns(df: pd.DataFrame, spec: TabularSpec, path: Path) -> list[str]:
    others = [str(c) for c in df.columns if c != spec.id_col]
    if spec.columns is None:
        return others
    cols: list[str] = []
    for pat in spec.columns:
        hit = fnmatch.filter(others, pat) if any(ch in pat for ch in "*?[") else [pat] if pat in others else []
        if not hit:
            raise DataError(f"{path}: no column {pat!r} (data.tabular {spec.name}.columns)")
        cols += [c for c in hit if c not in cols]
    for c in spec.categorical:
        if c not in cols:
            raise DataError(f"{path}: data.tabular {spec.name}.categorical names {c!r}, which is not among its columns")
    return cols


def encode(df: pd.DataFrame, spec: TabularSpec) -> tuple[pd.DataFrame, np.ndarray]:
    """Numeric columns as floats and categorical ones one-hot (``col=level``, with a
    ``missing`` level); returns the frame and which columns are numeric. A non-numeric value
    in a column not declared categorical is a :class:`DataError` naming file and column."""
    parts, numeric = [], []
    for col in df.columns:
        raw = df[col]
        if col in spec.categorical:
            levels = sorted(raw.dropna().astype(str).unique().tolist())
            text = raw.map(lambda v: MISSING_LEVEL if pd.isna(v) else str(v))
            for level in [*levels, MISSING_LEVEL]:
                parts.append((text == level).astype(float).rename(f"{col}={level}"))
                numeric.append(False)
            continue
        num = pd.to_numeric(raw, errors="coerce")
        bad = num.isna() & raw.notna()
        if bad.any():
            pid = raw.index[bad.to_numpy()][0]
            raise DataError(
                f"{spec.csv}: column {col!r} (modality {spec.name}) is not numeric: {raw[pid]!r} for "
                f"patient {pid}; list it under data.tabular {spec.name}.categorical, or leave it out of columns"
            )
        parts.append(num.astype(float).rename(col))
        numeric.append(True)
    return pd.concat(parts, axis=1), np.array(numeric, dtype=bool)


def read_groups(spec: TabularSpec, features: list[str]) -> tuple[list[list[int]], list[str]]:
    """Feature positions of each group of ``spec.groups``: a 0/1 composition matrix (features x
    groups) or MCAT's ``signatures.csv`` (a gene joins its group with its ``_mut``, ``_cnv``,
    ``_rnaseq`` columns). Without a groups file, one group of all features."""
    if spec.groups is None:
        return [list(range(len(features)))], [spec.name]
    path = Path(spec.groups)
    if not path.is_file():
        raise DataError(f"data.tabular {spec.name}.groups: file not found: {path}")
    g = pd.read_csv(path)
    where = {f: i for i, f in enumerate(features)}
    first = g.iloc[:, 0].astype(str)
    rest = g.iloc[:, 1:]
    composition = rest.shape[1] > 0 and first.isin(where).any() and rest.isin([0, 1]).all().all()
    groups, names = [], []
    for col in (rest.columns if composition else g.columns):
        if composition:
            members = [where[f] for f, on in zip(first, rest[col]) if on == 1 and f in where]
        else:
            genes = g[col].dropna().astype(str).str.strip()
            members = [where[gene + s] for gene in genes for s in GENE_SUFFIXES if gene + s in where]
        if not members:
            raise DataError(
                f"{path}: group {col!r} has none of its columns in {spec.csv} (modality {spec.name}); "
                f"check the gene names or the table's columns"
            )
        groups.append(sorted(set(members)))
        names.append(str(col))
    return groups, names


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
    values = enc.reindex(patients).to_numpy(float)
    groups, names = read_groups(spec, list(enc.columns))
    return Modality(spec.name, list(enc.columns), values, present, numeric, groups, names, spec.scaling)


def join_tabular(specs: list[TabularSpec], bags: pd.DataFrame) -> TabularTable:
    """Every modality of ``specs`` joined to the patients of a cohort's ``bags``."""
    patients = list(dict.fromkeys(bags["patient_id"]))
    mods = [join_modality(s, patients) for s in specs]
    return TabularTable(patients, dict(zip(bags["bag_id"], bags["patient_id"])), mods)


def attach_tabular(cohort, specs: list[TabularSpec]):
    """``cohort`` with its tabular modalities (``cohort.tabular``) and each bag's availability
    pattern in the subgroup column :data:`AVAILABILITY_COL`."""
    if AVAILABILITY_COL in cohort.slides.columns:
        raise DataError(f"{cohort.source}: the column {AVAILABILITY_COL!r} is set by data.tabular; rename it in the CSV")
    table = join_tabular(specs, cohort.bags)
    pattern = table.patterns()
    for frame in (cohort.slides, cohort.bags):
        frame[AVAILABILITY_COL] = frame["patient_id"].map(pattern).to_numpy()
    if AVAILABILITY_COL not in cohort.group_cols:
        cohort.group_cols.append(AVAILABILITY_COL)
    cohort.tabular = table
    return cohort
