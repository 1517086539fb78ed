"""Where a config's bags come from: a cohort CSV with a feature folder, or one instance table."""

from __future__ import annotations

from mil.data.cohort import Cohort
from mil.data.dataset import FeatureStore
from mil.data.instances import load_instances
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
        return load_instances(cfg)
    cohort = Cohort.from_config(cfg)
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
        return load_instances(cfg)[0]
    return Cohort.from_config(cfg)
