"""Attention-based MIL aggregators (Ilse et al. 2018 and successors)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch_geometric.utils import softmax

from mil.data.batch import BagBatch
from mil.models.base import MILModel, MILOutput, mlp_encoder, segment_weighted_sum
from mil.models.registry import register


class AttentionScorer(nn.Module):
    r"""Instance attention logits :math:`e_i = w^\top(\tanh(V h_i) \odot \sigma(U h_i))`.

    Without gating the sigmoid term is dropped (Ilse et al. 2018, eq. 8 and 9).
    ``n_branches > 1`` gives one logit per branch (CLAM-MB).
    """

    def __init__(self, in_dim: int, attn_dim: int, gated: bool, dropout: float, n_branches: int = 1):
        super().__init__()
        self.v = nn.Sequential(nn.Linear(in_dim, attn_dim), nn.Tanh(), nn.Dropout(dropout))
        self.u = (
            nn.Sequential(nn.Linear(in_dim, attn_dim), nn.Sigmoid(), nn.Dropout(dropout))
            if gated
            else None
        )
        self.w = nn.Linear(attn_dim, n_branches)

    def forward(self, h: Tensor) -> Tensor:
        a = self.v(h)
        if self.u is not None:
            a = a * self.u(h)
        return self.w(a)


@register("abmil")
class ABMIL(MILModel):
    r"""Attention-based deep MIL (Ilse, Tomczak & Welling, ICML 2018).

    .. math::
        h_i = f(x_i), \quad
        a_i = \operatorname{softmax}_{j \in b}\big(w^\top(\tanh(V h_j) \odot \sigma(U h_j))\big)_i,
        \quad z_b = \sum_{i \in b} a_i h_i, \quad \text{logits} = W z_b

    ``f`` is ``(Linear -> ReLU -> Dropout)`` per entry of ``hidden_dim`` (an int
    or a list of widths). ``gated=False`` drops the sigmoid gate. Instance
    scores are the attention logits :math:`e_i` before the softmax, so they are
    comparable across bags of different sizes.
    """

    def __init__(
        self,
        in_dim: int,
        n_out: int,
        hidden_dim: int | list[int] = 128,
        attn_dim: int | None = None,
        gated: bool = True,
        dropout: float = 0.25,
    ):
        super().__init__(in_dim, n_out)
        self.encoder, h = mlp_encoder(in_dim, hidden_dim, dropout)
        self.attention = AttentionScorer(h, attn_dim or h, gated, dropout)
        self.head = nn.Linear(h, n_out)

    def forward(self, batch: BagBatch) -> MILOutput:
        h = self.encoder(batch.x)
        e = self.attention(h).squeeze(-1)
        a = softmax(e, batch.batch, ptr=batch.ptr, num_nodes=batch.num_bags)
        z = segment_weighted_sum(h, a, batch.batch, batch.num_bags)
        return MILOutput(logits=self.head(z), embedding=z, scores=e.detach())
