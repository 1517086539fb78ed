"""Per-fold feature preprocessing, fitted on a fold's training bags and saved with its model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mil.data.dataset import BagDataset


@dataclass
class Standardizer:
    """Per-feature standardisation ``(x - mean) / std`` with statistics of the training bags only."""

    mean: torch.Tensor
    std: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std

    def state(self) -> dict[str, torch.Tensor]:
        """What ``model.pt`` keeps (``standardize``)."""
        return {"mean": self.mean, "std": self.std}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> Standardizer:
        return cls(mean=state["mean"].float(), std=state["std"].float())


def feature_stats(data: BagDataset, bag_ids: Sequence[str]) -> Standardizer:
    """Mean and sd of every feature over all instances of ``bag_ids`` (float64 sums, one pass)."""
    total, sq, n = 0.0, 0.0, 0
    for b in bag_ids:
        for s in data.bag_slides[b]:
            x = data.store.get(s)[0].double()
            total = total + x.sum(0)
            sq = sq + (x * x).sum(0)
            n += x.shape[0]
    mean = total / n
    var = (sq / n - mean * mean).clamp(min=0)
    std = var.sqrt()
    std[std < 1e-8] = 1.0  # constant features pass through centred
    return Standardizer(mean=mean.float(), std=std.float())
