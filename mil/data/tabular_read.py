"""One ``data.tabular`` table: its config entry (:class:`TabularSpec`), its CSV read and
checked (one row per patient, :func:`read_table`) and its values encoded (:func:`encode`)."""

from __future__ import annotations

import fnmatch
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mil.data.cohort import normalize_id
from mil.errors import ConfigError, DataError, MilWarning

SPEC_KEYS = ("name", "csv", "id_col", "columns", "categorical", "groups", "scaling", "required")
SCALINGS = ("standard", "minmax")
MISSING_LEVEL = "missing"
FLOAT32_MAX = float(np.finfo(np.float32).max)
_INTEGRAL = re.compile(r"[+-]?\d+(\.0*)?")


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
            raise ConfigError(
                f"{source}: unknown key '{key}.{unknown[0]}'; valid keys: {', '.join(SPEC_KEYS)}"
            )
        for need in ("name", "csv"):
            if not isinstance(item.get(need), str) or not item[need]:
                raise ConfigError(f"{source}: {key}.{need} must be given (a string)")
        name = item["name"]
        if (
            name == "slides"
            or not name.replace("_", "").isalnum()
            or any(s.name == name for s in specs)
        ):
            raise ConfigError(
                f"{source}: {key}.name = {name!r}: a modality name is a unique word other than 'slides'"
            )
        for lst in ("columns", "categorical"):
            v = item.get(lst)
            if v is not None and (
                not isinstance(v, list) or not all(isinstance(c, str) for c in v)
            ):
                raise ConfigError(
                    f"{source}: {key}.{lst} must be a list of column names, found {v!r}"
                )
        if item.get("scaling", "standard") not in SCALINGS:
            raise ConfigError(
                f"{source}: {key}.scaling = {item['scaling']!r}; expected one of {list(SCALINGS)}"
            )
        if item.get("columns") == []:
            raise ConfigError(
                f"{source}: {key}.columns is empty; list the table's feature columns, or leave "
                f"columns out to read every column but {item.get('id_col', 'case_id')!r}"
            )
        if not isinstance(item.get("required", False), bool):
            raise ConfigError(f"{source}: {key}.required must be true or false")
        cols = item.get("columns")
        specs.append(
            TabularSpec(
                name=name,
                csv=str(item["csv"]),
                id_col=str(item.get("id_col", "case_id")),
                columns=None if cols is None else tuple(cols),
                categorical=tuple(item.get("categorical") or ()),
                groups=item.get("groups"),
                scaling=item.get("scaling", "standard"),
                required=bool(item.get("required", False)),
            )
        )
    return specs


def read_table(spec: TabularSpec) -> pd.DataFrame:
    """The table of ``spec`` indexed by patient id (one row each; repeated identical rows, as
    in MCAT's one-row-per-slide CSVs, are one); errors name the file and column."""
    path = Path(spec.csv)
    if not path.is_file():
        raise DataError(f"data.tabular {spec.name}: table not found: {path}")
    try:
        # categories as text, so a code column is not read as floats when a cell is blank (T1)
        df = pd.read_csv(path, dtype={spec.id_col: str, **{c: str for c in spec.categorical}})
    except Exception as exc:
        raise DataError(f"{path}: cannot read the table of modality {spec.name} ({exc})") from None
    if spec.id_col not in df.columns:
        raise DataError(
            f"{path}: no column {spec.id_col!r} (data.tabular {spec.name}.id_col); columns: {', '.join(map(str, df.columns[:10]))}"
        )
    df[spec.id_col] = df[spec.id_col].map(normalize_id)
    cols = _select_columns(df, spec, path)
    df = df[[spec.id_col, *cols]].drop_duplicates()
    dup = df[spec.id_col][df[spec.id_col].duplicated()]
    if len(dup):
        raise DataError(
            f"{path}: patient {dup.iloc[0]} has rows with different values (column {spec.id_col!r} must identify a patient)"
        )
    return df.set_index(spec.id_col)


