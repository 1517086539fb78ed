"""Graph aggregators: message passing over each bag's instance graph, then attention pooling."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch_geometric.nn import DeepGCNLayer, GATv2Conv, GENConv
from torch_geometric.utils import softmax

from mil.data.batch import BagBatch
from mil.data.graph import GRAPH_KINDS, batch_graph
from mil.models.attention import AttentionScorer
from mil.models.base import MILModel, MILOutput, linear_head_scores, segment_weighted_sum
from mil.models.registry import register


class GraphMIL(MILModel):
    r"""Shared skeleton: encode, message passing, concatenate, gated attention pooling.

    .. math::
        h^{(0)}_i = \mathrm{ReLU}(W x_i),\quad h^{(l)} = \mathrm{layer}_l(h^{(l-1)}, E),\quad
        u_i = \phi([h^{(0)}_i \| \dots \| h^{(L)}_i]),\quad
        a_i = \operatorname{softmax}_{j \in b}(e_j),\quad
        z_b = \rho\Big(\sum_{i \in b} a_i u_i\Big)

    with :math:`e_i` the gated attention logit of :math:`u_i`. ``graph`` picks
    the instance graph (``"spatial"``: kNN of tile coordinates, ``"feature"``:
    kNN of input features, ``graph_k`` neighbours); the data layer builds it
    into ``batch.edge_index``, and a batch without one gets it built here.
    Instance scores: the attention logits; ``extra_scores`` add ``instance_logits``
    (the head on :math:`\rho(u_i)`, one instance's pooled representation) and
    ``attention_x_logit`` :math:`a_i W \rho(u_i)` (not an exact share: :math:`\rho`
    is applied after pooling).
    Subclasses set ``self.layers``, the message-passing stack (each layer
    ``[sum N_i, hidden_dim] -> [sum N_i, hidden_dim]``).
    """

    graph = "spatial"
    graph_k = 8

    def __init__(
        self,
        in_dim: int,
        n_out: int,
        hidden_dim: int,
        num_layers: int,
        dropout: float,
        graph: str,
        graph_k: int,
    ):
        super().__init__(in_dim, n_out)
        if graph not in GRAPH_KINDS:
            raise ValueError(f"graph must be one of {', '.join(GRAPH_KINDS)}, got {graph!r}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if graph_k < 1:
            raise ValueError(f"graph_k must be >= 1, got {graph_k}")
        self.graph = graph
        self.graph_k = int(graph_k)
        self.fc = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.layers = nn.ModuleList()
        width = hidden_dim * (num_layers + 1)
        self.phi = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Dropout(dropout))
        self.attention = AttentionScorer(width, width, gated=True, dropout=dropout)
        self.rho = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Dropout(dropout))
        self.head = nn.Linear(width, n_out)

    def _message_passing(self, h: Tensor, edge_index: Tensor) -> list[Tensor]:
        outs = [h]
        for layer in self.layers:
            h = layer(h, edge_index)
            outs.append(h)
        return outs

    def forward(self, batch: BagBatch) -> MILOutput:
        edge_index = batch.edge_index
        if edge_index is None:
            edge_index = batch_graph(batch, self.graph, self.graph_k)
        h = self.fc(batch.x)
        u = self.phi(torch.cat(self._message_passing(h, edge_index), 1))
        e = self.attention(u).squeeze(-1)
        a = softmax(e, batch.batch, ptr=batch.ptr, num_nodes=batch.num_bags)
        z = self.rho(segment_weighted_sum(u, a, batch.batch, batch.num_bags))
        with torch.no_grad():
            extra = linear_head_scores(self.rho(u), a, self.head.weight, self.head.bias)
        extra["attention_x_logit"] = extra.pop("contribution")
        return MILOutput(logits=self.head(z), embedding=z, scores=e.detach(), extra_scores=extra)


@register("patchgcn")
class PatchGCN(GraphMIL):
    r"""Patch-GCN (Chen et al., MICCAI 2021): residual DeeperGCN layers on the tile graph.

    Layer 1 is a bare ``GENConv``; layers 2..L are ``DeepGCNLayer`` blocks
    ``'res'``: :math:`h \leftarrow \mathrm{Dropout}(h + \mathrm{ReLU}(\mathrm{LN}(\mathrm{GENConv}(h))))`,
    with ``GENConv`` (Li et al. 2020):
    :math:`h_i' = \mathrm{MLP}\big(h_i + \sum_{j \in \mathcal N(i)} \operatorname{softmax}_j(t\,m_{ij})\, m_{ij}\big)`,
    :math:`m_{ij} = \mathrm{ReLU}(h_j) + \epsilon`, learnable temperature
    :math:`t`, a 2-layer MLP with per-node LayerNorm. Then the layer outputs and
    the input are concatenated and pooled by gated attention (see
    :class:`GraphMIL`). Instance scores are the attention logits.
    Defaults follow the paper (hidden 128, 3 graph layers, 8-NN spatial graph).
    """

    def __init__(
        self,
        in_dim: int,
        n_out: int,
        hidden_dim: int = 128,
        num_layers: int = 3,
        dropout: float = 0.25,
        layer_dropout: float = 0.1,
        graph: str = "spatial",
        graph_k: int = 8,
    ):
        super().__init__(in_dim, n_out, hidden_dim, num_layers, dropout, graph, graph_k)

        def conv() -> GENConv:
            # norm="layer" is a per-node LayerNorm; GENConv's default BatchNorm would mix bags.
            return GENConv(
                hidden_dim,
                hidden_dim,
                aggr="softmax",
                t=1.0,
                learn_t=True,
                num_layers=2,
                norm="layer",
            )

        self.layers.append(conv())
        for _ in range(num_layers - 1):
            self.layers.append(
                DeepGCNLayer(
                    conv(), nn.LayerNorm(hidden_dim), nn.ReLU(), block="res", dropout=layer_dropout
                )
            )


@register("gat")
class GATMIL(GraphMIL):
    r"""Graph attention MIL: GATv2 layers (Brody et al., ICLR 2022) on the tile graph.

    Each layer is a residual block
    :math:`h \leftarrow \mathrm{Dropout}(h + \mathrm{ReLU}(\mathrm{LN}(\mathrm{GATv2}(h))))` with
    :math:`\mathrm{GATv2}(h)_i = \sum_{j \in \mathcal N(i) \cup \{i\}} \alpha_{ij} W_r h_j`,
    :math:`\alpha_{ij} = \operatorname{softmax}_j\big(a^\top \mathrm{LeakyReLU}(W_l h_i + W_r h_j)\big)`
    (``heads`` heads, averaged). Then as :class:`PatchGCN`: concatenation of all
    layer outputs and gated attention pooling; instance scores are the
    attention logits.
    """

    def __init__(
        self,
        in_dim: int,
        n_out: int,
        hidden_dim: int = 128,
        num_layers: int = 3,
        heads: int = 4,
        dropout: float = 0.25,
        layer_dropout: float = 0.1,
        graph: str = "spatial",
        graph_k: int = 8,
    ):
        super().__init__(in_dim, n_out, hidden_dim, num_layers, dropout, graph, graph_k)
        self.layers.extend(
            DeepGCNLayer(
                GATv2Conv(hidden_dim, hidden_dim, heads=heads, concat=False),
                nn.LayerNorm(hidden_dim),
                nn.ReLU(),
                block="res",
                dropout=layer_dropout,
            )
            for _ in range(num_layers)
        )
