"""Cohort: the CSV's slides, patients and targets, and the bags built from them."""

from __future__ import annotations

import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mil.errors import DataError, MilWarning
from mil.schema import DEFAULT_PATIENT_COL, Config

#: the subgroup column of each bag's available modalities (``slides+rna``), set by data.tabular
AVAILABILITY_COL = "modalities"


class PatientColumnWarning(MilWarning):
    """The cohort has no patient column: slides of one patient could cross folds."""


def normalize_id(value) -> str:
    """A slide or patient id as text: surrounding spaces removed, Unicode in NFC form.

    File names on macOS are decomposed (NFD) while most CSVs are composed
    (NFC); both sides are compared in NFC, so ``Ślajd`` matches ``Ślajd``.
    """
    return unicodedata.normalize("NFC", str(value).strip())


def read_cohort_csv(path: str | Path, slide_col: str) -> pd.DataFrame:
    """Read a cohort CSV with ids as text; a missing, empty, binary or non-UTF-8 file
    is a :class:`DataError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.csv: cohort CSV not found: {path}")
    try:
        return pd.read_csv(path, dtype={slide_col: str})
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the cohort CSV is empty (no header, no rows)") from None
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: the cohort CSV is not UTF-8 text ({exc.reason} at byte {exc.start}); "
            f"save it as UTF-8 CSV"
        ) from None
    except Exception as exc:
        raise DataError(f"{path}: cannot read the cohort CSV ({exc})") from None


@dataclass
class Cohort:
    """Slides of a study and the bags the model sees.

    Attributes:
        slides: one row per slide: ``slide_id``, ``patient_id``, ``bag_id`` and
            the targets (``label`` class index, or ``time``/``event``), plus
            the CSV's other columns.
        bags: one row per bag (``bag_id``, ``patient_id``, targets), in a
            stable order; ``bag_slides`` maps each bag to its slides.
        classes: class names in label-index order (classification), else [].
        group_cols: subgroup columns (``data.site_col`` first, then
            ``data.subgroup_cols``), present in ``slides`` and ``bags`` as
            strings; a missing value is its own group, ``"missing"``.
    """

    slides: pd.DataFrame
    bags: pd.DataFrame
    bag_slides: dict[str, list[str]]
    classes: list[str]
    task: str
    source: str
    group_cols: list[str] = field(default_factory=list)
    #: what the targets are: "label" (a class index) or "survival" (time and event)
    target_kind: str = "label"
    #: the tabular modalities joined by patient (mil.data.tabular.TabularTable), or None
    tabular: Any = None

    @property
    def bag_ids(self) -> list[str]:
        return self.bags["bag_id"].tolist()

    def bag_index(self) -> dict[str, int]:
        return {b: i for i, b in enumerate(self.bags["bag_id"])}

    def bags_of_slides(self, slide_ids: list[str]) -> list[str]:
        """Bag ids containing ``slide_ids`` (order of first appearance)."""
        owner = dict(zip(self.slides["slide_id"], self.slides["bag_id"]))
        return list(dict.fromkeys(owner[s] for s in slide_ids))

    @classmethod
    def from_config(cls, cfg: Config) -> Cohort:
        """The cohort of a config's CSV (``data.csv``); for every source, instance tables
        included, see :mod:`mil.data.sources`.

        With ``data.synthetic`` and no CSV yet, the built-in synthetic cohort
        is written at ``data.csv`` / ``data.features`` first.
        """
        d = cfg.data
        if d.synthetic == "multimodal" and not Path(d.csv).is_file():
            from mil.data.synthetic_multimodal import write_multimodal_cohort

            write_multimodal_cohort(Path(d.csv).parent, csv=Path(d.csv), features=Path(d.features))
        elif d.synthetic and not Path(d.csv).is_file():
            from mil.data.synthetic import write_synthetic_cohort

            write_synthetic_cohort(d.synthetic, Path(d.csv), Path(d.features))
        path = Path(d.csv)
        return cls.from_frame(read_cohort_csv(path, d.slide_col), cfg, source=str(path))

    @classmethod
    def from_frame(
        cls, df: pd.DataFrame, cfg: Config, source: str = "<frame>", bag_is_patient: bool = False
    ) -> Cohort:
        """Validate a cohort table and build the slides, bags and targets.

        ``bag_is_patient``: the rows are bags that stand for patients unless a
        patient column says otherwise (instance tables), so a missing patient
        column is no cause for a warning.
        """
        d = cfg.data
        if len(df) == 0:
            raise DataError(f"{source}: the cohort table has a header but no rows")
        need_col = _column_check(df, source)
        need_col(d.slide_col, "slide_col")
        out = pd.DataFrame({"slide_id": df[d.slide_col].map(normalize_id)})
        dup = out["slide_id"][out["slide_id"].duplicated()].unique().tolist()
        if dup:
            raise DataError(f"{source}: slide ids appear more than once: {', '.join(dup[:10])}")
        out["patient_id"] = _patient_ids(df, out["slide_id"], cfg, source, need_col, bag_is_patient)
        classes: list[str] = []
        if cfg.task.target_kind == "label":
            classes = _label_targets(df, out, cfg, source, need_col)
            targets = ["label"]
        else:
            _survival_targets(df, out, cfg, source, need_col)
            targets = ["time", "event"]
        for col in df.columns:
            if col not in (d.slide_col,) and col not in out.columns:
                out[col] = df[col].values
        group_cols = _group_columns(df, out, cfg, source, need_col)
        if d.bag_level == "patient":
            out["bag_id"] = out["patient_id"]
            for col in [*targets, *group_cols]:
                n = out.groupby("patient_id")[col].nunique()
                if (n > 1).any():
                    p = n.index[n > 1][0]
                    raise DataError(
                        f"{source}: patient {p} has slides with different {col!r} values; "
                        f"patient-level bags need one value per patient"
                    )
        else:
            out["bag_id"] = out["slide_id"]
        bags = (
            out.groupby("bag_id", sort=False)
            .first()
            .reset_index()[["bag_id", "patient_id", *targets, *group_cols]]
        )
        bag_slides = out.groupby("bag_id", sort=False)["slide_id"].apply(list).to_dict()
        return cls(
            slides=out,
            bags=bags,
            bag_slides=bag_slides,
            classes=classes,
            task=cfg.task.type,
            source=source,
            group_cols=group_cols,
            target_kind=cfg.task.target_kind,
        )


def _column_check(df: pd.DataFrame, source: str):
    """``need_col(col, key)``: a :class:`DataError` naming ``data.<key>`` unless ``df`` has ``col``."""

    def need_col(col: str, key: str) -> None:
        if col not in df.columns:
            raise DataError(
                f"{source}: column {col!r} (data.{key}) not in the CSV; columns are: {', '.join(map(str, df.columns))}"
            )

    return need_col


def _patient_ids(
    df: pd.DataFrame, slide_ids: pd.Series, cfg: Config, source: str, need_col, bag_is_patient: bool
) -> pd.Series:
    """Each slide's patient: ``data.patient_col`` (which must exist when named), else the
    CSV's ``case_id``, else the slide itself (with a :class:`PatientColumnWarning`)."""
    d = cfg.data
    patient_col = d.patient_col if d.patient_col is not None else DEFAULT_PATIENT_COL
    if patient_col in df.columns:
        pid = df[patient_col]
        missing = pid.isna() | (pid.astype(str).str.strip() == "")
        return pid.map(normalize_id).where(~missing, slide_ids)
    if d.patient_col is not None:
        need_col(d.patient_col, "patient_col")
    if not bag_is_patient:
        warnings.warn(
            f"{source}: no patient column (data.patient_col is not set and the CSV has no "
            f"{DEFAULT_PATIENT_COL!r} column), so every slide counts as its own patient; "
            f"slides of one patient could then land in both training and test. Set "
            f"data.patient_col to the CSV's patient column, or to {d.slide_col!r} if each "
            f"slide is a different patient",
            PatientColumnWarning,
            stacklevel=3,
        )
    return slide_ids.copy()