def _select_columns(df: pd.DataFrame, spec: TabularSpec, path: Path) -> list[str]:
    others = [str(c) for c in df.columns if c != spec.id_col]
    cols: list[str] = others if spec.columns is None else []
    for pat in spec.columns or ():
        hit = (
            fnmatch.filter(others, pat)
            if any(ch in pat for ch in "*?[")
            else [pat]
            if pat in others
            else []
        )
        if not hit:
            raise DataError(f"{path}: no column {pat!r} (data.tabular {spec.name}.columns)")
        cols += [c for c in hit if c not in cols]
    if not cols:
        raise DataError(
            f"{path}: the table of modality {spec.name} has no feature columns besides its id column "
            f"{spec.id_col!r} (data.tabular {spec.name}); add the columns, or remove the table from data.tabular"
        )
    for c in spec.categorical:
        if c not in cols:
            raise DataError(
                f"{path}: data.tabular {spec.name}.categorical names {c!r}, which is not among its columns"
            )
    return cols


def level_name(value: Any) -> str:
    """A categorical cell as the name of its level: the text, stripped; an integral number
    by its integer (``4``, ``4.0`` and ``+4.00`` are the level ``4``), so a code column reads
    the same whether or not a blank cell made pandas write it as floats."""
    text = str(value).strip()
    return str(int(text.split(".")[0])) if _INTEGRAL.fullmatch(text) else text


def encode(df: pd.DataFrame, spec: TabularSpec) -> tuple[pd.DataFrame, np.ndarray]:
    """Numeric columns as floats and categorical ones one-hot (``col=level``, levels named by
    :func:`level_name`, with a ``missing`` level); returns the frame and which columns are
    numeric. A non-numeric or infinite value in a column not declared categorical is a
    :class:`DataError` naming file, column and patient; a column without any value warns."""
    parts, numeric = [], []
    for col in df.columns:
        raw = df[col]
        if len(raw) and raw.isna().all():
            warnings.warn(
                f"{spec.csv}: column {col!r} (modality {spec.name}) has no value in any row, so it "
                f"is missing for every patient; leave it out of data.tabular {spec.name}.columns",
                MilWarning,
                stacklevel=3,
            )
        if col in spec.categorical:
            text = raw.map(
                lambda v: MISSING_LEVEL if pd.isna(v) else level_name(v) or MISSING_LEVEL
            )
            levels = sorted(set(text) - {MISSING_LEVEL})  # a cell 'missing' or blank is that level
            for level in [*levels, MISSING_LEVEL]:
                parts.append((text == level).astype(float).rename(f"{col}={level}"))
                numeric.append(False)
            continue
        parts.append(_numeric(raw, col, spec).rename(col))
        numeric.append(True)
    return pd.concat(parts, axis=1), np.array(numeric, dtype=bool)


def _numeric(raw: pd.Series, col: str, spec: TabularSpec) -> pd.Series:
    num = pd.to_numeric(raw, errors="coerce").astype(float)
    for bad, what, fix in (
        (
            num.isna() & raw.notna(),
            "is not numeric",
            f"list it under data.tabular {spec.name}.categorical, or leave it out of columns",
        ),
        # beyond float32's range a value is infinite once the model reads it
        (
            num.abs() > FLOAT32_MAX,
            "holds a value that is not finite",
            "replace it by a number, or leave the cell blank (a missing value)",
        ),
    ):
        if bad.any():
            pid = raw.index[bad.to_numpy()][0]
            value = raw.loc[pid].item() if isinstance(raw.loc[pid], np.generic) else raw.loc[pid]
            n = f" ({int(bad.sum())} patients in all)" if bad.sum() > 1 else ""
            raise DataError(
                f"{spec.csv}: column {col!r} (modality {spec.name}) {what}: {value!r} for "
                f"patient {pid}{n}; {fix}"
            )
    return num
