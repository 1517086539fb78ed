r"""Linear baselines on pooled bags: mean-pooled features and bag-of-words histograms.

Both pool a per-instance vector :math:`\phi(x_i)` by its mean over the bag,
standardise it with the training fold's mean :math:`\mu` and spread
:math:`\sigma`, and apply a linear head:

.. math::  f_b = \frac{1}{N_b}\sum_{i\in b}\phi(x_i), \qquad
           \eta_b = W\,\frac{f_b-\mu}{\sigma} + c.

- ``meanpool_linear``: :math:`\phi(x) = x` (the instance features);
- ``bow_linear``: :math:`\phi(x)` is the one-hot code of the nearest of ``words``
  k-means centres fit on the training fold's instances (a word histogram per bag);
- ``proto_linear``: prototypes as in PANTHER (Song et al., CVPR 2024): a diagonal Gaussian
  mixture of ``prototypes`` components fit on the training fold's instances;
  :math:`\phi(x) = [\,r_k(x),\; r_k(x)\,(x-m_k)/s_k\,]_k` with :math:`r_k` the posterior of
  component :math:`k`, so the bag vector holds each prototype's share of the bag and the mean
  offset of its tiles from the prototype (the mixture weights and first moments of a bag);
- ``clinical_linear``: the bag's tables alone (``data.tabular``: clinical variables, omics),
  :math:`f_b = [\,t \odot m_F;\ m\,]` (the patient's scaled values, zero where a modality
  is missing, and the availability of each modality), so every multimodal run has its
  table-only linear baseline (a ridge Cox model on the clinical covariates for survival);
  averaged with a slide model (``ensemble: [clinical_linear]``) it is a late fusion of
  linear risks.

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

import numpy as np
import torch
from torch import Tensor, nn

from mil.data.batch import BagBatch, collate_bags
from mil.models.base import MILModel, MILOutput
from mil.models.registry import register

#: head kinds: class logits or a Cox risk (linear), or discrete-time hazard logits
LINEAR, HAZARDS = 0, 1
#: instances whose basis vectors are computed at once
BASIS_CHUNK = 4096


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

    def fit_basis(self, x: np.ndarray, seed: int) -> None:
        """Fit what :meth:`basis` learns from the training fold's instances ``x [N, D]`` (a
        sample of them; :mod:`mil.train.closed_form`). Nothing here: a fixed basis."""

    def bag_vector(self, bag) -> Tensor:
        """:math:`f_b` of one bag (a :class:`mil.data.dataset.Bag`), unstandardised, ``[basis_dim]``
        in float64: the mean of :meth:`basis` over its instances, in chunks."""
        x = bag.x
        parts = [
            self.basis(x[i : i + BASIS_CHUNK]).double().sum(0)
            for i in range(0, len(x), BASIS_CHUNK)
        ]
        return torch.stack(parts).sum(0) / len(x)

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
        hazards = int(self.head_kind) == HAZARDS
        row = self.weight[0] if hazards else self.weight[-1]
        w = self.weight[:1] if hazards else self.weight
        n = batch.sizes[batch.batch].to(torch.float32).clamp(min=1).unsqueeze(1)
        z = torch.zeros(batch.num_bags, self.basis_dim, device=batch.x.device)
        scores, contribution, logits = [], [], []
        # in chunks of instances: a wide basis (proto_linear) is never held for a whole batch
        for lo in range(0, len(batch.x), BASIS_CHUNK):
            part = slice(lo, lo + BASIS_CHUNK)
            phi = (self.basis(batch.x[part]) - self.mu) / self.sigma
            z = z.index_add(0, batch.batch[part], phi / n[part])
            with torch.no_grad():
                scores.append(phi @ row)
                contribution.append(phi @ w.T / n[part])
                logits.append(self.head(phi))
        extra = {"contribution": torch.cat(contribution), "instance_logits": torch.cat(logits)}
        return MILOutput(
            logits=self.head(z), embedding=z, scores=torch.cat(scores), extra_scores=extra
        )


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

    def fit_basis(self, x: np.ndarray, seed: int) -> None:
        """k-means (scikit-learn) centres of the training fold's instances."""
        from sklearn.cluster import KMeans

        if len(np.unique(x, axis=0)) < self.basis_dim:
            raise ValueError(
                f"model.words = {self.basis_dim}, but the training bags hold fewer distinct "
                "instances; lower model.words"
            )
        km = KMeans(n_clusters=self.basis_dim, n_init=3, random_state=seed).fit(x)
        with torch.no_grad():
            self.centres.copy_(torch.as_tensor(km.cluster_centers_).float())

    def basis(self, x: Tensor) -> Tensor:
        x = x.float()
        # squared distances up to the per-instance constant |x|^2
        d = (self.centres.float() ** 2).sum(1) - 2.0 * x @ self.centres.float().T
        return nn.functional.one_hot(d.argmin(1), self.basis_dim).float()


