"""Cohort: the CSV's slides, patients and targets, and the bags built from them."""

from __future__ import annotations

import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mil.data.targets import Targets, label_str, no_missing
from mil.errors import ConfigError, DataError, MilWarning
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
            the task's target columns (``targets.columns``: a ``label`` class index,
            ``time``/``event``, a numeric ``target``), plus the CSV's other columns.
        bags: one row per bag (``bag_id``, ``patient_id``, targets), in a
            stable order; ``bag_slides`` maps each bag to its slides.
        classes: class names in label-index order (a task with classes), else [].
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
    #: the task's reader of the targets (:class:`~mil.data.targets.Targets`): their columns,
    #: strata and split counts
    targets: Targets = field(default_factory=Targets)
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
        reader = task_targets(cfg)
        for col, key in reader.source_columns(d).items():
            need_col(col, key)
        values, classes = reader.read(df, out["slide_id"], d, source)
        targets = list(reader.columns)
        for col in targets:
            out[col] = values[col].to_numpy()
        for col in df.columns:
            if col not in (d.slide_col,) and col not in out.columns:
                out[col] = df[col].values
        group_cols = _group_columns(df, out, cfg, source, need_col, reader)
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
            targets=reader,
        )


def _column_check(df: pd.DataFrame, source: str):
    """``need_col(col, key)``: a :class:`DataError` naming ``data.<key>`` unless ``df`` has ``col``."""

    def need_col(col: str, key: str) -> None:
        if col not in df.columns:  # key: a data. key, or a task option's full key
            raise DataError(
                f"{source}: column {col!r} ({key if '.' in key else f'data.{key}'}) not in the "
                f"CSV; columns are: {', '.join(map(str, df.columns))}"
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


def _group_columns(
    df: pd.DataFrame, out: pd.DataFrame, cfg: Config, source: str, need_col, reader: Targets
) -> list[str]:
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
        if reader.is_reserved(col) or col == d.slide_col:
            raise DataError(
                f"{source}: data.{key} = {col!r} names a column that predictions.csv already "
                f"has; rename it in the CSV"
            )
        raw = df[col]
        missing = raw.isna() | (raw.astype(str).str.strip() == "")
        if key == "site_col" and cfg.splits.by_site:
            no_missing(raw, out["slide_id"], col, source)
        out[col] = raw.map(label_str).where(~missing, "missing").to_numpy()
        cols.append(col)
    return cols


def task_targets(cfg: Config) -> Targets:
    """The reader of ``cfg``'s targets, which :mod:`mil.config` set from the task."""
    reader = cfg.task.targets
    if not isinstance(reader, Targets):
        raise ConfigError(
            f"{cfg.source}: the config was not checked against the task registry; load it "
            "with mil.config.load_config or config_from_dict"
        )
    return reader
