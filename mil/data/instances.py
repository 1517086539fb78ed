"""Instance tables (one row per instance: bag id, bag label, features) -> a Cohort and in-memory bags.

For MIL data that is not slide feature files: the classic MIL benchmarks
(MUSK, Corel), tabular bags, quick experiments. Config::

    data:
      instances: bags.csv.gz      # .csv (any compression pandas reads) or .parquet
      bag_col: bag_id             # one bag per value, kept as written (a string)
      label_col: bag_label        # the task's target columns (survival: time_col / event_col)

Which column is what:

* ``bag_col``: the bag of each row. Rows of a bag need not be adjacent; a
  bag's instances keep the order of the table.
* bag-level columns: the task's target columns (``label_col`` for classification
  and regression, ``time_col`` and ``event_col`` for survival), and ``patient_col``
  when the table has it (the patient defaults to the bag). Each must hold one
  value per bag.
* reserved, never features: ``instance_id``; ``x`` and ``y`` (instance
  coordinates, both or neither); ``instance_label`` (0/1 instance ground
  truth, used for the witness AUC).
* every other column is a feature and must be numeric; a non-numeric column
  is an error rather than silently dropped (a typo such as ``"n/a"`` turns a
  feature column into text).

Each bag becomes one "slide" of the cohort, held in a :class:`FeatureStore`
that never evicts (there is no file to re-read it from).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mil.data.cohort import Cohort, task_targets
from mil.data.dataset import FeatureStore
from mil.data.readers import SlideFeatures
from mil.errors import DataError
from mil.schema import DEFAULT_PATIENT_COL, Config

INSTANCE_ID_COL = "instance_id"
INSTANCE_LABEL_COL = "instance_label"
COORD_COLS = ("x", "y")


def read_table(path: str | Path, id_col: str) -> pd.DataFrame:
    """Read a CSV (possibly compressed) or Parquet table, keeping ``id_col`` as text."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.instances: instance table not found: {path}")
    suffixes = [s.lower() for s in path.suffixes]
    try:
        if ".parquet" in suffixes or ".pq" in suffixes:
            df = pd.read_parquet(path)
            if id_col in df.columns:
                df[id_col] = df[id_col].astype(str)
        elif ".csv" in suffixes or ".tsv" in suffixes:
            df = pd.read_csv(path, sep="\t" if ".tsv" in suffixes else ",", dtype={id_col: str})
        else:
            raise DataError(
                f"{path}: unsupported instance table type {''.join(path.suffixes)!r} "
                f"(use .csv, .csv.gz, .tsv or .parquet)"
            )
    except ImportError as exc:
        raise DataError(f"{path}: reading Parquet needs pyarrow or fastparquet ({exc})") from None
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: cannot read the instance table ({exc})") from None
    return df


def bag_level_columns(cfg: Config, columns) -> dict[str, str]:
    """The columns that hold one value per bag (targets, optional patient) -> their config key."""
    d = cfg.data
    cols = dict(task_targets(cfg).source_columns(d))
    patient_col = d.patient_col if d.patient_col is not None else DEFAULT_PATIENT_COL
    if patient_col in columns and patient_col not in cols:
        cols[patient_col] = "patient_col"
    return cols


def feature_columns(df: pd.DataFrame, exclude: list[str], source: str) -> list[str]:
    """Every column except ``exclude`` and the reserved ones; all must be numeric."""
    reserved = {*exclude, INSTANCE_ID_COL, INSTANCE_LABEL_COL, *COORD_COLS}
    cols = [c for c in df.columns if c not in reserved]
    bad = [
        c
        for c in cols
        if not (pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c]))
    ]
    if bad:
        example = df[bad[0]].iloc[0]
        raise DataError(
            f"{source}: column(s) {bad[:5]} are not numeric (e.g. {example!r}); every column other "
            f"than the bag, the targets, patient, {INSTANCE_ID_COL}, {INSTANCE_LABEL_COL} and "
            f"x/y columns is read as a feature. Fix the values or drop those columns"
        )
    if not cols:
        raise DataError(
            f"{source}: no feature columns (columns are: {', '.join(map(str, df.columns))})"
        )
    return cols


