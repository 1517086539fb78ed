"""Patient-level stratified k-fold splits, written and read as CLAM-style split CSVs.

``<dir>/splits_<k>.csv`` has columns ``train,val,test`` of slide ids (columns
of unequal length, padded with empty cells); ``splits_<k>_descriptor.csv``
counts classes (or events) per partition. With ``repeats > 1`` the files are
``splits_r<r>_<k>.csv``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from mil.data.cohort import Cohort
from mil.errors import SplitError
from mil.io import write_csv

PARTS = ("train", "val", "test")


@dataclass
class Split:
    """One fold: slide ids per partition."""

    fold: int
    train: list[str]
    val: list[str]
    test: list[str]
    repeat: int = 0

    @property
    def name(self) -> str:
        return f"{self.fold}" if self.repeat == 0 else f"r{self.repeat}_{self.fold}"

    def part(self, name: str) -> list[str]:
        return getattr(self, name)


def strata(cohort: Cohort, n_time_bins: int = 2) -> np.ndarray:
    """Per-slide stratification labels: the class, or event x time quantile for survival."""
    s = cohort.slides
    if cohort.task == "classification":
        return s["label"].to_numpy()
    q = pd.qcut(s["time"].rank(method="first"), n_time_bins, labels=False).to_numpy()
    return s["event"].to_numpy() * n_time_bins + q


def make_splits(
    cohort: Cohort, folds: int = 5, val_fraction: float = 0.15, seed: int = 0, repeats: int = 1
) -> list[Split]:
    """Disjoint patient-level test folds, each with an inner validation split from its training patients.

    ``StratifiedGroupKFold`` (group = patient) makes the test folds; the
    validation patients are the first fold of a second ``StratifiedGroupKFold``
    over the training patients with ``round(1 / val_fraction)`` folds.
    """
    s = cohort.slides
    y = strata(cohort)
    groups = s["patient_id"].to_numpy()
    ids = s["slide_id"].to_numpy()
    n_patients = len(np.unique(groups))
    if n_patients < folds:
        raise SplitError(
            f"{cohort.source}: {n_patients} patients cannot fill {folds} folds (splits.folds)"
        )
    out = []
    for r in range(repeats):
        outer = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed + 1000 * r)
        for k, (tr, te) in enumerate(outer.split(ids, y, groups)):
            val_idx = np.array([], dtype=int)
            if val_fraction > 0:
                n_inner = max(2, int(round(1.0 / val_fraction)))
                inner = StratifiedGroupKFold(
                    n_splits=n_inner, shuffle=True, random_state=seed + 1000 * r + k + 1
                )
                _, v = next(inner.split(ids[tr], y[tr], groups[tr]))
                val_idx = tr[v]
                tr = np.setdiff1d(tr, val_idx)
            out.append(
                Split(k, ids[tr].tolist(), ids[val_idx].tolist(), ids[te].tolist(), repeat=r)
            )
    return out


def split_file(directory: Path, split: Split) -> Path:
    return Path(directory) / f"splits_{split.name}.csv"


def write_splits(directory: str | Path, splits: list[Split], cohort: Cohort) -> None:
    directory = Path(directory)
    for sp in splits:
        cols = {p: pd.Series(sp.part(p), dtype=object) for p in PARTS}
        write_csv(split_file(directory, sp), pd.DataFrame(cols))
        write_csv(directory / f"splits_{sp.name}_descriptor.csv", describe(sp, cohort), index=True)


def describe(split: Split, cohort: Cohort) -> pd.DataFrame:
    """Slides per class (or censored/event) and partition, plus patient counts."""
    s = cohort.slides.set_index("slide_id")
    rows = {}
    for p in PARTS:
        part = s.loc[split.part(p)]
        if cohort.task == "classification":
            counts = part["label"].value_counts().reindex(range(len(cohort.classes)), fill_value=0)
            counts.index = cohort.classes
        else:
            counts = part["event"].value_counts().reindex([0, 1], fill_value=0)
            counts.index = ["censored", "event"]
        counts["patients"] = part["patient_id"].nunique()
        rows[p] = counts
    return pd.DataFrame(rows)


def read_splits(directory: str | Path, cohort: Cohort, folds: int, repeats: int = 1) -> list[Split]:
    """Read split CSVs, checking every id is known and no patient spans two partitions."""
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


def load_or_make_splits(
    directory: str | Path,
    cohort: Cohort,
    folds: int,
    val_fraction: float,
    seed: int,
    repeats: int = 1,
    force: bool = False,
) -> tuple[list[Split], bool]:
    """Read the split folder if it has split files, else make and write them.

    Returns (splits, made). An existing folder is never overwritten unless ``force``.
    """
    directory = Path(directory)
    exists = directory.is_dir() and any(directory.glob("splits_*.csv"))
    if exists and not force:
        return read_splits(directory, cohort, folds, repeats), False
    splits = make_splits(cohort, folds, val_fraction, seed, repeats)
    if exists:
        for old in directory.glob("splits_*.csv"):
            old.unlink()
    write_splits(directory, splits, cohort)
    return splits, True
