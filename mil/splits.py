"""Stratified k-fold splits (patient-level or site-preserved), written and read as CLAM-style CSVs.

``<dir>/splits_<k>.csv`` has columns ``train,val,test`` of slide ids (columns
of unequal length, padded with empty cells); ``splits_<k>_descriptor.csv``
counts classes (or events) per partition. With ``repeats > 1`` the files are
``splits_r<r>_<k>.csv``.
"""

from __future__ import annotations

import warnings
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
    # time quantiles within events and within censored patients, so no stratum is tiny
    event = s["event"].to_numpy()
    q = np.zeros(len(s), dtype=int)
    for e in (0, 1):
        idx = np.flatnonzero(event == e)
        bins = min(n_time_bins, len(idx))
        if bins > 1:
            ranks = s["time"].iloc[idx].rank(method="first")
            q[idx] = pd.qcut(ranks, bins, labels=False).to_numpy()
    return event * n_time_bins + q


def strata_options(cohort: Cohort) -> list[tuple[str, np.ndarray]]:
    """Per-slide stratification labels, finest first: what a split may fall back to.

    Survival: event x time quantile, then event status alone (a small cohort
    whose training fold cannot fill every inner fold from each event x time
    stratum). Classification: the class only; a split never gives up class
    stratification silently.
    """
    if cohort.task == "classification":
        return [("class", strata(cohort))]
    return [
        ("event status x time quantile", strata(cohort)),
        ("event status", cohort.slides["event"].to_numpy(int)),
    ]


