"""Per-fold feature preprocessing, fitted on a fold's training bags and saved with its model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.covariance import ledoit_wolf_shrinkage

from mil.data.dataset import BagDataset
from mil.data.tabular import TabularScaler, TabularTable

#: training instances (a uniform sample) from which the Ledoit-Wolf shrinkage of the
#: whitening covariance is estimated
WHITEN_SAMPLE = 20_000
#: the least shrinkage used: Ledoit-Wolf's estimate assumes independent instances, but
#: tiles of one slide are not, so it understates how noisy the covariance of a small fold
#: is; at ``a = 0.3`` no direction is amplified beyond ~1.8x the mean feature sd
#: (0.3 rather than 0.1: better on MUSK1 and digits-b100, equal elsewhere; docs/benchmarks.md)
WHITEN_MIN_SHRINKAGE = 0.3


@dataclass
class Standardizer:
    """Per-fold feature preprocessing with statistics of the training bags only.

    ``(x - mean) / std`` per feature (``data.standardize: true``), or, with ``whiten``
    set (``data.standardize: whiten``), ``(x - mean) @ whiten``: ZCA whitening by the
    inverse square root of the instance covariance shrunk towards a multiple of the
    identity, ``S = (1 - a) C + a (tr C / d) I``, with the Ledoit-Wolf shrinkage ``a``
    (:func:`sklearn.covariance.ledoit_wolf_shrinkage`), at least
    :data:`WHITEN_MIN_SHRINKAGE`. The shrinkage grows as the
    training fold holds fewer instances per dimension, so that directions the fold barely
    saw are not blown up (with ``a = 1`` whitening is a uniform rescaling).
    """

    mean: torch.Tensor | None
    std: torch.Tensor | None
    whiten: torch.Tensor | None = None
    shrinkage: float | None = None
    #: the tabular modalities' scaler (:mod:`mil.data.tabular`), fitted on the same fold
    tabular: TabularScaler | None = None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is None:  # tabular scaling only: the features pass unchanged
            return x
        if self.whiten is not None:
            return (x.float() - self.mean) @ self.whiten
        return (x.float() - self.mean) / self.std

    @property
    def features(self):
        """The feature transform a fold's bags see (None: features unchanged)."""
        return None if self.mean is None else self.apply

    def tabular_of(self, bag_id: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A bag's scaled tabular values ``[F]`` and availability ``[M]``, or None."""
        return None if self.tabular is None else self.tabular.bag(bag_id)

    def state(self) -> dict[str, torch.Tensor]:
        """What ``model.pt`` keeps (``standardize``)."""
        state = {} if self.mean is None else {"mean": self.mean, "std": self.std}
        if self.whiten is not None:
            state["whiten"] = self.whiten
            state["shrinkage"] = torch.tensor(self.shrinkage)
        if self.tabular is not None:
            state["tabular"] = self.tabular.state()
        return state

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> Standardizer:
        tab = TabularScaler.from_state(state["tabular"]) if "tabular" in state else None
        mean, std = state.get("mean"), state.get("std")
        if mean is None:
            return cls(None, None, tabular=tab)
        w = state.get("whiten")
        if w is None:
            return cls(mean.float(), std.float(), tabular=tab)
        return cls(mean.float(), std.float(), w.float(), float(state["shrinkage"]), tab)


def fold_preprocessing(
    data: BagDataset, bag_ids: Sequence[str], standardize: bool | str, tabular: TabularTable | None
) -> Standardizer | None:
    """A fold's preprocessing from its training bags ``bag_ids`` only: the features'
    standardisation or whitening (``standardize``: False, True or ``"whiten"``) and the
    scaler of the tabular modalities (``tabular``: the cohort's tables, or None); None when
    there is nothing to do. ``data.with_transform(result)`` gives the fold's view of the bags."""
    norm = feature_stats(data, bag_ids, whiten=standardize == "whiten") if standardize else None
    if tabular is None:
        return norm
    if norm is None:
        norm = Standardizer(None, None)
    norm.tabular = tabular.fit(list(bag_ids))
    return norm


def feature_stats(data: BagDataset, bag_ids: Sequence[str], whiten: bool = False) -> Standardizer:
    """Mean and sd of every feature over all instances of ``bag_ids`` (float64 sums, one
    pass); with ``whiten`` also the instance covariance, a uniform sample of
    :data:`WHITEN_SAMPLE` instances for its shrinkage, and the shrunk inverse square root."""
    total, sq, n = 0.0, 0.0, 0
    rng = np.random.default_rng(0)
    sample, keys = [], np.empty(0)
    for b in bag_ids:
        for s in data.bag_slides[b]:
            x = data.store.get(s)[0].double()
            total = total + x.sum(0)
            sq = sq + (x.T @ x if whiten else (x * x).sum(0))
            n += x.shape[0]
            if whiten:  # reservoir: the WHITEN_SAMPLE rows with the largest random keys
                sample.append(x.numpy())
                keys = np.concatenate([keys, rng.random(x.shape[0])])
                if len(keys) > 2 * WHITEN_SAMPLE:
                    sample, keys = _keep_top(np.concatenate(sample), keys)
    mean = total / n
    second = sq / n
    var = (second.diagonal() if whiten else second) - mean * mean
    std = var.clamp(min=0).sqrt()
    std[std < 1e-8] = 1.0  # constant features pass through centred
    if not whiten:
        return Standardizer(mean=mean.float(), std=std.float())
    rows = _keep_top(np.concatenate(sample), keys)[0][0]
    a = max(WHITEN_MIN_SHRINKAGE, float(ledoit_wolf_shrinkage(rows)) if len(rows) > 1 else 1.0)
    cov = second - torch.outer(mean, mean)
    cov = (cov + cov.T) / 2
    level = max(float(cov.trace()) / cov.shape[0], 1e-12)
    shrunk = (1 - a) * cov + a * level * torch.eye(cov.shape[0], dtype=cov.dtype)
    evals, evecs = torch.linalg.eigh(shrunk)
    w = (evecs * evals.clamp(min=1e-12 * level).rsqrt()) @ evecs.T
    return Standardizer(mean=mean.float(), std=std.float(), whiten=w.float(), shrinkage=a)


def _keep_top(rows: np.ndarray, keys: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    if len(keys) > WHITEN_SAMPLE:
        top = np.argpartition(-keys, WHITEN_SAMPLE)[:WHITEN_SAMPLE]
        rows, keys = rows[top], keys[top]
    return [rows], keys
