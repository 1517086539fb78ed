"""Building blocks of the fusion models (:mod:`mil.models.fusion`): self-normalising
networks, the tabular inputs of a batch, feature-group tokens and packed per-bag attention."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch_geometric.utils import softmax

from mil.data.batch import BagBatch
from mil.models.base import MILModel, mlp_encoder, segment_weighted_sum


def snn_block(in_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    """``AlphaDropout(SELU(W u + b))`` with LeCun-normal weights (the self-normalising init)."""
    lin = nn.Linear(in_dim, out_dim)
    nn.init.normal_(lin.weight, 0.0, in_dim**-0.5)
    nn.init.zeros_(lin.bias)
    return nn.Sequential(lin, nn.SELU(), nn.AlphaDropout(dropout))


def snn(in_dim: int, widths: list[int], dropout: float) -> nn.Sequential:
    dims = [in_dim, *widths]
    return nn.Sequential(*[snn_block(a, b, dropout) for a, b in zip(dims, dims[1:])])


class TabularModel(MILModel):
    """Shared parts: which modalities the model reads, their masked values and groups."""

    uses_tabular = True

    def __init__(
        self,
        in_dim: int,
        n_out: int,
        tabular: list[dict[str, Any]] | None,
        modalities: list[str] | None,
        modality_dropout: float,
    ) -> None:
        super().__init__(in_dim, n_out)
        layout = list(tabular or [])
        names = [m["name"] for m in layout]
        chosen = names if modalities is None else list(modalities)
        unknown = [m for m in chosen if m not in names]
        if unknown:
            raise ValueError(
                f"modalities: {unknown[0]!r} is not a tabular modality (data.tabular has {names})"
            )
        self.n_features = sum(int(m["dim"]) for m in layout)
        self.n_modalities = len(layout)
        self.modality_dropout = float(modality_dropout)
        offsets = [0]
        for m in layout:
            offsets.append(offsets[-1] + int(m["dim"]))
        mods = [names.index(m) for m in chosen]
        cols = [c for j in mods for c in range(offsets[j], offsets[j + 1])]
        self.groups = [
            (torch.tensor([offsets[j] + c for c in g]), j)
            for j in mods
            for g in layout[j]["groups"]
        ]
        self.register_buffer("cols", torch.tensor(cols, dtype=torch.long), persistent=False)
        self.register_buffer("mods", torch.tensor(mods, dtype=torch.long), persistent=False)
        dims = torch.tensor([int(m["dim"]) for m in layout], dtype=torch.long)
        mod_all = torch.repeat_interleave(torch.arange(len(layout)), dims)
        self.register_buffer("col_mod_all", mod_all, persistent=False)
        self.group_mod = [j for _, j in self.groups]
        for i, (idx, _) in enumerate(self.groups):
            self.register_buffer(f"group{i}", idx, persistent=False)

    def tabular_inputs(self, batch: BagBatch) -> tuple[Tensor, Tensor]:
        """``(t [B, F_all], m [B, M_all])``: values zeroed wherever the modality is missing
        (or dropped in training), and the availability mask."""
        b, dev = batch.num_bags, batch.x.device
        if batch.tabular is None:  # no tables (e.g. an external cohort): every modality missing
            return torch.zeros(b, self.n_features, device=dev), torch.zeros(
                b, self.n_modalities, device=dev
            )
        t, m = batch.tabular.float(), batch.tabular_mask.float()
        if self.training and self.modality_dropout > 0:
            m = m * (torch.rand_like(m) >= self.modality_dropout)
        return t * m[:, self.col_mod_all], m

    def group_values(self, t: Tensor) -> list[Tensor]:
        return [t[:, getattr(self, f"group{i}")] for i in range(len(self.groups))]


def group_tokens(
    model: TabularModel, encoders: nn.ModuleList, missing: Tensor, t: Tensor, m: Tensor
) -> tuple[Tensor, Tensor]:
    """``G [B, K, d]``: ``G_k = m_k SNN_k(t_{G_k}) + (1 - m_k) e_k`` (``e_k`` learned), and the
    group availability ``[B, K]``."""
    mk = m[:, model.group_mod] if model.groups else m.new_zeros(m.shape[0], 0)
    tokens = [enc(v) for enc, v in zip(encoders, model.group_values(t))]
    g = torch.stack(tokens, 1)
    return mk.unsqueeze(-1) * g + (1 - mk.unsqueeze(-1)) * missing, mk


def bag_logits(keys: Tensor, queries: Tensor, batch: Tensor) -> Tensor:
    """``s [N, K]``: ``s_ik = k_i . q_{b(i), k} / sqrt(d)`` for instance keys ``[N, d]`` and each
    bag's queries ``[B, K, d]``."""
    n, (b, k, d) = keys.shape[0], queries.shape
    s = (keys @ queries.reshape(b * k, d).T).view(n, b, k)
    return s.gather(1, batch.view(n, 1, 1).expand(n, 1, k)).squeeze(1) / math.sqrt(d)