def stratified_group_folds(
    n_splits: int,
    positions: np.ndarray,
    options: list[tuple[str, np.ndarray]],
    groups: np.ndarray,
    seed: int,
    groups_name: str,
    key: str,
    where: str,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``StratifiedGroupKFold`` folds of ``positions`` (indices into ``groups`` and the
    strata): ``[(train, test)]`` as positions.

    Uses the finest strata of ``options`` that scikit-learn can split (it
    refuses when every stratum is smaller than ``n_splits``); when none can,
    or there are fewer groups than ``n_splits``, a :class:`SplitError` names
    the config ``key`` to change.
    """
    n_groups = len(np.unique(groups[positions]))
    if n_groups < n_splits:
        raise SplitError(f"{where}: {n_groups} {groups_name} cannot fill {n_splits} folds; {key}")
    for _, y in options:
        counts = np.unique(y[positions], return_counts=True)[1]
        if counts.max() >= n_splits:
            sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
            with warnings.catch_warnings():
                # "the least populated class has only k members": folds without that class
                # (mil check warns about small classes)
                warnings.simplefilter("ignore", UserWarning)
                return [
                    (positions[a], positions[b])
                    for a, b in sgkf.split(positions, y[positions], groups[positions])
                ]
    name, y = options[-1]
    values, counts = np.unique(y[positions], return_counts=True)
    sizes = ", ".join(f"{v}: {c}" for v, c in zip(values.tolist(), counts.tolist()))
    raise SplitError(
        f"{where}: stratified folds by {name} need at least one stratum of {n_splits} slides, "
        f"but the strata have {sizes}; {key}"
    )


def make_splits(
    cohort: Cohort,
    folds: int = 5,
    val_fraction: float = 0.15,
    seed: int = 0,
    repeats: int = 1,
    site_col: str | None = None,
) -> list[Split]:
    """Disjoint patient-level test folds, each with an inner validation split from its training patients.

    ``StratifiedGroupKFold`` (group = patient) makes the test folds; the
    validation patients are the first fold of a second ``StratifiedGroupKFold``
    over the training patients with ``round(1 / val_fraction)`` folds.

    With ``site_col`` (a column of ``cohort.slides`` naming each slide's
    tissue source site) the test folds are site-preserved: the outer groups
    are sites, so all patients of a site share one test fold and every test
    fold holds only sites absent from its training and validation patients
    (Howard et al., Nat Commun 2021). The inner validation split stays
    patient-level.
    """
    s = cohort.slides
    options = strata_options(cohort)
    groups = s["patient_id"].to_numpy()
    ids = s["slide_id"].to_numpy()
    n_patients = len(np.unique(groups))
    if n_patients < folds:
        raise SplitError(
            f"{cohort.source}: {n_patients} patients cannot fill {folds} folds (splits.folds)"
        )
    outer_groups = groups if site_col is None else site_groups(cohort, site_col, folds)
    out = []
    for r in range(repeats):
        outer = stratified_group_folds(
            folds,
            np.arange(len(ids)),
            options,
            outer_groups,
            seed + 1000 * r,
            "sites" if site_col else "patients",
            "lower splits.folds",
            cohort.source,
        )
        for k, (tr, te) in enumerate(outer):
            tr, val_idx = inner_validation(
                tr, options, groups, val_fraction, seed + 1000 * r + k + 1, where=f"fold {k}"
            )
            out.append(
                Split(k, ids[tr].tolist(), ids[val_idx].tolist(), ids[te].tolist(), repeat=r)
            )
    return out


def site_groups(cohort: Cohort, site_col: str, folds: int) -> np.ndarray:
    """Per-slide site of ``cohort.slides[site_col]``, checked for site-preserved folds.

    Every patient must belong to one site, and there must be at least
    ``folds`` sites.
    """
    s = cohort.slides
    site = site_column(cohort, site_col)
    per_patient = site.groupby(s["patient_id"]).unique()
    multi = per_patient[per_patient.apply(len) > 1]
    if len(multi):
        pid, sites = multi.index[0], sorted(multi.iloc[0])
        raise SplitError(
            f"{cohort.source}: patient {pid!r} has slides from two sites, {sites[0]!r} and "
            f"{sites[1]!r} (column {site_col!r}, data.site_col); site-preserved folds "
            f"(splits.by_site) need one site per patient: fix the CSV"
        )
    n_sites = site.nunique()
    if n_sites < folds:
        raise SplitError(
            f"{cohort.source}: {n_sites} sites cannot fill {folds} folds (splits.folds); "
            f"column {site_col!r} (data.site_col) has the sites {', '.join(sorted(site.unique()))}; "
            f"lower splits.folds or set splits.by_site: false"
        )
    return site.to_numpy()


def site_column(cohort: Cohort, site_col: str) -> pd.Series:
    """``cohort.slides[site_col]`` as strings; a clear error when the cohort lacks it."""
    if site_col not in cohort.slides.columns:
        raise SplitError(
            f"{cohort.source}: no site column {site_col!r} (data.site_col) in the cohort; "
            f"columns are: {', '.join(map(str, cohort.slides.columns))}"
        )
    return cohort.slides[site_col].astype(str)


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


def inner_validation(
    train: np.ndarray,
    options: list[tuple[str, np.ndarray]],
    groups: np.ndarray,
    val_fraction: float,
    seed: int,
    where: str = "a training fold",
) -> tuple[np.ndarray, np.ndarray]:
    """Split training positions into (train, val): the first of ``round(1 / val_fraction)``
    stratified patient-level folds over ``train`` is the validation set (none when 0).

    ``options``: strata finest first (:func:`strata_options`); a training fold
    too small for the finest falls back to the next."""
    if val_fraction <= 0:
        return train, np.array([], dtype=int)
    n_inner = max(2, int(round(1.0 / val_fraction)))
    key = (
        f"the inner validation split takes 1 of round(1 / splits.val_fraction) = {n_inner} folds; "
        f"raise splits.val_fraction (fewer, larger inner folds), lower splits.folds (larger "
        f"training folds), or set splits.val_fraction: 0 and train.patience: null (no early stopping)"
    )
    _, val = stratified_group_folds(
        n_inner, train, options, groups, seed, "training patients", key, where
    )[0]
    return np.setdiff1d(train, val), val


def read_assignment(
    path: str | Path,
    cohort: Cohort,
    folds: int,
    repeats: int = 1,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> list[Split]:
    """Test folds from a fold-assignment CSV; inner validation drawn from each training fold.

    The file has columns ``repeat`` (optional when ``repeats`` is 1),
    ``test_fold`` (0 .. folds-1) and one id column naming the cohort's bags
    (any name, e.g. ``bag_id``). Every bag must appear exactly once per
    repeat, and a patient's bags must share one test fold. The validation
    split of fold ``k`` in repeat ``r`` is drawn as in :func:`make_splits`
    (seed ``seed + 1000 r + k + 1``).
    """
    path = Path(path)
    if not path.is_file():
        raise SplitError(f"splits.assignment: fold assignment file not found: {path}")
    try:
        df = pd.read_csv(path, dtype=str)
    except Exception as exc:
        raise SplitError(f"{path}: cannot read the fold assignment ({exc})") from None
    if "test_fold" not in df.columns:
        raise SplitError(
            f"{path}: no 'test_fold' column; expected columns repeat, <bag id>, test_fold"
        )
    if "repeat" not in df.columns:
        if repeats != 1:
            raise SplitError(f"{path}: no 'repeat' column, but splits.repeats = {repeats}")
        df["repeat"] = "0"
    id_cols = [c for c in df.columns if c not in ("repeat", "test_fold")]
    if len(id_cols) != 1:
        raise SplitError(
            f"{path}: expected one bag id column beside 'repeat' and 'test_fold', found {id_cols}"
        )
    id_col = id_cols[0]
    ids = df[id_col].astype(str).str.strip()
    nums = {}
    for col in ("repeat", "test_fold"):
        v = pd.to_numeric(df[col], errors="coerce")
        if v.isna().any() or (v != v.round()).any():
            row = int(np.flatnonzero(v.isna() | (v != v.round()))[0])
            raise SplitError(
                f"{path}: column {col!r} must hold integers (row {row}: {df[col].iloc[row]!r})"
            )
        nums[col] = v.astype(int).to_numpy()
    rep, fold = nums["repeat"], nums["test_fold"]
    if sorted(set(rep)) != list(range(repeats)):
        raise SplitError(
            f"{path}: repeats {sorted(set(rep.tolist()))} in the file; splits.repeats = {repeats} "
            f"expects 0..{repeats - 1}"
        )
    bags = cohort.bags["bag_id"].tolist()
    known = set(bags)
    unknown = sorted(set(ids) - known)
    if unknown:
        raise SplitError(f"{path}: bag {unknown[0]!r} (column {id_col!r}) is not in the cohort")
    bag_patient = dict(zip(cohort.bags["bag_id"], cohort.bags["patient_id"]))
    fold_of: dict[int, dict[str, int]] = {}
    for r in range(repeats):
        here = rep == r
        r_ids, r_fold = ids[here].tolist(), fold[here]
        bad = sorted(set(r_fold.tolist()) - set(range(folds)))
        if bad:
            raise SplitError(
                f"{path}: repeat {r} has test_fold {bad[0]}; splits.folds = {folds} expects 0..{folds - 1}"
            )
        empty = sorted(set(range(folds)) - set(r_fold.tolist()))
        if empty:
            raise SplitError(f"{path}: repeat {r} puts no bag into test fold {empty[0]}")
        seen: dict[str, int] = {}
        for b, k in zip(r_ids, r_fold.tolist()):
            if b in seen:
                raise SplitError(
                    f"{path}: bag {b!r} appears more than once in repeat {r} "
                    f"(test folds {seen[b]} and {k}); each bag needs exactly one test fold per repeat"
                )
            seen[b] = k
        missing = [b for b in bags if b not in seen]
        if missing:
            raise SplitError(
                f"{path}: repeat {r} gives no test fold to {len(missing)} bag(s): "
                f"{', '.join(missing[:5])}{', …' if len(missing) > 5 else ''}; "
                f"each bag needs exactly one test fold per repeat"
            )
        patient_fold: dict[str, tuple[int, str]] = {}
        for b, k in seen.items():
            p = bag_patient[b]
            if p in patient_fold and patient_fold[p][0] != k:
                raise SplitError(
                    f"{path}: repeat {r} puts patient {p!r} into test folds {patient_fold[p][0]} "
                    f"(bag {patient_fold[p][1]}) and {k} (bag {b}); a patient's bags must share one fold"
                )
            patient_fold[p] = (k, b)
        fold_of[r] = seen

    s = cohort.slides
    slide_ids = s["slide_id"].to_numpy()
    options = strata_options(cohort)
    groups = s["patient_id"].to_numpy()
    out = []
    for r in range(repeats):
        slide_fold = s["bag_id"].map(fold_of[r]).to_numpy()
        for k in range(folds):
            te = np.flatnonzero(slide_fold == k)
            tr = np.flatnonzero(slide_fold != k)
            tr, val = inner_validation(
                tr,
                options,
                groups,
                val_fraction,
                seed + 1000 * r + k + 1,
                where=f"{path}, fold {k}",
            )
            out.append(
                Split(k, slide_ids[tr].tolist(), slide_ids[val].tolist(), slide_ids[te].tolist(), r)
            )
    return out


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
            old = read_splits(directory, cohort, folds, repeats)
            for a, b in zip(old, splits):
                if set(a.test) != set(b.test):
                    raise SplitError(
                        f"{split_file(directory, a)}: test fold {a.name} differs from {assignment}; "
                        f"use another split folder or remake it (`mil splits --force`)"
                    )
            return old, False
    if exists and not force:
        old = read_splits(directory, cohort, folds, repeats)
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
