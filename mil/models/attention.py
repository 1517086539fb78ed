"""Attention-based MIL aggregators (Ilse et al. 2018 and successors)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.utils import softmax, to_dense_batch

from mil.data.batch import BagBatch
from mil.models.base import (
    MILModel,
    MILOutput,
    linear_head_scores,
    mlp_encoder,
    segment_weighted_sum,
)
from mil.models.registry import register


class AttentionScorer(nn.Module):
    r"""Instance attention logits :math:`e_i = w^\top(\tanh(V h_i) \odot \sigma(U h_i))`.

    Without gating the sigmoid term is dropped (Ilse et al. 2018, eq. 8 and 9).
    ``n_branches > 1`` gives one logit per branch (CLAM-MB).
    """

    def __init__(
        self, in_dim: int, attn_dim: int, gated: bool, dropout: float, n_branches: int = 1
    ):
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
    scores are the attention logits :math:`e_i` before the softmax. The head is
    linear, so the model is additive (``extra_scores``): ``contribution``
    :math:`a_i W h_i` sums over the bag to the logits less the head's bias, and
    ``instance_logits`` :math:`W h_i + c` is the head on one instance alone.
    """

    additive = True

    def logit_offset(self) -> Tensor:
        return self.head.bias

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
        return MILOutput(
            logits=self.head(z),
            embedding=z,
            scores=e.detach(),
            extra_scores=linear_head_scores(h, a, self.head.weight, self.head.bias),
        )


def _branch_sums(h: Tensor, a: Tensor, batch: BagBatch) -> Tensor:
    """``z[b, c] = sum_{i in b} a[i, c] h_i`` for ``a [sum N_i, C]``; returns ``[B, C, H]``."""
    # A column of ``a`` is a strided view; the sparse product on CUDA needs it contiguous.
    return torch.stack(
        [
            segment_weighted_sum(h, a[:, c].contiguous(), batch.batch, batch.num_bags)
            for c in range(a.shape[1])
        ],
        1,
    )


def _topk_rows(e: Tensor, batch: BagBatch, k: Tensor, largest: bool) -> tuple[Tensor, Tensor]:
    """Per bag, the packed row indices of the ``k_b`` largest (or smallest) values of ``e``.

    ``e [sum N_i]``, ``k [B]`` with ``k_b <= N_b``. Returns ``(rows, bag)``: the
    selected packed rows and the bag of each, in bag order.
    """
    fill = float("-inf") if largest else float("inf")
    dense, _ = to_dense_batch(e, batch.batch, fill_value=fill, batch_size=batch.num_bags)
    k_max = int(k.max()) if k.numel() else 0
    idx = dense.topk(k_max, dim=1, largest=largest).indices
    keep = torch.arange(k_max, device=e.device) < k.unsqueeze(1)
    rows = (idx + batch.ptr[:-1].unsqueeze(1))[keep]
    bag = torch.arange(batch.num_bags, device=e.device).unsqueeze(1).expand_as(idx)[keep]
    return rows, bag