def _label_targets(df: pd.DataFrame, out: pd.DataFrame, cfg: Config, source: str, need_col) -> list[str]:
    """``out["label"]`` (class index) from ``data.label_col``; returns the classes in index order."""
    d = cfg.data
    need_col(d.label_col, "label_col")
    raw = df[d.label_col]
    _no_missing(raw, out["slide_id"], d.label_col, source)
    labels = class_names(raw, d.class_aliases)
    if d.classes is not None:
        classes = [str(c) for c in d.classes]
        unknown = sorted(set(labels) - set(classes))
        if unknown:
            bad = out["slide_id"][labels.isin(unknown)].iloc[0]
            raise DataError(
                f"{source}: label {unknown[0]!r} (slide {bad}) is not in data.classes {classes}"
            )
    else:
        classes = _stable_classes(labels if d.class_aliases else raw)
    if len(classes) < 2:
        raise DataError(
            f"{source}: column {d.label_col!r} has a single class {classes}; need at least 2"
        )
    out["label"] = labels.map({c: i for i, c in enumerate(classes)}).astype(int)
    return classes


def _survival_targets(df: pd.DataFrame, out: pd.DataFrame, cfg: Config, source: str, need_col) -> None:
    """``out["time"]`` (finite, >= 0) and ``out["event"]`` (1 = observed, after
    ``data.censored_value``) from ``data.time_col`` and ``data.event_col``."""
    d = cfg.data
    need_col(d.time_col, "time_col")
    need_col(d.event_col, "event_col")
    for col in (d.time_col, d.event_col):
        _no_missing(df[col], out["slide_id"], col, source)
    time = pd.to_numeric(df[d.time_col], errors="coerce")
    invalid = time.isna() | (time < 0) | ~np.isfinite(time.fillna(0.0).to_numpy(float))
    if invalid.any():
        i = int(np.flatnonzero(invalid.to_numpy())[0])
        raise DataError(
            f"{source}: column {d.time_col!r} must hold finite non-negative numbers "
            f"(slide {out['slide_id'].iloc[i]}: {_shown(df[d.time_col].iloc[i])})"
        )
    ev = pd.to_numeric(df[d.event_col], errors="coerce")
    if d.censored_value is not None:
        # two codes, one of them the censored value; otherwise the mapping would
        # silently read every other code (a typo, a third status) as an event
        codes = [_shown(c) for c in sorted(ev.dropna().unique().tolist())]
        if d.censored_value not in ev.dropna().unique() or len(codes) > 2:
            raise DataError(
                f"{source}: column {d.event_col!r} holds the values {', '.join(codes[:10])}, but "
                f"data.censored_value = {d.censored_value} needs two codes, one of them "
                f"{d.censored_value} (censored); check data.event_col and data.censored_value"
            )
        ev = (ev != d.censored_value).astype(float).where(ev.notna())
    if ev.isna().any() or not ev.isin([0, 1]).all():
        i = int(np.flatnonzero((~ev.isin([0, 1])).to_numpy())[0])
        raise DataError(
            f"{source}: column {d.event_col!r} must be 0/1 after mapping "
            f"(data.censored_value={d.censored_value}); slide {out['slide_id'].iloc[i]} has "
            f"{_shown(df[d.event_col].iloc[i])}"
        )
    out["time"] = time.astype(float)
    out["event"] = ev.astype(int)
    if out["event"].sum() == 0:
        raise DataError(
            f"{source}: column {d.event_col!r}: every patient is censored; survival needs events"
        )


