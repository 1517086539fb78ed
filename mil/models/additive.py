"""Additive attention MIL: an instance head before pooling, so contributions sum to the logit."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch_geometric.utils import softmax

from mil.data.batch import BagBatch
from mil.models.attention import AttentionScorer
from mil.models.base import MILModel, MILOutput, mlp_encoder, segment_weighted_sum
from mil.models.registry import register


@register("abmil_additive")
class AdditiveABMIL(MILModel):
    r"""Additive attention MIL (after Javed et al., NeurIPS 2022): an instance head before pooling.

    .. math::
        h_i = f(x_i),\quad a_i = \operatorname{softmax}_{j \in b}(e_j),\quad
        \text{logits}_b = \sum_{i \in b} a_i\, \psi(h_i) + c

    with :math:`e_i` ABMIL's gated attention logit and :math:`\psi` = ``Linear -> ReLU ->
    Dropout -> Linear`` (no bias: :math:`c` is the only offset) to the head outputs. Each
    instance's ``contribution`` :math:`a_i \psi(h_i)` sums exactly to the logits less
    :math:`c`, and ``instance_logits`` :math:`\psi(h_i) + c` is exactly the model's output on
    a bag of that instance alone, so it is comparable across bags. Javed et al. apply
    :math:`\psi` to :math:`a_i h_i`; applying it to :math:`h_i` and weighting afterwards keeps
    :math:`\psi(h_i)` the logit of one instance. Instance scores: the attention logits.
    Embedding: the attention-pooled :math:`\sum_i a_i h_i`.
    """

    additive = True

    def __init__(
        self,
        in_dim: int,
        n_out: int,
        hidden_dim: int | list[int] = 128,
        attn_dim: int | None = None,
        head_dim: int = 64,
        gated: bool = True,
        dropout: float = 0.25,
    ):
        super().__init__(in_dim, n_out)
        self.encoder, h = mlp_encoder(in_dim, hidden_dim, dropout)
        self.attention = AttentionScorer(h, attn_dim or h, gated, dropout)
        self.psi = nn.Sequential(
            nn.Linear(h, head_dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(head_dim, n_out, bias=False),
        )
        self.bias = nn.Parameter(torch.zeros(n_out))

    def logit_offset(self) -> Tensor:
        return self.bias

    def forward(self, batch: BagBatch) -> MILOutput:
        h = self.encoder(batch.x)
        e = self.attention(h).squeeze(-1)
        a = softmax(e, batch.batch, ptr=batch.ptr, num_nodes=batch.num_bags)
        psi = self.psi(h)
        logits = segment_weighted_sum(psi, a, batch.batch, batch.num_bags) + self.bias
        z = segment_weighted_sum(h, a, batch.batch, batch.num_bags)
        with torch.no_grad():
            psi, a = psi.detach().float(), a.detach().float()
            extra = {
                "contribution": psi * a.unsqueeze(1),
                "instance_logits": psi + self.bias.float(),
            }
        return MILOutput(logits=logits, embedding=z, scores=e.detach(), extra_scores=extra)
