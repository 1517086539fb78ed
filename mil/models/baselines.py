"""Instance-agnostic pooling baselines: mean, max and log-mean-exp pooling of encoded instances
(or of their logits), and a linear model on the mean of the raw instances (a linear probe on
slide embeddings)."""

from __future__ import annotations

import torch
from torch import nn
from torch_geometric.utils import scatter

from mil.data.batch import BagBatch
from mil.models.base import (
    MILModel,
    MILOutput,
    linear_head_scores,
    mlp_encoder,
    segment_weighted_sum,
)
from mil.models.registry import register


@register("mean")
class MeanPoolMIL(MILModel):
    r"""Mean pooling: :math:`z_b = \frac{1}{N_b}\sum_{i \in b} f(x_i)`, logits :math:`= W z_b`.

    Instance scores are the head applied to each instance embedding (the
    instance's contribution to the bag logit; last output column). Additive:
    ``contribution`` :math:`W f(x_i) / N_b` sums to the logits less the bias;
    ``instance_logits`` :math:`W f(x_i) + c` is the model on a bag of one instance.
    """

    additive = True

    def logit_offset(self) -> torch.Tensor:
        return self.head.bias

    def __init__(
        self, in_dim: int, n_out: int, hidden_dim: int | list[int] = 128, dropout: float = 0.25
    ):
        super().__init__(in_dim, n_out)
        self.encoder, h = mlp_encoder(in_dim, hidden_dim, dropout)
        self.head = nn.Linear(h, n_out)

    def forward(self, batch: BagBatch) -> MILOutput:
        h = self.encoder(batch.x)
        w = 1.0 / batch.sizes.to(h.dtype).clamp(min=1)
        z = segment_weighted_sum(h, w[batch.batch], batch.batch, batch.num_bags)
        extra = linear_head_scores(h, w[batch.batch], self.head.weight, self.head.bias)
        scores = extra["instance_logits"][:, -1]
        return MILOutput(logits=self.head(z), embedding=z, scores=scores, extra_scores=extra)


@register("max")
class MaxPoolMIL(MILModel):
    r"""Max pooling: :math:`z_b = \max_{i \in b} f(x_i)` (element-wise), logits :math:`= W z_b`.

    Instance scores count how many embedding dimensions each instance wins;
    ``instance_logits`` is the head on one instance's embedding (the model on a bag
    of that instance alone).
    """

    def __init__(
        self, in_dim: int, n_out: int, hidden_dim: int | list[int] = 128, dropout: float = 0.25
    ):
        super().__init__(in_dim, n_out)
        self.encoder, h = mlp_encoder(in_dim, hidden_dim, dropout)
        self.head = nn.Linear(h, n_out)

    def forward(self, batch: BagBatch) -> MILOutput:
        h = self.encoder(batch.x)
        z = scatter(h, batch.batch, dim=0, dim_size=batch.num_bags, reduce="max")
        with torch.no_grad():
            wins = (h == z[batch.batch]).to(h.dtype).sum(1)
            extra = {"instance_logits": self.head(h.detach()).float()}
        return MILOutput(logits=self.head(z), embedding=z, scores=wins, extra_scores=extra)


@register("lse")
class LogSumExpMIL(MILModel):
    r"""Instance logits pooled by a smooth maximum (log-mean-exp; Ramon & De Raedt 2000).

    .. math::
        s_i = W f(x_i) + c, \qquad
        \text{logits}_b = \tfrac{1}{r} \log \tfrac{1}{N_b} \sum_{i \in b} e^{r s_i}

    per output column: ``r`` near 0 is mean pooling of the instance logits, large
    ``r`` their maximum. A bag of one instance has logits :math:`s_i`, so
    ``instance_logits`` (also the instance scores, last column) are exactly the
    model's output on each instance alone, comparable across bags.
    """

    def __init__(
        self,
        in_dim: int,
        n_out: int,
        hidden_dim: int | list[int] = 128,
        dropout: float = 0.25,
        r: float = 5.0,
    ):
        super().__init__(in_dim, n_out)
        if r <= 0:
            raise ValueError(f"r must be > 0, got {r}")
        self.r = float(r)
        self.encoder, h = mlp_encoder(in_dim, hidden_dim, dropout)
        self.head = nn.Linear(h, n_out)

    def forward(self, batch: BagBatch) -> MILOutput:
        h = self.encoder(batch.x)
        s = self.head(h)
        n = batch.num_bags
        top = scatter(s.detach(), batch.batch, dim=0, dim_size=n, reduce="max")  # for stability
        mean = scatter(
            torch.exp(self.r * (s - top[batch.batch])), batch.batch, 0, dim_size=n, reduce="mean"
        )
        logits = top + torch.log(mean) / self.r
        z = scatter(
            h, batch.batch, dim=0, dim_size=n, reduce="mean"
        )  # embedding: the mean instance
        inst = s.detach().float()
        return MILOutput(
            logits=logits, embedding=z, scores=inst[:, -1], extra_scores={"instance_logits": inst}
        )


@register("linear")
class LinearMIL(MILModel):
    r"""A linear model on the bag's mean instance, trained by the loop.

    .. math::  z_b = \frac{1}{N_b}\sum_{i \in b} x_i, \qquad \text{logits} = W z_b + c

    On slide or patient embeddings (bags of one, :mod:`mil.data.readers`) this is
    a linear probe fit by gradient descent (weight decay as the penalty); its
    closed-form counterpart is ``meanpool_linear``. :math:`W` starts at zero, as a
    logistic regression's solver does: a random start is a random direction of the
    same size as what a short training run learns (on a planted-signal cohort of 60
    slide embeddings, the default budget reached a cross-validated AUC of 0.79 from
    PyTorch's random start and 0.95 from zero). The model is additive: an instance's
    score is its contribution :math:`s_i = w \cdot x_i`, with :math:`w` the last row
    of :math:`W` (the positive class, or the risk), so a bag's scores average to its
    logit less :math:`c`; ``contribution`` :math:`W x_i / N_b` (all outputs) sums to it.
    """

    additive = True

    def logit_offset(self) -> torch.Tensor:
        return self.head.bias

    def __init__(self, in_dim: int, n_out: int):
        super().__init__(in_dim, n_out)
        self.head = nn.Linear(in_dim, n_out)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, batch: BagBatch) -> MILOutput:
        x = batch.x
        w = 1.0 / batch.sizes.to(x.dtype).clamp(min=1)
        z = segment_weighted_sum(x, w[batch.batch], batch.batch, batch.num_bags)
        extra = linear_head_scores(x, w[batch.batch], self.head.weight, self.head.bias)
        with torch.no_grad():
            scores = nn.functional.linear(x, self.head.weight[-1:]).squeeze(-1)
        return MILOutput(logits=self.head(z), embedding=z, scores=scores, extra_scores=extra)
