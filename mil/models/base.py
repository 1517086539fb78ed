"""The aggregator interface every model in the registry implements."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mil.data.batch import BagBatch


@dataclass
class MILOutput:
    """What an aggregator returns for a packed batch of B bags.

    Attributes:
        logits: ``[B, n_out]`` head outputs (class logits, a Cox risk, hazard logits).
        embedding: ``[B, H]`` bag embeddings before the head.
        scores: ``[sum N_i]`` per-instance scores for heatmaps (e.g. attention
            logits before the per-bag softmax), or None for models without them.
        aux_loss: a scalar the runner adds to the task loss (e.g. CLAM's
            instance-clustering loss), or None.
        extra_scores: further named per-instance score kinds ``{kind: [sum N_i, K]}``
            (e.g. one attention branch per class); the kind names are :data:`SCORE_KINDS`.
    """

    logits: Tensor
    embedding: Tensor
    scores: Tensor | None = None
    aux_loss: Tensor | None = None
    extra_scores: dict[str, Tensor] = field(default_factory=dict)


#: per-instance score kinds a model may put in ``MILOutput.extra_scores`` (``[sum N_i, K]``,
#: one column per head output: class logit, Cox risk, or hazard bin), and what each means
SCORE_KINDS: dict[str, str] = {
    "attention": "attention logits before the per-bag softmax (one column per branch): where the "
    "model looked, not what spoke for a class; only comparable within a bag",
    "contribution": "the instance's additive share of each bag logit: over a bag they sum exactly "
    "to the logit less the head's bias (attention weight x the head on the instance embedding "
    "for attention models with a linear head; the instance head's output x its attention for "
    "abmil_additive); signed; shrinks with bag size, so compare it within a bag",
    "instance_logits": "the bag head (or the model's instance classifier) applied to one "
    "instance alone: what the model would say of a bag made of this instance; comparable "
    "across bags",
    "attention_x_logit": "attention weight x the head on the instance's representation, where the "
    "model is not additive (graph and transformer models): an approximation of a contribution",
    "instance_classifier": "CLAM's instance classifiers: log-odds that the instance is a top-attended "
    "instance of class k (trained on pseudo-labels)",
}

#: the kind a heatmap draws unless told otherwise (chosen by benchmarks/localization.py,
#: docs/benchmarks.md); each task orders the kinds it falls back along
#: (:attr:`mil.tasks.Task.score_order`)
DEFAULT_SCORE_KIND = "instance_logits"
#: survival's and regression's: the signed share of the output (an instance logit's sign is
#: relative to an arbitrary zero of the Cox predictor)
SURVIVAL_SCORE_KIND = "contribution"


class MILModel(nn.Module):
    """Base class: ``forward(batch: BagBatch) -> MILOutput``.

    Subclasses take ``in_dim`` (instance feature size) and ``n_out`` (head
    outputs) as their first two arguments, then their own hyper-parameters.
    ``graph`` names the instance graph the model needs (``None``, ``"spatial"``
    or ``"feature"``); the data layer builds it into ``batch.edge_index``.
    A model some of whose parameters can stay out of a training step's loss
    sets ``unused_parameters = True`` (data-parallel training then looks for
    them every step; the uniform tests hold every other model to a gradient
    for every parameter). A model fitted in closed form rather than by the training
    loop (the linear baselines of :mod:`mil.models.linear`) sets
    ``trained_by_gradient = False``; the runner then fits it with
    :mod:`mil.train.closed_form`, and the uniform tests skip the gradient contracts.
    """

    #: the instance graph the data layer builds into ``batch.edge_index``: None, "spatial"
    #: (k nearest tiles by coordinates) or "feature" (k nearest in feature space)
    graph: str | None = None
    graph_k: int = 8
    #: some parameters may stay out of a step's loss (data-parallel training looks for them)
    unused_parameters: bool = False
    #: fitted by the training loop (False: in closed form by :mod:`mil.train.closed_form`)
    trained_by_gradient: bool = True
    #: the model's ``extra_scores["contribution"]`` sum over each bag to its logits less
    #: :meth:`logit_offset` (exactly, in eval mode); the uniform tests check it
    additive: bool = False
    #: reads the patient's tables (``data.tabular``) beside the instances: a fusion model
    uses_tabular: bool = False
    #: reads the bag's instances at all (False: a model of the tables alone, e.g. ``snn``)
    uses_instances: bool = True
    #: the bag's output does not depend on the order of its instances (False: positional
    #: models; the uniform tests skip the permutation check)
    permutation_invariant: bool = True

    def logit_offset(self) -> Tensor:
        """``[n_out]``: what an additive model adds to the summed contributions (its head's bias)."""
        raise NotImplementedError(f"{type(self).__name__} is not additive")

    def __init__(self, in_dim: int, n_out: int) -> None:
        super().__init__()
        self.in_dim = int(in_dim)
        self.n_out = int(n_out)

    def forward(self, batch: BagBatch) -> MILOutput:  # pragma: no cover - interface
        raise NotImplementedError


def mlp_encoder(in_dim: int, hidden: int | list[int], dropout: float) -> tuple[nn.Sequential, int]:
    """Instance encoder ``(Linear -> ReLU -> Dropout) x len(hidden)``; returns (module, out_dim)."""
    widths = [hidden] if isinstance(hidden, int) else list(hidden)
    layers: list[nn.Module] = []
    prev = in_dim
    for w in widths:
        layers += [nn.Linear(prev, int(w)), nn.ReLU(), nn.Dropout(dropout)]
        prev = int(w)
    return nn.Sequential(*layers), prev


def segment_weighted_sum(h: Tensor, weights: Tensor, batch: Tensor, num_bags: int) -> Tensor:
    """``z_b = sum_{i in bag b} w_i h_i`` for packed rows; returns ``[B, H]``.

    On CPU one ``index_add_`` of the scaled rows (measured ~2x faster than a
    sparse ``[B, sum N_i] @ [sum N_i, H]`` product, fp32 and bf16, few large or
    many small bags); on CUDA the sparse product, which is deterministic where
    ``index_add_``'s atomics are not. CUDA has no bfloat16/float16 sparse
    product, so reduced-precision rows are summed in float32 there (the result
    is cast back).
    """
    if h.device.type == "cpu":
        w = weights.to(h.dtype).unsqueeze(-1)
        return h.new_zeros(num_bags, h.shape[1]).index_add_(0, batch, w * h)
    n = h.shape[0]
    wide = h if h.dtype in (torch.float32, torch.float64) else h.float()
    weights = weights.to(wide.dtype).contiguous()  # CUDA sparse mm misreads strided values
    index = torch.stack([batch, torch.arange(n, device=h.device)])
    a = torch.sparse_coo_tensor(
        index, weights, (num_bags, n), is_coalesced=True, check_invariants=False
    )
    with torch.autocast("cuda", enabled=False):  # autocast would cast it back to bf16
        return torch.sparse.mm(a, wide).to(h.dtype)


def linear_head_scores(h: Tensor, a: Tensor, weight: Tensor, bias: Tensor) -> dict[str, Tensor]:
    r"""``contribution`` :math:`a_i W h_i` and ``instance_logits`` :math:`W h_i + c` of a linear
    head ``(weight [K, H], bias [K])`` over attention-pooled ``h [sum N_i, H]`` (``a [sum N_i]``
    or ``[sum N_i, K]``, per-class weights)."""
    with torch.no_grad():
        inst = F.linear(h.detach(), weight.detach()).float()
        a = a.detach().float()
        return {
            "contribution": inst * (a if a.dim() == 2 else a.unsqueeze(1)),
            "instance_logits": inst + bias.detach().float(),
        }