class CLAM(MILModel):
    r"""CLAM (Lu et al., Nat. Biomed. Eng. 2021): gated attention with instance clustering.

    .. math::
        h_i = \mathrm{ReLU}(W x_i),\quad
        a_{i,c} = \operatorname{softmax}_{j \in b}\big(w_c^\top(\tanh(V h_j) \odot \sigma(U h_j))\big)_i,\quad
        z_{b,c} = \sum_{i \in b} a_{i,c} h_i

    with one attention branch (``clam_sb``, logits :math:`= W z_b`) or one per
    class (``clam_mb``, logit :math:`c = w_c^\top z_{b,c}`).

    Instance clustering (training signal only): for a bag of class :math:`y`,
    the ``k`` most attended instances of branch :math:`y` are pseudo-labelled
    positive and the ``k`` least attended negative for instance classifier
    :math:`y` (a ``Linear(H, 2)`` per class); with ``subtyping``, the ``k``
    most attended instances of every other class :math:`c` (branch :math:`c`)
    are also negatives for classifier :math:`c`. Each classifier's
    cross-entropy is averaged over its instances, summed over classifiers
    (divided by the number of classes when ``subtyping``), and averaged over
    the bags. ``k = min(k_sample, N_b // 2)`` so positives and negatives are
    distinct; a bag of one instance contributes nothing.

    CLAM minimises :math:`\beta\,L_{bag} + (1 - \beta)\,L_{inst}`
    (:math:`\beta` = ``bag_weight``); the runner adds ``aux_loss`` to the
    task loss, so ``aux_loss`` :math:`= \tfrac{1-\beta}{\beta} L_{inst}` and the
    total is CLAM's objective divided by :math:`\beta` (a constant factor:
    the same optimum; with Adam, virtually the same steps). The instance loss is
    computed whenever ``batch.targets`` (class labels) is set and
    ``n_out >= 2``; otherwise (evaluation, survival) ``aux_loss`` is None.

    Instance scores: the attention logits of the branch of the predicted class
    (the only branch for ``clam_sb``); all branches are in
    ``extra_scores["attention"]`` ``[sum N_i, n_branches]``. The bag classifiers are
    linear, so the model is additive: ``contribution`` :math:`a_{i,c} w_c^\top h_i`
    (``clam_sb``: :math:`a_i W h_i`) and ``instance_logits`` (the bag classifiers on
    :math:`h_i` alone); ``instance_classifier`` holds the log-odds of each class's
    instance classifier (two-class tasks and up). Embedding: :math:`z_b`,
    or for ``clam_mb`` all branches' :math:`z_{b,c}` concatenated, ``[B, n_out * H]``.
    Registered as ``clam_sb`` and ``clam_mb``; with ``n_out = 1`` (a Cox risk)
    both have a single branch and no instance loss.
    """

    multi_branch = False
    additive = True

    def logit_offset(self) -> Tensor:
        return self.head_bias if self.multi_branch else self.head.bias

    def __init__(
        self,
        in_dim: int,
        n_out: int,
        hidden_dim: int = 512,
        attn_dim: int = 256,
        dropout: float = 0.25,
        k_sample: int = 8,
        bag_weight: float = 0.7,
        subtyping: bool = False,
    ):
        super().__init__(in_dim, n_out)
        if not 0.0 < bag_weight <= 1.0:
            raise ValueError(f"bag_weight must be in (0, 1], got {bag_weight}")
        if k_sample < 1:
            raise ValueError(f"k_sample must be >= 1, got {k_sample}")
        self.k_sample = k_sample
        self.bag_weight = bag_weight
        self.subtyping = subtyping
        self.n_branches = n_out if self.multi_branch else 1
        self.encoder, h = mlp_encoder(in_dim, hidden_dim, dropout)
        self.attention = AttentionScorer(h, attn_dim, True, dropout, self.n_branches)
        if self.multi_branch:
            # One bag classifier per class, each reading its own branch's embedding.
            self.head_weight = nn.Parameter(torch.empty(n_out, h))
            self.head_bias = nn.Parameter(torch.empty(n_out))
            bound = h**-0.5
            nn.init.uniform_(self.head_weight, -bound, bound)
            nn.init.uniform_(self.head_bias, -bound, bound)
        else:
            self.head = nn.Linear(h, n_out)
        self.instance_classifiers = nn.ModuleList(
            nn.Linear(h, 2) for _ in range(n_out if n_out >= 2 else 0)
        )

    def _instance_loss(self, e: Tensor, h: Tensor, batch: BagBatch) -> Tensor:
        targets = batch.targets.to(torch.long)
        n_classes = len(self.instance_classifiers)
        if targets.shape != (batch.num_bags,) or targets.min() < 0 or targets.max() >= n_classes:
            raise ValueError(
                f"{self.registry_name}: batch.targets must be {batch.num_bags} class labels "
                f"in 0..{n_classes - 1}, got {batch.targets.tolist()}"
            )
        k = torch.minimum(batch.sizes // 2, torch.full_like(batch.sizes, self.k_sample))
        total = h.new_zeros(())
        for c, classifier in enumerate(self.instance_classifiers):
            branch = e[:, c if self.multi_branch else 0]
            top, top_bag = _topk_rows(branch, batch, k, largest=True)
            bottom, bottom_bag = _topk_rows(branch, batch, k, largest=False)
            rows, bags = torch.cat([top, bottom]), torch.cat([top_bag, bottom_bag])
            is_top = torch.arange(len(rows), device=rows.device) < len(top)
            in_class = targets[bags] == c
            # In-class bags: top -> 1, bottom -> 0; other bags (subtyping only): top -> 0.
            keep = in_class | (is_top & self.subtyping)
            rows, bags, labels = rows[keep], bags[keep], (in_class & is_top)[keep].long()
            ce = F.cross_entropy(classifier(h[rows]), labels, reduction="none")
            # Mean over each bag's instances for this classifier.
            per_bag = torch.bincount(bags, minlength=batch.num_bags).to(h.dtype)
            total = total + (ce / per_bag[bags]).sum()
        if self.subtyping:
            total = total / n_classes
        return total / batch.num_bags

    def forward(self, batch: BagBatch) -> MILOutput:
        h = self.encoder(batch.x)
        e = self.attention(h)
        a = softmax(e, batch.batch, ptr=batch.ptr, num_nodes=batch.num_bags)
        if self.multi_branch:
            z = _branch_sums(h, a, batch)
            logits = (z * self.head_weight).sum(-1) + self.head_bias
            with torch.no_grad():
                pred = logits.argmax(1)
            embedding = z.flatten(1)
            scores = e.detach().gather(1, pred[batch.batch].unsqueeze(1)).squeeze(1)
            extra = linear_head_scores(h, a, self.head_weight, self.head_bias)
        else:
            embedding = segment_weighted_sum(h, a[:, 0], batch.batch, batch.num_bags)
            logits = self.head(embedding)
            scores = e.detach()[:, 0]
            extra = linear_head_scores(h, a[:, 0], self.head.weight, self.head.bias)
        extra["attention"] = e.detach()
        if self.instance_classifiers:
            with torch.no_grad():  # each classifier's log-odds of "a top instance of class c"
                odds = [clf(h.detach()).diff(dim=1)[:, 0] for clf in self.instance_classifiers]
                extra["instance_classifier"] = torch.stack(odds, 1).float()
        aux_loss = None
        if batch.targets is not None and self.instance_classifiers:
            instance_loss = self._instance_loss(e, h, batch)
            aux_loss = (1.0 - self.bag_weight) / self.bag_weight * instance_loss
        return MILOutput(
            logits=logits,
            embedding=embedding,
            scores=scores,
            aux_loss=aux_loss,
            extra_scores=extra,
        )


@register("clam_sb")
class CLAMSingleBranch(CLAM):
    """CLAM-SB: one attention branch shared by all classes (see :class:`CLAM`)."""


@register("clam_mb")
class CLAMMultiBranch(CLAM):
    """CLAM-MB: one attention branch and one bag classifier per class (see :class:`CLAM`)."""

    multi_branch = True


@register("dsmil")
class DSMIL(MILModel):
    r"""Dual-stream MIL (Li, Li & Eliceiri, CVPR 2021).

    Instance stream: :math:`s_{i,c} = w_c^\top h_i` with :math:`h_i = f(x_i)`;
    the critical instance of class :math:`c` in bag :math:`b` is
    :math:`m_{b,c} = \arg\max_{i \in b} s_{i,c}`. Bag stream:

    .. math::
        q_i = Q(h_i),\quad
        a_{i,c} = \operatorname{softmax}_{j \in b}\Big(\frac{\langle q_j, q_{m_{b,c}}\rangle}{\sqrt{d_q}}\Big)_i,\quad
        v_{b,c} = \sum_{i \in b} a_{i,c} h_i,\quad
        \hat y^{bag}_b = \mathrm{Conv1d}_{C \to C,\ \mathrm{kernel}\ H}([v_{b,1}; \dots; v_{b,C}])

    with :math:`Q` = ``Linear -> ReLU -> Linear -> Tanh`` (``q_dim``). Logits are
    the mean of the two streams, :math:`\tfrac12(\max_{i \in b} s_{i,\cdot} + \hat y^{bag}_b)`
    (the paper trains each stream with its own loss and averages them for
    prediction). ``f`` is ``Linear -> ReLU -> Dropout`` to ``hidden_dim`` (the
    paper feeds the raw features; a projection keeps the Conv1d small).
    Instance scores: attention logits of the last class (the positive class
    for binary tasks); all classes are in ``extra_scores["attention"]`` and the
    instance-classifier outputs in ``extra_scores["instance_logits"]``. Both
    streams are linear in the instances, so the model is additive:
    ``contribution`` :math:`\tfrac12\big(\sum_{c'} a_{i,c'} K_{c,c'}^\top h_i
    + s_{i,c}[i = m_{b,c}]\big)` (:math:`K` the Conv1d kernel) sums over the bag
    to the logits less half the Conv1d's bias.
    Embedding: :math:`[v_{b,1}; \dots; v_{b,C}]` flattened, ``[B, C * H]``.
    """

    def __init__(
        self,
        in_dim: int,
        n_out: int,
        hidden_dim: int = 256,
        q_dim: int = 128,
        dropout: float = 0.25,
    ):
        super().__init__(in_dim, n_out)
        self.encoder, h = mlp_encoder(in_dim, hidden_dim, dropout)
        self.instance_classifier = nn.Linear(h, n_out)
        self.q = nn.Sequential(nn.Linear(h, q_dim), nn.ReLU(), nn.Linear(q_dim, q_dim), nn.Tanh())
        self.bag_classifier = nn.Conv1d(n_out, n_out, kernel_size=h)

    additive = True

    def logit_offset(self) -> Tensor:
        return 0.5 * self.bag_classifier.bias

    def _contribution(self, h: Tensor, s: Tensor, a: Tensor, critical: Tensor) -> Tensor:
        """``[sum N_i, C]``: each instance's share of both streams' logits (see the class)."""
        with torch.no_grad():
            h, s, a = h.detach().float(), s.detach().float(), a.detach().float()
            per_branch = torch.einsum("nh,cdh->ncd", h, self.bag_classifier.weight.detach().float())
            bag_stream = (per_branch * a.unsqueeze(1)).sum(-1)
            is_critical = torch.zeros_like(s)
            cols = torch.arange(s.shape[1], device=s.device).expand_as(critical)
            is_critical[critical.reshape(-1), cols.reshape(-1)] = 1.0
            return 0.5 * (bag_stream + s * is_critical)

    def forward(self, batch: BagBatch) -> MILOutput:
        h = self.encoder(batch.x)
        s = self.instance_classifier(h)
        s_dense, _ = to_dense_batch(
            s, batch.batch, fill_value=float("-inf"), batch_size=batch.num_bags
        )
        s_max, critical = s_dense.max(1)
        critical = critical + batch.ptr[:-1].unsqueeze(1)
        q = self.q(h)
        q_crit = q[critical]
        e = torch.einsum("nd,ncd->nc", q, q_crit[batch.batch]) / math.sqrt(q.shape[-1])
        a = softmax(e, batch.batch, ptr=batch.ptr, num_nodes=batch.num_bags)
        v = _branch_sums(h, a, batch)
        bag_logits = self.bag_classifier(v).squeeze(-1)
        return MILOutput(
            logits=0.5 * (s_max + bag_logits),
            embedding=v.flatten(1),
            scores=e.detach()[:, -1],
            extra_scores={
                "attention": e.detach(),
                "instance_logits": s.detach(),
                "contribution": self._contribution(h, s, a, critical),
            },
        )
