"""Where a config's bags come from: a cohort CSV with a feature folder, or one instance table."""

from __future__ import annotations

from mil.data.cohort import Cohort
from mil.data.dataset import FeatureStore
from mil.data.instances import load_instances
from mil.data.tabular import attach_tabular, parse_tabular
from mil.errors import DataError
from mil.schema import Config


def load_cohort(cfg: Config) -> tuple[Cohort, FeatureStore]:
    """The cohort and the store of its features (not yet read: see ``FeatureStore.preload``).

    ``data.instances``: the table's bags, held in memory. Otherwise the CSV
    (``data.csv``) and the feature folder (``data.features``), every slide of
    the CSV with a feature file.
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
    return cohort, store


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