def pooled(v: Tensor, a: Tensor, batch: Tensor, num_bags: int) -> Tensor:
    """``[B, K, d]``: ``sum_{i in b} a_ik v_i`` for weights ``a [N, K]``."""
    return torch.stack(
        [segment_weighted_sum(v, a[:, c].contiguous(), batch, num_bags) for c in range(a.shape[1])],
        1,
    )


class TokenPool(nn.Module):
    r"""Gated attention pooling of K tokens: :math:`\sum_k \mathrm{softmax}_k(w^\top(\tanh(V
    g_k) \odot \sigma(U g_k)))\, g_k`, over the tokens whose ``mask`` is 1 (0 where none is)."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.v, self.u, self.w = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, 1)
        self.drop = nn.Dropout(dropout)

    def forward(self, g: Tensor, mask: Tensor | None = None) -> Tensor:
        e = self.w(self.drop(torch.tanh(self.v(g)) * torch.sigmoid(self.u(g)))).squeeze(-1)
        if mask is None:
            return (torch.softmax(e, -1).unsqueeze(-1) * g).sum(1)
        a = torch.softmax(e.masked_fill(mask <= 0, -1e4), -1) * mask  # no token: all weights 0
        return (a.unsqueeze(-1) * g).sum(1)


class SlidePath(nn.Module):
    r"""Gated-attention pooling of the instances: :math:`h_i = \mathrm{ReLU}(W_e x_i)`,
    :math:`p_b = \sum_{i\in b} \mathrm{softmax}_{i\in b}(w^\top(\tanh(V h_i)\odot\sigma(U h_i)))\, h_i`."""

    def __init__(self, in_dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.encoder, _ = mlp_encoder(in_dim, hidden, dropout)
        self.v, self.u, self.w = (
            nn.Linear(hidden, hidden),
            nn.Linear(hidden, hidden),
            nn.Linear(hidden, 1),
        )

    def forward(self, batch: BagBatch) -> tuple[Tensor, Tensor, Tensor]:
        h = self.encoder(batch.x)
        e = self.w(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h))).squeeze(-1)
        a = softmax(e, batch.batch, ptr=batch.ptr, num_nodes=batch.num_bags)
        return segment_weighted_sum(h, a, batch.batch, batch.num_bags), e, h


class GroupTokens(nn.Module):
    """One SNN per feature group and a learned token for a patient without that group."""

    def __init__(self, model: TabularModel, dim: int, dropout: float) -> None:
        super().__init__()
        if not model.groups:
            raise ValueError("needs at least one tabular feature group (data.tabular)")
        self.encoders = nn.ModuleList(snn(len(idx), [dim, dim], dropout) for idx, _ in model.groups)
        self.missing = nn.Parameter(torch.randn(len(model.groups), dim) * 0.02)

    def forward(self, model: TabularModel, t: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
        return group_tokens(model, self.encoders, self.missing, t, m)
