"""Patient-level stratified k-fold splits (or site-preserved), each with an inner validation split."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from mil.data.cohort import Cohort
from mil.errors import SplitError

PARTS = ("train", "val", "test")


@dataclass
class Split:
    """One fold: slide ids per partition."""

    fold: int
    train: list[str]
    val: list[str]
    test: list[str]
    repeat: int = 0
    #: an inner fold's name (``0/inner1``); outer folds are named by fold and repeat
    label: str | None = None

    @property
    def name(self) -> str:
        if self.label is not None:
            return self.label
        return f"{self.fold}" if self.repeat == 0 else f"r{self.repeat}_{self.fold}"

    def part(self, name: str) -> list[str]:
        return getattr(self, name)


def strata(cohort: Cohort) -> np.ndarray:
    """Per-slide stratification labels, the finest the task gives (its class, event status x
    time quantile, target quantile: :meth:`mil.data.targets.Targets.strata`)."""
    return strata_options(cohort)[0][1]


def strata_options(cohort: Cohort) -> list[tuple[str, np.ndarray]]:
    """Per-slide stratification labels, finest first: what a split may fall back to.

    The task's targets say which (:meth:`mil.data.targets.Targets.strata`): survival, event
    x time quantile, then event status alone (a small cohort whose training fold cannot fill
    every inner fold from each event x time stratum); classification, the class only (a
    split never gives up class stratification silently).
    """
    return cohort.targets.strata(cohort.slides)


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


def inner_splits(
    cohort: Cohort, outer: Split, folds: int, val_fraction: float, seed: int
) -> list[Split]:
    """``folds`` stratified patient-level folds of ``outer``'s training and validation slides
    (its test slides take no part), each with its own inner validation split: what
    ``select.mode: inner`` chooses on (:mod:`mil.train.selection`)."""
    s = cohort.slides
    ids = s["slide_id"].to_numpy()
    groups = s["patient_id"].to_numpy()
    options = strata_options(cohort)
    pos = np.flatnonzero(np.isin(ids, [*outer.train, *outer.val]))
    where = f"fold {outer.name}"
    key = "lower select.folds (fewer, larger inner folds)"
    out = []
    base = seed + 7907 * (outer.fold + 1) + 1000 * outer.repeat
    parts = stratified_group_folds(folds, pos, options, groups, base, "patients", key, where)
    for j, (tr, te) in enumerate(parts):
        tr, val = inner_validation(tr, options, groups, val_fraction, base + j + 1, where=where)
        label = f"{outer.name}/inner{j}"
        out.append(
            Split(
                outer.fold,
                ids[tr].tolist(),
                ids[val].tolist(),
                ids[te].tolist(),
                outer.repeat,
                label,
            )
        )
    return out
