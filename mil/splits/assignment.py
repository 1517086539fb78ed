"""Test folds given by the user: a fold-assignment CSV (bag -> test fold, per repeat)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mil.data.cohort import Cohort
from mil.errors import SplitError
from mil.splits.folds import Split, inner_validation, strata_options


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
    ids, rep, fold, id_col = _read_table(path, repeats)
    unknown = sorted(set(ids) - set(cohort.bags["bag_id"]))
    if unknown:
        raise SplitError(f"{path}: bag {unknown[0]!r} (column {id_col!r}) is not in the cohort")
    fold_of = {
        r: _repeat_folds(path, r, ids[rep == r].tolist(), fold[rep == r], folds, cohort)
        for r in range(repeats)
    }
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


def _read_table(path: Path, repeats: int) -> tuple[pd.Series, np.ndarray, np.ndarray, str]:
    """The file's bag ids, repeats and test folds (integers, checked), and its id column."""
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
    nums = {}
    for col in ("repeat", "test_fold"):
        v = pd.to_numeric(df[col], errors="coerce")
        if v.isna().any() or (v != v.round()).any():
            row = int(np.flatnonzero(v.isna() | (v != v.round()))[0])
            raise SplitError(
                f"{path}: column {col!r} must hold integers (row {row}: {df[col].iloc[row]!r})"
            )
        nums[col] = v.astype(int).to_numpy()
    rep = nums["repeat"]
    if sorted(set(rep)) != list(range(repeats)):
        raise SplitError(
            f"{path}: repeats {sorted(set(rep.tolist()))} in the file; splits.repeats = {repeats} "
            f"expects 0..{repeats - 1}"
        )
    return df[id_cols[0]].astype(str).str.strip(), rep, nums["test_fold"], id_cols[0]


def _repeat_folds(
    path: Path, r: int, r_ids: list[str], r_fold: np.ndarray, folds: int, cohort: Cohort
) -> dict[str, int]:
    """Bag -> test fold of repeat ``r``: every bag once, every fold used, a patient's bags
    in one fold."""
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
    missing = [b for b in cohort.bags["bag_id"] if b not in seen]
    if missing:
        raise SplitError(
            f"{path}: repeat {r} gives no test fold to {len(missing)} bag(s): "
            f"{', '.join(missing[:5])}{', …' if len(missing) > 5 else ''}; "
            f"each bag needs exactly one test fold per repeat"
        )
    bag_patient = dict(zip(cohort.bags["bag_id"], cohort.bags["patient_id"]))
    patient_fold: dict[str, tuple[int, str]] = {}
    for b, k in seen.items():
        p = bag_patient[b]
        if p in patient_fold and patient_fold[p][0] != k:
            raise SplitError(
                f"{path}: repeat {r} puts patient {p!r} into test folds {patient_fold[p][0]} "
                f"(bag {patient_fold[p][1]}) and {k} (bag {b}); a patient's bags must share one fold"
            )
        patient_fold[p] = (k, b)
    return seen
