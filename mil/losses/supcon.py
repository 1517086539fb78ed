"""SC-MIL's parts: the supervised contrastive loss over a batch of bag embeddings (Khosla et al.,
NeurIPS 2020), the projection head it is computed on, and its mix with the head's loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: how the contrastive share of the loss moves over training (``progress`` t from 0 to 1)
SCHEDULES = ("constant", "linear", "parabolic")
#: the width of the projection head's output
PROJECTION_DIM = 128


def supcon_loss(z: Tensor, labels: Tensor, temperature: float = 0.1) -> Tensor:
    r"""Khosla et al.'s :math:`\mathcal{L}^{sup}_{out}` over embeddings ``z [B, P]`` (normalised
    here to the unit sphere) with class ``labels [B]``:

    .. math:: \mathcal{L} = \frac{1}{|I'|} \sum_{i \in I'} \frac{-1}{|P(i)|} \sum_{p \in P(i)}
              \log \frac{\exp(z_i \cdot z_p / \tau)}{\sum_{a \ne i} \exp(z_i \cdot z_a / \tau)}

    ``P(i)``: the other bags of ``i``'s class; ``I'``: the anchors with at least one such bag
    (an anchor alone in its class has no positive and is left out). A batch without any
    positive pair gives 0 (with a gradient of zeros).
    """
    z = F.normalize(z.float(), dim=1)
    n = z.shape[0]
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    sim = (z @ z.T / temperature).masked_fill(self_mask, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    labels = labels.to(z.device).reshape(-1)
    positive = (labels[:, None] == labels[None, :]) & ~self_mask
    n_pos = positive.sum(1)
    anchors = n_pos > 0
    if not anchors.any():
        return 0.0 * z.sum()
    per_anchor = -log_prob.masked_fill(~positive, 0.0).sum(1)[anchors] / n_pos[anchors]
    return per_anchor.mean()


class ProjectionHead(nn.Module):
    """``Linear(H, H) -> ReLU -> Linear(H, 128)``: the bag embedding mapped to the space the
    contrastive loss works in (used in training only; predictions never pass through it)."""

    def __init__(self, in_dim: int, out_dim: int = PROJECTION_DIM) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(), nn.Linear(in_dim, out_dim))

    def forward(self, embedding: Tensor) -> Tensor:
        return self.net(embedding)


@dataclass(frozen=True)
class SupCon:
    """``task.supcon``: the share ``alpha(t)`` of the supervised contrastive loss in a training
    step's objective ``(1 - alpha) * head loss + alpha * SupCon``, ``t`` the share of the
    training budget done: ``constant`` ``alpha = weight``; ``linear`` ``weight * (1 - t)``;
    ``parabolic`` ``weight * (1 - t^2)`` (SC-MIL's move from representation to classifier,
    after BBN's cumulative-learning schedule)."""

    weight: float = 1.0
    temperature: float = 0.1
    schedule: Literal["constant", "linear", "parabolic"] = "parabolic"

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> SupCon:
        """``task.supcon`` as given (a mapping): keys checked, defaults filled; a ``ValueError``
        naming the key otherwise."""
        if not isinstance(raw, dict):
            raise ValueError(
                f"task.supcon must be a mapping (weight, temperature, schedule), found {raw!r}"
            )
        unknown = sorted(set(raw) - {"weight", "temperature", "schedule"})
        if unknown:
            raise ValueError(
                f"unknown key 'task.supcon.{unknown[0]}'; valid keys: schedule, temperature, weight"
            )
        out = cls(**raw)
        if (
            isinstance(out.weight, bool)
            or not isinstance(out.weight, (int, float))
            or not 0 <= out.weight <= 1
        ):
            raise ValueError(f"task.supcon.weight must be a number in [0, 1], found {out.weight!r}")
        t = out.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise ValueError(f"task.supcon.temperature must be a number > 0, found {t!r}")
        if out.schedule not in SCHEDULES:
            raise ValueError(
                f"task.supcon.schedule = {out.schedule!r}; expected one of {list(SCHEDULES)}"
            )
        return cls(float(out.weight), float(t), out.schedule)

    def alpha(self, progress: float) -> float:
        """The contrastive share at ``progress`` (0 to 1) of the training budget."""
        t = min(max(float(progress), 0.0), 1.0)
        if self.schedule == "linear":
            return self.weight * (1.0 - t)
        if self.schedule == "parabolic":
            return self.weight * (1.0 - t * t)
        return self.weight

    def mix(self, head_loss: Tensor, projected: Tensor, labels: Tensor, progress: float) -> Tensor:
        """A training step's objective from the head's loss and the projected embeddings."""
        a = self.alpha(progress)
        if a == 0.0:
            return head_loss + 0.0 * projected.sum()  # the head stays in the graph
        return (1.0 - a) * head_loss + a * supcon_loss(projected, labels, self.temperature)
