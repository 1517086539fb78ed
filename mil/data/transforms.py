"""Per-fold feature preprocessing, fitted on a fold's training bags and saved with its model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.covariance import ledoit_wolf_shrinkage

from mil.data.dataset import BagDataset

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

    mean: torch.Tensor
    std: torch.Tensor
    whiten: torch.Tensor | None = None
    shrinkage: float | None = None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.whiten is not None:
            return (x.float() - self.mean) @ self.whiten
        return (x.float() - self.mean) / self.std

    def state(self) -> dict[str, torch.Tensor]:
        """What ``model.pt`` keeps (``standardize``)."""
        state = {"mean": self.mean, "std": self.std}
        if self.whiten is not None:
            state["whiten"] = self.whiten
            state["shrinkage"] = torch.tensor(self.shrinkage)
        return state

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> Standardizer:
        w = state.get("whiten")
        if w is None:
            return cls(state["mean"].float(), state["std"].float())
        return cls(state["mean"].float(), state["std"].float(), w.float(), float(state["shrinkage"]))


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