# columns of predictions.csv that a subgroup column would collide with
PREDICTION_COLUMNS = ("bag_id", "patient_id", "label", "label_index", "pred", "fold", "time", "event", "risk")


def _group_columns(df: pd.DataFrame, out: pd.DataFrame, cfg: Config, source: str, need_col) -> list[str]:
    """Validate ``data.site_col`` / ``data.subgroup_cols``; write them into ``out`` as strings."""
    d = cfg.data
    keys = ([("site_col", d.site_col)] if d.site_col else []) + [
        (f"subgroup_cols[{i}]", c) for i, c in enumerate(d.subgroup_cols)
    ]
    cols: list[str] = []
    for key, col in keys:
        if d.tabular and col == AVAILABILITY_COL:
            continue  # not a CSV column: mil.data.tabular sets it from the tables
        need_col(col, key)
        if col in cols:
            continue
        if col in PREDICTION_COLUMNS or col.startswith(("prob_", "surv_")) or col == d.slide_col:
            raise DataError(
                f"{source}: data.{key} = {col!r} names a column that predictions.csv already "
                f"has; rename it in the CSV"
            )
        raw = df[col]
        missing = raw.isna() | (raw.astype(str).str.strip() == "")
        if key == "site_col" and cfg.splits.by_site:
            _no_missing(raw, out["slide_id"], col, source)
        out[col] = raw.map(_label_str).where(~missing, "missing").to_numpy()
        cols.append(col)
    return cols


def _shown(v) -> str:
    """A CSV value for a message: ``-3.0``, ``inf``, ``'yes'`` (never ``np.float64(-3.0)``)."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return repr(v) if isinstance(v, str) else str(v)


def _label_str(v) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).strip()


def class_names(labels: pd.Series, aliases: dict[str, list[str]] | None = None) -> pd.Series:
    """Each label as the cohort names its class (``1.0`` -> ``"1"``, spaces stripped), an
    alias of ``data.class_aliases`` (``{class: [aliases]}``) read as its class."""
    names = labels.map(_label_str)
    if aliases:
        to_class = {_label_str(a): _label_str(c) for c, some in aliases.items() for a in some}
        names = names.map(lambda n: to_class.get(n, n))
    return names


def _stable_classes(raw: pd.Series) -> list[str]:
    """Classes sorted numerically when all labels are numbers, else as strings."""
    values = raw.dropna().unique()
    try:
        nums = sorted({float(v) for v in values})
        return [_label_str(v) for v in nums]
    except (TypeError, ValueError):
        return sorted({_label_str(v) for v in values})


def _no_missing(col: pd.Series, slide_ids: pd.Series, name: str, source: str) -> None:
    missing = col.isna() | (col.astype(str).str.strip() == "")
    if missing.any():
        ids = slide_ids[missing].tolist()
        raise DataError(
            f"{source}: {len(ids)} rows have no value in column {name!r} (slides {', '.join(ids[:5])}"
            f"{', …' if len(ids) > 5 else ''}); fill them in or remove those rows"
        )
