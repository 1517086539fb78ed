r"""Linear baselines on pooled bags: mean-pooled features and bag-of-words histograms.

Both pool a per-instance vector :math:`\phi(x_i)` by its mean over the bag,
standardise it with the training fold's mean :math:`\mu` and spread
:math:`\sigma`, and apply a linear head:

.. math::  f_b = \frac{1}{N_b}\sum_{i\in b}\phi(x_i), \qquad
           \eta_b = W\,\frac{f_b-\mu}{\sigma} + c.

- ``meanpool_linear``: :math:`\phi(x) = x` (the instance features);
- ``bow_linear``: :math:`\phi(x)` is the one-hot code of the nearest of ``words``
  k-means centres fit on the training fold's instances (a word histogram per bag).

They are not trained by gradient descent: :mod:`mil.train.closed_form` fits the
head with the task's linear model (scikit-learn's logistic regression for
classification, scikit-survival's ridge Cox model for survival, ridge regression for
regression: :meth:`mil.tasks.Task.fit_linear`), the penalty chosen on the inner validation split, and
writes the result into this module's tensors. For the discrete-time survival loss
the Cox linear predictor :math:`\eta` becomes per-bin hazards through the
training fold's Breslow baseline: :math:`h_k = 1 - \exp(-\Delta H_0(k)\,e^{\eta})`.

The models are additive: an instance's score is its share of the bag's linear
predictor, :math:`s_i = w\cdot(\phi(x_i)-\mu)/\sigma` with :math:`w` the row of the
last class (or the risk), so the scores of a bag average to :math:`\eta_b - c`.
``contribution`` :math:`W(\phi(x_i)-\mu)/(\sigma N_b)` sums to :math:`\eta_b - c` (for the
discrete-time head: the Cox predictor's share, one column); ``instance_logits`` is the
model's output on a bag of that instance alone.

On slide or patient embeddings (one vector per file, read as a bag of one by
:mod:`mil.data.readers`) :math:`f_b` is the embedding itself, and ``meanpool_linear``
is the linear probe of the slide-encoder papers and Patho-Bench: an L2-penalised
logistic regression (ridge Cox for survival) on the embedding, its penalty chosen on
validation. Unlike Patho-Bench's, each feature is first standardised with the
training fold's statistics, and the penalty comes from
:data:`mil.tasks.linear_fits.C_GRID` (``ALPHA_GRID``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch_geometric.utils import scatter

from mil.data.batch import BagBatch
from mil.models.base import MILModel, MILOutput
from mil.models.registry import register

#: head kinds: class logits or a Cox risk (linear), or discrete-time hazard logits
LINEAR, HAZARDS = 0, 1


class PooledLinear(MILModel):
    """A linear head on a standardised mean of per-instance vectors (see the module)."""

    #: fitted in closed form by mil.train.closed_form, not by the training loop
    trained_by_gradient = False

    def __init__(self, in_dim: int, n_out: int, basis_dim: int) -> None:
        super().__init__(in_dim, n_out)
        self.basis_dim = basis_dim
        self.weight = nn.Parameter(torch.randn(n_out, basis_dim) * basis_dim**-0.5)
        self.bias = nn.Parameter(torch.zeros(n_out))
        self.register_buffer("mu", torch.zeros(basis_dim))
        self.register_buffer("sigma", torch.ones(basis_dim))
        # HAZARDS: weight[0] is the Cox coefficient vector, delta_h0 the baseline hazard per bin
        self.register_buffer("head_kind", torch.tensor(LINEAR))
        self.register_buffer("delta_h0", torch.zeros(n_out))

    @property
    def additive(self) -> bool:  # the discrete-time head is not linear in the bag vector
        return int(self.head_kind) != HAZARDS

    def logit_offset(self) -> Tensor:
        return self.bias

    def basis(self, x: Tensor) -> Tensor:
        """:math:`\\phi(x)` per instance, ``[N, basis_dim]``."""
        raise NotImplementedError

    def set_head(
        self, weight: Tensor, bias: Tensor, delta_h0: Tensor | None, *, mu: Tensor, sigma: Tensor
    ) -> None:
        """Write a fitted head: ``weight [n_out or 1, basis_dim]``, ``bias``; with ``delta_h0``
        (baseline hazard per bin) a Cox coefficient row whose risk becomes bin hazards."""
        with torch.no_grad():
            self.weight.zero_()
            self.bias.zero_()
            self.weight[: len(weight)] = weight
            self.bias[: len(bias)] = bias
            self.mu.copy_(mu)
            self.sigma.copy_(sigma)
            self.head_kind.fill_(LINEAR if delta_h0 is None else HAZARDS)
            if delta_h0 is not None:
                self.delta_h0.copy_(delta_h0)

    def head(self, z: Tensor) -> Tensor:
        """Logits of standardised bag vectors ``z [B, basis_dim]``."""
        eta = z @ self.weight.T + self.bias
        if int(self.head_kind) != HAZARDS:
            return eta
        # h = 1 - exp(-dH0 e^eta); its logit is log(expm1(dH0 e^eta)), which tends to
        # dH0 e^eta for large values
        c = (self.delta_h0.clamp(min=1e-12).log() + eta[:, :1]).clamp(max=30.0).exp()
        small = torch.log(torch.expm1(c.clamp(max=20.0)).clamp(min=1e-30))
        return torch.where(c > 20.0, c, small)

    def forward(self, batch: BagBatch) -> MILOutput:
        phi = (self.basis(batch.x) - self.mu) / self.sigma
        z = scatter(phi, batch.batch, dim=0, dim_size=batch.num_bags, reduce="mean")
        hazards = int(self.head_kind) == HAZARDS
        row = self.weight[0] if hazards else self.weight[-1]
        with torch.no_grad():
            scores = phi @ row
            n = batch.sizes[batch.batch].to(phi.dtype).clamp(min=1).unsqueeze(1)
            w = self.weight[:1] if hazards else self.weight
            extra = {"contribution": phi @ w.T / n, "instance_logits": self.head(phi)}
        return MILOutput(logits=self.head(z), embedding=z, scores=scores, extra_scores=extra)


@register("meanpool_linear")
class MeanPoolLinear(PooledLinear):
    r"""Mean-pooled instance features, a linear head: :math:`\phi(x) = x` (see :mod:`mil.models.linear`).

    On slide embeddings (bags of one) this is a linear probe on the embedding.
    """

    def __init__(self, in_dim: int, n_out: int) -> None:
        super().__init__(in_dim, n_out, in_dim)

    def basis(self, x: Tensor) -> Tensor:
        return x.float()


@register("bow_linear")
class BagOfWordsLinear(PooledLinear):
    r"""Bag of words: :math:`\phi(x)` one-hot of the nearest of ``words`` k-means centres fit
    on the training fold's instances; a linear head on the word histogram."""

    def __init__(self, in_dim: int, n_out: int, words: int = 20) -> None:
        if words < 2:
            raise ValueError(f"words = {words}; a codebook needs at least 2 words")
        super().__init__(in_dim, n_out, words)
        self.register_buffer("centres", torch.randn(words, in_dim))

    def set_codebook(self, centres: Tensor) -> None:
        with torch.no_grad():
            self.centres.copy_(centres)

    def basis(self, x: Tensor) -> Tensor:
        x = x.float()
        # squared distances up to the per-instance constant |x|^2
        d = (self.centres.float() ** 2).sum(1) - 2.0 * x @ self.centres.float().T
        return nn.functional.one_hot(d.argmin(1), self.basis_dim).float()