def read_instance_table(
    cfg: Config, path: str | Path | None = None
) -> tuple[pd.DataFrame, dict[str, SlideFeatures], list[str]]:
    """Read ``cfg.data.instances`` into bags.

    Returns ``(bags, features, feature_cols)``: ``bags`` has one row per bag
    (in order of first appearance) with the bag column and the bag-level
    columns; ``features[bag_id]`` holds the bag's ``[N, D]`` float32 rows in
    table order (with coordinates and instance labels where the table has
    them); ``feature_cols`` names the D feature columns in order.
    """
    d = cfg.data
    path = Path(path if path is not None else d.instances)
    source = str(path)
    df = read_table(path, d.bag_col)
    level_keys = bag_level_columns(cfg, df.columns)
    level = list(level_keys)
    for col, key in [(d.bag_col, "bag_col"), *level_keys.items()]:
        if col not in df.columns:
            raise DataError(
                f"{source}: column {col!r} ({key if '.' in key else f'data.{key}'}) not in the instance table; "
                f"columns are: {', '.join(map(str, df.columns[:20]))}{', …' if len(df.columns) > 20 else ''}"
            )
    if len(df) == 0:
        raise DataError(f"{source}: the instance table has no rows")
    bag = df[d.bag_col].astype(str).str.strip()
    empty = df[d.bag_col].isna() | (bag == "")
    if empty.any():
        raise DataError(
            f"{source}: {int(empty.sum())} rows have no bag id in column {d.bag_col!r} "
            f"(first at row {int(np.flatnonzero(empty)[0])})"
        )
    has_coords = [c in df.columns for c in COORD_COLS]
    if any(has_coords) and not all(has_coords):
        raise DataError(f"{source}: coordinates need both columns 'x' and 'y'")
    feat_cols = feature_columns(df, [d.bag_col, *level], source)

    values = df[feat_cols].to_numpy(dtype=np.float32)
    bad = ~np.isfinite(values)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise DataError(
            f"{source}: {int(bad.sum())} feature values are missing or not finite "
            f"(first: bag {bag.iloc[row]}, column {feat_cols[col]!r}); fill or drop them"
        )
    coords = df[list(COORD_COLS)].to_numpy(dtype=np.float32) if all(has_coords) else None
    inst_label = None
    if INSTANCE_LABEL_COL in df.columns:
        inst_label = pd.to_numeric(df[INSTANCE_LABEL_COL], errors="coerce")
        if not inst_label.isin([0, 1]).all():
            raise DataError(f"{source}: column {INSTANCE_LABEL_COL!r} must hold 0/1 only")
        inst_label = inst_label.to_numpy(np.int8)

    groups = df[level].groupby(bag.to_numpy(), sort=False)
    for col in level:
        n = groups[col].nunique(dropna=False)
        if (n > 1).any():
            b = n.index[n > 1][0]
            seen = sorted(map(str, df.loc[bag == b, col].unique()))
            raise DataError(
                f"{source}: bag {b} has several values in column {col!r} ({', '.join(seen)}); "
                f"a bag-level column must be constant within a bag"
            )
    bags = groups.first().rename_axis(d.bag_col).reset_index()
    rows_of = groups.indices
    features = {}
    for b in bags[d.bag_col]:
        rows = rows_of[b]
        features[b] = SlideFeatures(
            features=values[rows],
            coords=None if coords is None else coords[rows],
            instance_label=None if inst_label is None else inst_label[rows],
            attrs={"source": source},
            layout="instance_table",
        )
    return bags, features, feat_cols


def load_instances(cfg: Config) -> tuple[Cohort, FeatureStore]:
    """The cohort (one slide per bag) and an in-memory store of its bags, from ``data.instances``."""
    d = cfg.data
    bags, features, feat_cols = read_instance_table(cfg)
    frame = bags.drop(columns=d.bag_col)
    frame.insert(0, d.slide_col, bags[d.bag_col])
    cohort = Cohort.from_frame(frame, cfg, source=str(d.instances), bag_is_patient=True)
    nbytes = sum(sf.features.size for sf in features.values()) * (
        2 if d.cache_dtype == "float16" else 4
    )
    # nothing to re-read from, so the whole table stays in memory whatever data.cache_gb says
    store = FeatureStore(
        {}, budget_gb=nbytes / 2**30 + 0.01, cache_dtype=d.cache_dtype, expected_dim=len(feat_cols)
    )
    for b, sf in features.items():
        store._insert(b, sf)
    return cohort, store
