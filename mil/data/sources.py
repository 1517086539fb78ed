"""Where a config's bags come from: a cohort CSV with a feature folder, or one instance table."""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

from mil.data.cohort import Cohort
from mil.data.dataset import FeatureStore
from mil.data.instances import load_instances
from mil.data.store import PackedFeatures, default_store_dir, open_store
from mil.data.tabular import attach_tabular, parse_tabular
from mil.errors import DataError, MilWarning
from mil.schema import Config


def load_cohort(cfg: Config, progress: bool = True) -> tuple[Cohort, FeatureStore]:
    """The cohort and the store of its features (not yet read: see ``FeatureStore.preload``).

    ``data.instances``: the table's bags, held in memory. Otherwise the CSV
    (``data.csv``) and the feature folder (``data.features``), every slide of
    the CSV with a feature file. With ``data.store: packed`` the store is attached, built
    first (``progress``: with a bar) if it is missing or stale.
    """
    d = cfg.data
    if d.instances:
        cohort, store = load_instances(cfg)
        return with_tabular(cohort, cfg), store
    cohort = with_tabular(Cohort.from_config(cfg), cfg)
    store = FeatureStore.from_dir(d.features, budget_gb=d.cache_gb, cache_dtype=d.cache_dtype)
    missing = [s for s in cohort.slides["slide_id"] if s not in store.index]
    if missing:
        raise DataError(
            f"{len(missing)} slides of {d.csv} have no feature file in {d.features}: "
            f"{', '.join(missing[:5])}{', …' if len(missing) > 5 else ''} "
            f"(run `mil check` for a full report)"
        )
    if d.store == "packed":
        open_packed(cfg, store, cohort.slides["slide_id"].tolist(), progress=progress)
    return cohort, store


def packed_store_dir(cfg: Config) -> Path:
    """``data.store_dir``, or ``<data.features>/.mil_store``."""
    return Path(cfg.data.store_dir) if cfg.data.store_dir else default_store_dir(cfg.data.features)


def open_packed(
    cfg: Config, store: FeatureStore, slide_ids: list[str], rebuild: bool = True, progress=True
) -> str:
    """Attach the cohort's packed store to ``store``, (re)building it first when it is missing
    or stale (``rebuild``; else a stale store is a :class:`DataError`). Returns what was done."""
    packed, done = open_store(
        packed_store_dir(cfg), store.index, slide_ids, store.read, rebuild, progress
    )
    store.attach(packed)
    if done.startswith("rebuilt"):
        warnings.warn(f"feature store {packed.root} {done}", MilWarning, stacklevel=2)
    return done


def pack_cohort(
    cfg: Config, rebuild: bool = True, progress: bool = True
) -> tuple[PackedFeatures, str]:
    """``mil cache``: the packed store of ``cfg``'s cohort, (re)built if missing or stale
    (else, without ``rebuild``, a :class:`DataError` says why it is stale), and what was done."""
    if cfg.data.instances:
        raise DataError(
            "data.instances: an instance table is read into memory whole; there is no feature folder to pack"
        )
    cohort, store = load_cohort(replace(cfg, data=replace(cfg.data, store="files")), progress)
    done = open_packed(cfg, store, cohort.slides["slide_id"].tolist(), rebuild, progress)
    return store.packed, done


def read_cohort(cfg: Config) -> Cohort:
    """The cohort alone: from the CSV (features unread), or from the instance table."""
    if cfg.data.instances:
        return with_tabular(load_instances(cfg)[0], cfg)
    return with_tabular(Cohort.from_config(cfg), cfg)


def with_tabular(cohort: Cohort, cfg: Config) -> Cohort:
    """``cohort`` with the tables of ``data.tabular`` joined by patient (:mod:`mil.data.tabular`)."""
    if not cfg.data.tabular:
        return cohort
    return attach_tabular(cohort, parse_tabular(cfg.data.tabular, cfg.source))
