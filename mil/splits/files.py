"""Split files: ``<dir>/splits_<k>.csv`` (columns ``train,val,test`` of slide ids, CLAM's
layout) and their descriptors; read, checked, made when absent, never silently overwritten."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mil.data.cohort import Cohort
from mil.errors import SplitError
from mil.io import write_csv
from mil.splits.assignment import read_assignment
from mil.splits.folds import (
    PARTS,
    Split,
    inner_validation,
    make_splits,
    site_column,
    strata_options,
)


def check_site_preserved(
    directory: str | Path, splits: list[Split], cohort: Cohort, site_col: str
) -> None:
    """Raise unless each site is tested in one fold per repeat and never trained on there.

    ``splits`` were read from ``directory``; the messages name its files.
    """
    site_of = dict(zip(cohort.slides["slide_id"], site_column(cohort, site_col)))
    remake = (
        "remake the folder with splits.by_site (`mil splits --force`) or use another splits.dir"
    )
    tested_in: dict[tuple[int, str], Split] = {}
    for sp in splits:
        for site in sorted({site_of[i] for i in sp.test}):
            first = tested_in.setdefault((sp.repeat, site), sp)
            if first.fold != sp.fold:
                raise SplitError(
                    f"site {site!r} (data.site_col = {site_col!r}) is in the test partition of both "
                    f"{split_file(directory, first)} and {split_file(directory, sp)}; "
                    f"site-preserved folds (splits.by_site) test each site in one fold; {remake}"
                )
    for sp in splits:
        test_sites = {site_of[i] for i in sp.test}
        for p in ("train", "val"):
            leaked = sorted(test_sites & {site_of[i] for i in sp.part(p)})
            if leaked:
                raise SplitError(
                    f"{split_file(directory, sp)}: site {leaked[0]!r} (data.site_col = "
                    f"{site_col!r}) is in both '{p}' and 'test'; site-preserved folds "
                    f"(splits.by_site) never train on a test site; {remake}"
                )


def split_file(directory: Path, split: Split) -> Path:
    return Path(directory) / f"splits_{split.name}.csv"


def write_splits(
    directory: str | Path, splits: list[Split], cohort: Cohort, unless_same: bool = False
) -> None:
    """Write each split's CSV and descriptor; ``unless_same`` leaves files that already
    hold the same content (a resumed run rewrites nothing)."""
    directory = Path(directory)
    for sp in splits:
        cols = {p: pd.Series(sp.part(p), dtype=object) for p in PARTS}
        write_csv(split_file(directory, sp), pd.DataFrame(cols), unless_same=unless_same)
        write_csv(
            directory / f"splits_{sp.name}_descriptor.csv",
            describe(sp, cohort),
            index=True,
            unless_same=unless_same,
        )


def describe(split: Split, cohort: Cohort) -> pd.DataFrame:
    """Slides per outcome (class, censored/event, target quantile: the task's) and partition,
    plus patient counts."""
    s = cohort.slides.set_index("slide_id")
    rows = {}
    for p in PARTS:
        part = s.loc[split.part(p)]
        counts = cohort.targets.counts(part, cohort.classes).copy()
        counts["patients"] = part["patient_id"].nunique()
        rows[p] = counts
    return pd.DataFrame(rows)


def read_splits(
    directory: str | Path,
    cohort: Cohort,
    folds: int,
    repeats: int = 1,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> list[Split]:
    """Read split CSVs, checking every id is known and no patient spans two partitions.

    A file with ``train,val`` columns and no ``test`` (MCAT, Patch-GCN, PORPOISE, SurvPath:
    case or slide ids) is read as :func:`read_test_as_val` does."""
    directory = Path(directory)
    known = set(cohort.slides["slide_id"])
    patient = dict(zip(cohort.slides["slide_id"], cohort.slides["patient_id"]))
    out = []
    for r in range(repeats):
        for k in range(folds):
            sp = Split(k, [], [], [], repeat=r)
            path = split_file(directory, sp)
            if not path.is_file():
                raise SplitError(
                    f"split file missing: {path} (splits.folds = {folds}); "
                    f"remove the folder or run `mil splits --force` to remake it"
                )
            try:
                df = pd.read_csv(path, dtype=str)
            except Exception as exc:
                raise SplitError(f"{path}: cannot read split file ({exc})") from None
            if "Unnamed: 0" in df.columns:  # CLAM writes the pandas index
                df = df.drop(columns="Unnamed: 0")
            if "test" not in df.columns and {"train", "val"} <= set(df.columns):
                out.append(read_test_as_val(path, df, cohort, sp, val_fraction, seed))
                continue
            missing = [p for p in PARTS if p not in df.columns]
            if missing:
                raise SplitError(f"{path}: missing column(s) {missing}; expected train,val,test")
            seen: dict[str, str] = {}
            for p in PARTS:
                ids = [str(v).strip() for v in df[p].dropna() if str(v).strip()]
                for sid in ids:
                    if sid not in known:
                        raise SplitError(f"{path}: slide {sid!r} in '{p}' is not in the cohort CSV")
                    pid = patient[sid]
                    if pid in seen and seen[pid] != p:
                        raise SplitError(
                            f"{path}: patient {pid!r} is in both '{seen[pid]}' and '{p}' "
                            f"(slide {sid}); a patient's slides must share one partition"
                        )
                    seen[pid] = p
                setattr(sp, p, ids)
            out.append(sp)
    return out


def read_test_as_val(
    path: Path, df: pd.DataFrame, cohort: Cohort, sp: Split, val_fraction: float, seed: int
) -> Split:
    """A ``train,val`` split file of the MCAT family: its ``val`` column (case or slide ids)
    is the test fold, as those papers report it; the inner validation for early stopping is
    carved from ``train`` (``splits.val_fraction``, patient-level, stratified), so the test
    fold never chooses an epoch."""
    slides = cohort.slides
    by_patient = slides.groupby("patient_id", sort=False)["slide_id"].apply(list).to_dict()
    known = set(slides["slide_id"])
    parts: dict[str, list[str]] = {}
    for col in ("train", "val"):
        ids: list[str] = []
        for v in df[col].dropna():
            v = str(v).strip()
            if v in known:
                ids.append(v)
            elif v in by_patient:
                ids += by_patient[v]
            elif v:
                raise SplitError(
                    f"{path}: {v!r} in '{col}' is neither a case nor a slide of the cohort CSV"
                )
        parts[col] = list(dict.fromkeys(ids))
    patient = dict(zip(slides["slide_id"], slides["patient_id"]))
    both = {patient[s] for s in parts["train"]} & {patient[s] for s in parts["val"]}
    if both:
        raise SplitError(f"{path}: patient {sorted(both)[0]!r} is in both 'train' and 'val'")
    pos = {s: i for i, s in enumerate(slides["slide_id"])}
    train = np.array([pos[s] for s in parts["train"]], dtype=int)
    where = f"the training fold of {path}"
    groups = slides["patient_id"].to_numpy()
    tr, val = inner_validation(train, strata_options(cohort), groups, val_fraction, seed, where)
    ids = slides["slide_id"].to_numpy()
    return Split(
        sp.fold, ids[np.sort(tr)].tolist(), ids[np.sort(val)].tolist(), parts["val"], sp.repeat
    )


def load_or_make_splits(
    directory: str | Path,
    cohort: Cohort,
    folds: int,
    val_fraction: float,
    seed: int,
    repeats: int = 1,
    force: bool = False,
    assignment: str | Path | None = None,
    site_col: str | None = None,
) -> tuple[list[Split], bool]:
    """Read the split folder if it has split files, else make and write them.

    With ``assignment`` (a fold-assignment CSV, see :func:`read_assignment`)
    the test folds come from that file; an existing split folder must agree
    with it. With ``site_col`` new folds are site-preserved (see
    :func:`make_splits`) and an existing folder must be site-preserved too.
    Returns (splits, made). An existing folder is never overwritten unless
    ``force``.
    """
    directory = Path(directory)
    if assignment is not None and site_col is not None:
        raise SplitError("splits.by_site cannot be combined with splits.assignment")
    exists = directory.is_dir() and any(directory.glob("splits_*.csv"))
    if assignment is not None:
        splits = read_assignment(assignment, cohort, folds, repeats, val_fraction, seed)
        if exists and not force:
            old = read_splits(directory, cohort, folds, repeats, val_fraction, seed)
            for a, b in zip(old, splits):
                if set(a.test) != set(b.test):
                    raise SplitError(
                        f"{split_file(directory, a)}: test fold {a.name} differs from {assignment}; "
                        f"use another split folder or remake it (`mil splits --force`)"
                    )
            return old, False
    if exists and not force:
        old = read_splits(directory, cohort, folds, repeats, val_fraction, seed)
        if site_col is not None:
            check_site_preserved(directory, old, cohort, site_col)
        return old, False
    if assignment is None:
        splits = make_splits(cohort, folds, val_fraction, seed, repeats, site_col)
    if exists:
        for old in directory.glob("splits_*.csv"):
            old.unlink()
    write_splits(directory, splits, cohort)
    return splits, True