@register("proto_linear")
class PrototypeLinear(PooledLinear):
    r"""Prototypes (PANTHER-style): a diagonal Gaussian mixture of ``prototypes`` components
    fit on the training fold's instances (scikit-learn); :math:`\phi(x)` holds each
    component's posterior :math:`r_k(x)` and :math:`r_k(x)(x-m_k)/s_k`; a linear head on
    their bag means (see :mod:`mil.models.linear`). ``basis_dim = prototypes (1 + in_dim)``."""

    def __init__(self, in_dim: int, n_out: int, prototypes: int = 8) -> None:
        if prototypes < 2:
            raise ValueError(f"prototypes = {prototypes}; a mixture needs at least 2 components")
        super().__init__(in_dim, n_out, prototypes * (1 + in_dim))
        self.prototypes = prototypes
        self.register_buffer("means", torch.zeros(prototypes, in_dim))
        self.register_buffer("scales", torch.ones(prototypes, in_dim))
        self.register_buffer("log_weights", torch.full((prototypes,), -float(np.log(prototypes))))

    def fit_basis(self, x: np.ndarray, seed: int) -> None:
        """``GaussianMixture(prototypes, covariance_type="diag")`` on the training instances."""
        from sklearn.mixture import GaussianMixture

        if len(x) < 2 * self.prototypes:
            raise ValueError(
                f"model.prototypes = {self.prototypes}, but the training bags hold {len(x)} "
                "instances; lower model.prototypes"
            )
        gmm = GaussianMixture(
            self.prototypes, covariance_type="diag", reg_covar=1e-4, max_iter=200, random_state=seed
        ).fit(x)
        with torch.no_grad():
            self.means.copy_(torch.as_tensor(gmm.means_).float())
            self.scales.copy_(torch.as_tensor(np.sqrt(gmm.covariances_)).float())
            self.log_weights.copy_(torch.as_tensor(np.log(gmm.weights_)).float())

    def posteriors(self, x: Tensor) -> Tensor:
        """:math:`r_k(x)`, ``[N, prototypes]`` (scikit-learn's ``predict_proba``)."""
        u = (x.float().unsqueeze(1) - self.means) / self.scales
        log_p = -0.5 * (u**2).sum(-1) - self.scales.log().sum(-1) + self.log_weights
        return torch.softmax(log_p, dim=1)

    def basis(self, x: Tensor) -> Tensor:
        x = x.float()
        r = self.posteriors(x)
        offsets = r.unsqueeze(2) * (x.unsqueeze(1) - self.means) / self.scales
        return torch.cat([r, offsets.flatten(1)], dim=1)


@register("clinical_linear")
class ClinicalLinear(PooledLinear):
    r"""The tables alone (``data.tabular``): :math:`f_b = [\,t \odot m_F;\ m\,]`, the
    patient's scaled values (zero where a modality is missing) and each modality's
    availability; the task's linear head (see :mod:`mil.models.linear`). The instances are
    not read: every tile of a bag gets the bag's logit as its ``instance_logits``."""

    uses_tabular = True
    uses_instances = False
    additive = False  # no instance shares: the tables are the whole input

    def __init__(
        self,
        in_dim: int,
        n_out: int,
        tabular: list[dict] | None = None,
        modalities: list[str] | None = None,
    ) -> None:
        from mil.models.fusion_layers import TabularModel

        layout = TabularModel(in_dim, n_out, tabular, modalities, 0.0)
        super().__init__(in_dim, n_out, len(layout.cols) + len(layout.mods))
        self.layout = layout

    def tables(self, batch: BagBatch) -> Tensor:
        """``[B, basis_dim]``: the selected modalities' values and their availability."""
        t, m = self.layout.tabular_inputs(batch)
        return torch.cat([t[:, self.layout.cols], m[:, self.layout.mods]], 1)

    def bag_vector(self, bag) -> Tensor:
        one = collate_bags([bag])
        return self.tables(one)[0].double()

    def forward(self, batch: BagBatch) -> MILOutput:
        z = (self.tables(batch) - self.mu) / self.sigma
        logits = self.head(z)
        extra = {"instance_logits": logits.detach().float()[batch.batch]}
        return MILOutput(logits=logits, embedding=z, extra_scores=extra)
