"""Models that fuse the bag with the patient's tabular modalities (omics, pathways, clinical).

Each reads ``batch.tabular [B, F]`` (scaled values, modalities concatenated in the order of
its ``tabular`` layout, which the runner fills from ``data.tabular``) and
``batch.tabular_mask [B, M]`` (1: the patient has modality m). A missing modality never drops
the patient: its values are zero and the mask tells the model, which replaces what it lacks
(learned group tokens, a zeroed omics embedding). ``modality_dropout`` hides each modality of
each training bag with that probability, so the slide path learns to stand alone.
Designs after SNN (Klambauer et al. 2017), PORPOISE (Chen et al. 2022), MCAT (Chen et al.
2021) and SurvPath (Jaume et al. 2024); the formulas are in each class's docstring.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch_geometric.utils import scatter, softmax

from mil.data.batch import BagBatch
from mil.errors import ConfigError
from mil.models.base import MILOutput, mlp_encoder
from mil.models.fusion_layers import (
    GroupTokens,
    SlidePath,
    TabularModel,
    TokenPool,
    bag_logits,
    pooled,
    snn,
)
from mil.models.registry import get, register


def with_tabular_layout(name: str, hparams: dict[str, Any], table) -> dict[str, Any]:
    """``hparams`` with the ``tabular`` layout of the cohort's tables (a
    :class:`mil.data.tabular.TabularTable`) for a model that fuses them; others unchanged."""
    if not get(name).uses_tabular:
        return dict(hparams)
    if table is None:
        raise ConfigError(f"model {name!r} fuses tabular modalities: list them under data.tabular")
    return {**hparams, "tabular": table.layout()}


#: the attention fusions' defaults (``mcat``, ``survpath``): chosen on the multimodal demo's
#: cohort, where they raised C by 0.05 over width 128 without modality dropout, and confirmed on
#: the cohort zoo's multimodal-surv (docs/benchmarks.md, "Fusion at the library defaults")
FUSION_HIDDEN, FUSION_MODALITY_DROPOUT = 32, 0.3


@register("snn")
class SNN(TabularModel):
    r"""Self-normalising network on the tabular modalities alone (Klambauer et al. 2017; the
    omics baseline of MCAT and PORPOISE); the bag's instances are not read.

    .. math::
        u = [\,t \odot m_F\,;\ m\,], \quad h_0 = u, \quad
        h_{l+1} = \operatorname{AlphaDropout}(\operatorname{SELU}(W_l h_l + b_l)), \quad
        \text{logits} = W_o h_L

    ``t`` the selected modalities' scaled values, ``m`` their availability (``m_F``: each
    column's), so a patient without a modality is told apart from an average one.
    """

    uses_instances = False

    def __init__(
        self,
        in_dim: int,
        n_out: int,
        tabular: list[dict[str, Any]] | None = None,
        modalities: list[str] | None = None,
        hidden_dim: int | list[int] = [256, 256],  # noqa: B006 (a hyper-parameter default, never mutated)
        dropout: float = 0.25,
        modality_dropout: float = 0.0,
    ):
        super().__init__(in_dim, n_out, tabular, modalities, modality_dropout)
        widths = [hidden_dim] if isinstance(hidden_dim, int) else list(hidden_dim)
        self.net = snn(len(self.cols) + len(self.mods), widths, dropout)
        self.head = nn.Linear(widths[-1], n_out)

    def forward(self, batch: BagBatch) -> MILOutput:
        t, m = self.tabular_inputs(batch)
        h = self.net(torch.cat([t[:, self.cols], m[:, self.mods]], 1))
        logits = self.head(h)
        # a bag of one instance gets the same prediction: the instances are not read
        extra = {"instance_logits": logits.detach().float()[batch.batch]}
        return MILOutput(logits=logits, embedding=h, extra_scores=extra)


@register("late_fusion")
class LateFusion(TabularModel):
    r"""Late fusion of a gated-attention slide embedding and an SNN omics embedding (PORPOISE).

    .. math::
        p = \text{SlidePath}(x), \quad g = \operatorname{SNN}([t \odot m_F; m]), \quad
        o = \max_j m_j

    ``fusion="concat"``: :math:`z = \mathrm{ReLU}(W_z [p;\ o\,g])`. ``fusion="kronecker"``
    (PORPOISE's gated bilinear fusion):

    .. math::
        \tilde p = \sigma(p^\top B_p g + c_p) \odot \mathrm{ReLU}(W_p p), \quad
        \tilde g = o\,\sigma(p^\top B_g g + c_g) \odot \mathrm{ReLU}(W_g g), \quad
        z = \mathrm{ReLU}\big(W_z \operatorname{vec}([\tilde p; 1] \otimes [\tilde g; 1])\big)

    then :math:`\text{logits} = W_o z`. Without omics (:math:`o = 0`) the Kronecker product
    keeps only :math:`[\tilde p; 1]`: the model is a slide-only model for that patient.
    Instance scores are the slide path's attention logits.
    """

    def __init__(
        self,
        in_dim: int,
        n_out: int,
        tabular: list[dict[str, Any]] | None = None,
        modalities: list[str] | None = None,
        fusion: str = "kronecker",
        hidden_dim: int = 128,
        fusion_dim: int = 32,
        dropout: float = 0.25,
        modality_dropout: float = 0.0,
    ):
        super().__init__(in_dim, n_out, tabular, modalities, modality_dropout)
        if fusion not in ("concat", "kronecker"):
            raise ValueError(f"fusion = {fusion!r}; expected concat or kronecker")
        self.fusion = fusion
        self.slide = SlidePath(in_dim, hidden_dim, dropout)
        self.omics = snn(len(self.cols) + len(self.mods), [hidden_dim, hidden_dim], dropout)
        if fusion == "concat":
            self.fuse = nn.Linear(2 * hidden_dim, hidden_dim)
        else:
            self.gate_p = nn.Bilinear(hidden_dim, hidden_dim, fusion_dim)
            self.gate_g = nn.Bilinear(hidden_dim, hidden_dim, fusion_dim)
            self.proj_p = nn.Linear(hidden_dim, fusion_dim)
            self.proj_g = nn.Linear(hidden_dim, fusion_dim)
            self.fuse = nn.Linear((fusion_dim + 1) ** 2, hidden_dim)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_dim, n_out)

    def forward(self, batch: BagBatch) -> MILOutput:
        t, m = self.tabular_inputs(batch)
        p, e, h = self.slide(batch)
        g = self.omics(torch.cat([t[:, self.cols], m[:, self.mods]], 1))
        o = m[:, self.mods].amax(1, keepdim=True) if len(self.mods) else m.new_zeros(len(p), 1)
        z = self._fuse(p, g, o)
        extra = {}
        if not self.training:  # a bag of instance i alone: p = h_i, with its patient's omics
            with torch.no_grad():
                idx = batch.batch
                extra["instance_logits"] = self.head(self._fuse(h, g[idx], o[idx])).float()
        return MILOutput(
            logits=self.head(self.drop(z)), embedding=z, scores=e.detach(), extra_scores=extra
        )

    def _fuse(self, p: Tensor, g: Tensor, o: Tensor) -> Tensor:
        if self.fusion == "concat":
            return torch.relu(self.fuse(torch.cat([p, o * g], 1)))
        pw, gw = p.to(self.gate_p.weight.dtype), g.to(self.gate_p.weight.dtype)  # no bf16 bilinear
        pt = torch.sigmoid(self.gate_p(pw, gw)) * torch.relu(self.proj_p(p))
        gt = o * torch.sigmoid(self.gate_g(pw, gw)) * torch.relu(self.proj_g(g))
        one = p.new_ones(len(p), 1)
        k = torch.cat([pt, one], 1).unsqueeze(2) * torch.cat([gt, one], 1).unsqueeze(1)
        return torch.relu(self.fuse(self.drop(k.flatten(1))))


@register("mcat")
class MCAT(TabularModel):
    r"""Genomic-guided co-attention (after MCAT, Chen et al. ICCV 2021): each feature group's
    token attends over the bag's instances.

    .. math::
        G_k = m_k \operatorname{SNN}_k(t_{G_k}) + (1 - m_k) e_k, \quad
        h_i = \mathrm{ReLU}(W_e x_i), \quad
        A_{ki} = \operatorname{softmax}_{i \in b}\Big(\frac{(W_q G_k)^\top (W_k h_i)}{\sqrt d}\Big),
        \quad \hat H_k = \sum_{i \in b} A_{ki} W_v h_i

    .. math::
        p = \text{TokenPool}(\hat H), \quad g = \text{TokenPool}(G;\ m_k), \quad
        z = \mathrm{ReLU}(W_z [p;\ g]), \quad \text{logits} = W_o z

    (``TokenPool``: gated attention over tokens, only the available groups for ``g``; a
    patient without any group has ``g = 0``, and its learned tokens ``e_k`` still query the
    slide). Instance scores are the co-attention logits averaged over the groups.
    """

    unused_parameters = True  # the learned missing-group tokens idle in a batch with every group

    def __init__(
        self,
        in_dim: int,
        n_out: int,
        tabular: list[dict[str, Any]] | None = None,
        modalities: list[str] | None = None,
        hidden_dim: int = FUSION_HIDDEN,
        dropout: float = 0.25,
        modality_dropout: float = FUSION_MODALITY_DROPOUT,
    ):
        super().__init__(in_dim, n_out, tabular, modalities, modality_dropout)
        self.tokens = GroupTokens(self, hidden_dim, dropout)
        self.encoder, _ = mlp_encoder(in_dim, hidden_dim, dropout)
        self.q, self.k, self.v = (nn.Linear(hidden_dim, hidden_dim) for _ in range(3))
        self.pool_path, self.pool_omics = (
            TokenPool(hidden_dim, dropout),
            TokenPool(hidden_dim, dropout),
        )
        self.fuse = nn.Linear(2 * hidden_dim, hidden_dim)
        self.head = nn.Linear(hidden_dim, n_out)

    def forward(self, batch: BagBatch) -> MILOutput:
        t, m = self.tabular_inputs(batch)
        g, mk = self.tokens(self, t, m)
        h = self.encoder(batch.x)
        s = bag_logits(self.k(h), self.q(g), batch.batch)  # [N, K]
        a = softmax(s, batch.batch, ptr=batch.ptr, num_nodes=batch.num_bags)
        vh = self.v(h)
        hh = pooled(vh, a, batch.batch, batch.num_bags)
        go = self.pool_omics(g, mk)
        z = torch.relu(self.fuse(torch.cat([self.pool_path(hh), go], 1)))
        extra = {}
        if (
            not self.training
        ):  # a bag of instance i alone: every group attends to it, so p = W_v h_i
            with torch.no_grad():
                zi = torch.relu(self.fuse(torch.cat([vh, go[batch.batch]], 1)))
                extra["instance_logits"] = self.head(zi).float()
        return MILOutput(
            logits=self.head(z), embedding=z, scores=s.mean(1).detach(), extra_scores=extra
        )


@register("survpath")
class SurvPath(TabularModel):
    r"""Cross-attention between feature-group (pathway) tokens and instances (after SurvPath,
    Jaume et al. CVPR 2024): one attention over the tokens ``[G; H]`` with the
    instance-to-instance block left out.

    .. math::
        G_k = m_k \operatorname{SNN}_k(t_{G_k}) + (1 - m_k) e_k, \quad h_i = \mathrm{ReLU}(W_e x_i),
        \quad q, \kappa, v = W_q\cdot, W_\kappa\cdot, W_v\cdot

    .. math::
        \hat G_k = \operatorname{softmax}_{j \in \{G\} \cup \{h_i\}_{i\in b}}
            \Big(\frac{q(G_k)^\top \kappa(j)}{\sqrt d}\Big)\, v(j), \quad
        \hat h_i = \operatorname{softmax}_{k}\Big(\frac{q(h_i)^\top \kappa(G_k)}{\sqrt d}\Big)\, v(G_k)

    .. math::
        z = [\tfrac1K \textstyle\sum_k \hat G_k;\ \tfrac{1}{N_b} \sum_{i \in b} \hat h_i], \quad
        \text{logits} = W_o\,\mathrm{ReLU}(W_z\, \mathrm{LayerNorm}(z))

    Instance scores are the group-to-instance logits averaged over the groups.
    """

    unused_parameters = True  # the learned missing-group tokens idle in a batch with every group

    def __init__(
        self,
        in_dim: int,
        n_out: int,
        tabular: list[dict[str, Any]] | None = None,
        modalities: list[str] | None = None,
        hidden_dim: int = FUSION_HIDDEN,
        dropout: float = 0.25,
        modality_dropout: float = FUSION_MODALITY_DROPOUT,
    ):
        super().__init__(in_dim, n_out, tabular, modalities, modality_dropout)
        self.tokens = GroupTokens(self, hidden_dim, dropout)
        self.encoder, _ = mlp_encoder(in_dim, hidden_dim, dropout)
        self.q, self.k, self.v = (nn.Linear(hidden_dim, hidden_dim) for _ in range(3))
        self.norm = nn.LayerNorm(2 * hidden_dim)
        self.fuse = nn.Linear(2 * hidden_dim, hidden_dim)
        self.head = nn.Linear(hidden_dim, n_out)

    def forward(self, batch: BagBatch) -> MILOutput:
        t, m = self.tabular_inputs(batch)
        g, _ = self.tokens(self, t, m)
        h = self.encoder(batch.x)
        nb, idx, d = batch.num_bags, batch.batch, g.shape[-1]
        qg, kg, vg = self.q(g), self.k(g), self.v(g)  # [B, K, d]
        qh, kh, vh = self.q(h), self.k(h), self.v(h)  # [N, d]
        s_gg = qg @ kg.transpose(1, 2) / math.sqrt(d)  # [B, K, K]
        s_gh = bag_logits(kh, qg, idx)  # [N, K]
        top = torch.maximum(s_gg.amax(-1), scatter(s_gh, idx, 0, nb, reduce="max")).detach()
        e_gg, e_gh = torch.exp(s_gg - top.unsqueeze(-1)), torch.exp(s_gh - top[idx])
        den = e_gg.sum(-1) + scatter(e_gh, idx, 0, nb, reduce="sum")  # [B, K]
        g_out = (e_gg @ vg + pooled(vh, e_gh, idx, nb)) / den.unsqueeze(-1)
        s_hg = bag_logits(qh, kg, idx)  # [N, K]: instance i's logits over its bag's tokens
        a_hg = torch.softmax(s_hg, -1)
        h_out = (a_hg.unsqueeze(-1) * vg[idx]).sum(1)  # [N, d]
        h_mean = scatter(h_out, idx, 0, nb, reduce="mean")
        z = torch.relu(self.fuse(self.norm(torch.cat([g_out.mean(1), h_mean], 1))))
        extra = {}
        if not self.training:  # a bag of instance i alone: the tokens attend to G and h_i only
            with torch.no_grad():
                top_i = torch.maximum(s_gg.amax(-1)[idx], s_gh)  # [N, K]
                e_ii, e_ih = torch.exp(s_gg[idx] - top_i.unsqueeze(-1)), torch.exp(s_gh - top_i)
                gi = (e_ii @ vg[idx] + e_ih.unsqueeze(-1) * vh.unsqueeze(1)) / (
                    e_ii.sum(-1) + e_ih
                ).unsqueeze(-1)
                zi = torch.relu(self.fuse(self.norm(torch.cat([gi.mean(1), h_out], 1))))
                extra["instance_logits"] = self.head(zi).float()
        return MILOutput(
            logits=self.head(z), embedding=z, scores=s_gh.mean(1).detach(), extra_scores=extra
        )
