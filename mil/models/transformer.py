"""Transformer aggregators: a pre-norm CLS transformer and TransMIL (Nyström attention + PPEG)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.utils import to_dense_batch

from mil.data.batch import BagBatch
from mil.models.base import MILModel, MILOutput, linear_head_scores
from mil.models.registry import register


class PreNormBlock(nn.Module):
    r"""One pre-norm transformer layer over padded bags ``[B, L, dim]``.

    :math:`x \leftarrow x + \mathrm{MHA}(\mathrm{LN}(x))`,
    :math:`x \leftarrow x + \mathrm{MLP}(\mathrm{LN}(x))`, with attention
    restricted to each bag's real tokens by a key-padding mask.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )
        self.drop = nn.Dropout(dropout)

    def _split(self, t: Tensor) -> Tensor:
        b, n, d = t.shape
        return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """``x [B, L, dim]``, ``mask [B, L]`` (True = real token)."""
        q, k, v = map(self._split, self.qkv(self.norm1(x)).chunk(3, -1))
        o = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask[:, None, None, :],
            dropout_p=self.dropout if self.training else 0.0,
        )
        x = x + self.drop(self.proj(o.transpose(1, 2).flatten(2)))
        return x + self.drop(self.mlp(self.norm2(x)))

    def forward_cls(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        r"""The same layer for the CLS query (position 0) only: returns the updated
        CLS token ``[B, dim]`` and its attention weights ``[B, heads, L]``.

        Only the CLS output feeds the head, so the last layer computes one query
        row explicitly, :math:`a = \mathrm{softmax}(q_{cls} K^\top / \sqrt{d})`, O(L).
        """
        q, k, v = map(self._split, self.qkv(self.norm1(x)).chunk(3, -1))
        s = (q[:, :, :1] @ k.transpose(-1, -2)).squeeze(2) / math.sqrt(q.shape[-1])
        a = s.masked_fill(~mask[:, None, :], float("-inf")).softmax(-1)
        o = (F.dropout(a, self.dropout, self.training).unsqueeze(2) @ v).squeeze(2)
        cls = x[:, 0] + self.drop(self.proj(o.flatten(1)))
        return cls + self.drop(self.mlp(self.norm2(cls))), a


@register("transformer")
class TransformerMIL(MILModel):
    r"""CLS-token transformer over each bag (pre-norm, Xiong et al. 2020).

    .. math::
        T^{(0)} = [c;\ W x_1;\ \dots;\ W x_N], \quad
        T^{(l)} = \mathrm{Block}_l(T^{(l-1)}), \quad
        z_b = \mathrm{LN}(T^{(L)}_0), \quad \text{logits} = U z_b

    Bags are padded with ``to_dense_batch`` and attention masks padded keys,
    so a bag's output depends on its own instances only. Instance scores are
    the last layer's CLS-to-instance attention weights, averaged over heads
    (they sum to at most 1 per bag; the CLS token takes the rest). ``extra_scores``:
    ``instance_logits``, the head on each instance token as the last block reads it
    (normalised as the CLS token is), and ``attention_x_logit``, that logit less the
    bias times the instance's attention weight (an approximation: the model is not
    additive).

    Long bags: in training mode a bag longer than ``max_instances_train`` is
    replaced by a uniform random subset of that many instances (drawn afresh
    every forward, without replacement); unsampled instances get score 0. At
    eval the full bag is used: attention costs :math:`O(N^2)` time per head, while
    PyTorch's fused attention keeps memory :math:`O(N)`.
    """

    def __init__(
        self,
        in_dim: int,
        n_out: int,
        dim: int = 256,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.1,
        max_instances_train: int | None = 4096,
    ):
        super().__init__(in_dim, n_out)
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.max_instances_train = max_instances_train
        self.proj = nn.Linear(in_dim, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(
            PreNormBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_out)
        nn.init.normal_(self.cls, std=0.02)

    def _subsample(self, batch: BagBatch) -> Tensor | None:
        """Rows kept when training on bags longer than ``max_instances_train``, else None."""
        cap = self.max_instances_train
        sizes = batch.sizes.tolist()
        if not self.training or cap is None or max(sizes) <= cap:
            return None
        keep = []
        for lo, n in zip(batch.ptr.tolist(), sizes):
            rows = torch.arange(lo, lo + n, device=batch.x.device)
            if n > cap:
                rows = rows[torch.randperm(n, device=rows.device)[:cap].sort().values]
            keep.append(rows)
        return torch.cat(keep)

    def forward(self, batch: BagBatch) -> MILOutput:
        keep = self._subsample(batch)
        x, index = batch.x, batch.batch
        if keep is not None:
            x, index = x[keep], index[keep]
        h, mask = to_dense_batch(self.proj(x), index, batch_size=batch.num_bags)
        b = h.shape[0]
        h = torch.cat([self.cls.expand(b, -1, -1), h], 1)
        mask = torch.cat([mask.new_ones(b, 1), mask], 1)
        for block in self.blocks[:-1]:
            h = block(h, mask)
        cls, attn = self.blocks[-1].forward_cls(h, mask)
        z = self.norm(cls)
        with torch.no_grad():
            per_instance = attn.mean(1)[:, 1:][mask[:, 1:]]
            tokens = self.norm(h[:, 1:][mask[:, 1:]].detach())
            extra = linear_head_scores(tokens, per_instance, self.head.weight, self.head.bias)
            extra["attention_x_logit"] = extra.pop("contribution")
            if keep is None:
                scores = per_instance
            else:
                scores = per_instance.new_zeros(batch.x.shape[0])
                scores[keep] = per_instance
                for kind, v in extra.items():
                    extra[kind] = v.new_zeros(batch.x.shape[0], v.shape[1]).index_copy_(0, keep, v)
        return MILOutput(logits=self.head(z), embedding=z, scores=scores, extra_scores=extra)


def _moore_penrose_pinv(a: Tensor, iters: int) -> Tensor:
    r"""Iterative Moore–Penrose pseudo-inverse of ``a [..., m, m]`` (Razavi et al. 2014),
    as in Nyströmformer: :math:`Z_0 = A^\top / (\|A\|_1 \|A\|_\infty)`,
    :math:`Z \leftarrow \tfrac14 Z (13 I - A Z (15 I - A Z (7 I - A Z)))`."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    norm1 = a.abs().sum(-2).amax(-1, keepdim=True)
    norm_inf = a.abs().sum(-1).amax(-1, keepdim=True)
    z = a.transpose(-1, -2) / (norm1 * norm_inf).unsqueeze(-1)
    for _ in range(iters):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def _attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    r""":math:`\mathrm{softmax}(q k^\top) v` for ``[h, *, d]`` inputs, without materialising
    the weights (fused scaled-dot-product attention, unit scale)."""
    return F.scaled_dot_product_attention(q[None], k[None], v[None], scale=1.0)[0]


class NystromAttention(nn.Module):
    r"""Nyström self-attention of one sequence ``[L, dim]`` (Xiong et al. 2021).

    With landmarks :math:`\tilde Q, \tilde K` (means of ``m`` contiguous segments
    of the sequence),

    .. math::
        \mathrm{out} = \mathrm{softmax}(Q\tilde K^\top)\,
        \mathrm{pinv}\big(\mathrm{softmax}(\tilde Q\tilde K^\top)\big)\,
        \mathrm{softmax}(\tilde Q K^\top)\, V + \mathrm{DWConv}(V)

    per head (:math:`Q` pre-scaled by :math:`1/\sqrt{d}`), with a depthwise
    residual convolution over the sequence on the values. Cost O(L m) per
    head; the two long products run as fused attention, so memory is O(L d),
    not O(L m). Segments split the real sequence into ``min(m, L)``
    near-equal parts, so no padding enters the landmarks (reference
    implementations zero-pad the front of the sequence to a multiple of ``m``).
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        num_landmarks: int = 256,
        pinv_iterations: int = 6,
        residual_kernel: int = 33,
        dropout: float = 0.1,
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.num_landmarks = num_landmarks
        self.pinv_iterations = pinv_iterations
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        self.res_conv = nn.Conv2d(
            heads,
            heads,
            (residual_kernel, 1),
            padding=(residual_kernel // 2, 0),
            groups=heads,
            bias=False,
        )

    def _landmarks(self, t: Tensor) -> Tensor:
        """Segment means of ``t [h, L, d]`` over ``min(m, L)`` contiguous segments."""
        n = t.shape[1]
        m = min(self.num_landmarks, n)
        if n % m == 0:
            return t.reshape(t.shape[0], m, n // m, t.shape[2]).mean(2)
        seg = torch.arange(n, device=t.device) * m // n
        count = torch.bincount(seg, minlength=m).to(t.dtype)
        sums = t.new_zeros(t.shape[0], m, t.shape[2]).index_add_(1, seg, t)
        return sums / count[None, :, None]

    def forward(self, x: Tensor, cls_only: bool = False) -> tuple[Tensor, Tensor | None]:
        """``x [L, dim]`` -> (``[L, dim]``, None).

        With ``cls_only`` only token 0's output is computed, ``[1, dim]``,
        together with the exact softmax attention of token 0 to all tokens,
        ``[heads, L]`` (detached).
        """
        n, dim = x.shape
        q, k, v = (t.view(n, self.heads, -1).transpose(0, 1) for t in self.qkv(x).chunk(3, -1))
        q = q * self.scale
        q_l, k_l = self._landmarks(q), self._landmarks(k)
        kernel2 = (q_l @ k_l.transpose(-1, -2)).softmax(-1)
        # softmax(A) @ B products over the long axis as fused attention calls, which
        # never hold the [h, L, m] kernels (q is already scaled, hence scale=1).
        context = _moore_penrose_pinv(kernel2, self.pinv_iterations) @ _attend(q_l, k, v)
        attn = None
        if cls_only:
            q, v = q[:, :1], v[:, : self.res_conv.padding[0] + 1]
            with torch.no_grad():
                attn = (q @ k.transpose(-1, -2)).squeeze(1).softmax(-1)
        out = _attend(q, k_l, context)
        out = out + self.res_conv(v.unsqueeze(0)).squeeze(0)[:, : out.shape[1]]
        out = self.out(out.transpose(0, 1).reshape(out.shape[1], dim))
        return out, attn


class PPEG(nn.Module):
    r"""Pyramid position encoding generator (Shao et al. 2021).

    The instance tokens (CLS excluded) are laid row-major on an ``s x s`` grid,
    and :math:`T \leftarrow T + \mathrm{DW}_7(T) + \mathrm{DW}_5(T) + \mathrm{DW}_3(T)`
    (depthwise 2-D convolutions, same padding), then the CLS token is re-attached.
    The three convolutions run as one 7x7 depthwise convolution whose kernel is
    the sum of the three (zero-padded to 7x7): the same map, a third of the work.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3)
        )

    def forward(self, x: Tensor, side: int) -> Tensor:
        """``x [1 + side^2, dim]`` -> same shape."""
        cls, tokens = x[:1], x[1:]
        size = self.convs[0].kernel_size[0]
        weight = sum(F.pad(c.weight, [(size - c.kernel_size[0]) // 2] * 4) for c in self.convs)
        bias = sum(c.bias for c in self.convs)
        # [s*s, dim] row-major is the channels-last layout of a [1, dim, s, s] image.
        grid = tokens.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        out = grid + F.conv2d(grid, weight, bias, padding=size // 2, groups=grid.shape[1])
        return torch.cat([cls, out.permute(0, 2, 3, 1).reshape(side * side, -1)], 0)


@register("transmil")
class TransMIL(MILModel):
    r"""TransMIL (Shao et al., NeurIPS 2021): correlated MIL with Nyström attention and PPEG.

    .. math::
        H = [c;\ \mathrm{ReLU}(W x_1);\ \dots;\ \mathrm{ReLU}(W x_N);\ \text{wrap}],\quad
        H \leftarrow H + \mathrm{Nys}(\mathrm{LN}(H)),\quad H \leftarrow \mathrm{PPEG}(H),\quad
        H \leftarrow H + \mathrm{Nys}(\mathrm{LN}(H)),\quad
        z_b = \mathrm{LN}(H)_0,\quad \text{logits} = U z_b

    A bag of N instances is padded to ``s^2`` tokens, ``s = ceil(sqrt(N))``, by
    repeating its first instances (wrap-around), so PPEG can see it as an
    ``s x s`` grid. Bags are processed one at a time, so each bag's output
    depends on its own instances only; the repeated tokens stay in the
    sequence through the second layer, as in the paper.

    Not permutation invariant: PPEG's convolutions see instance order, by
    design (the model treats the bag as a sequence). Instance scores: the
    exact softmax attention of the CLS query to each instance in the last
    layer, averaged over heads, with the weights of wrap-around copies added
    to their originals. ``extra_scores``: ``instance_logits``, the head on each
    instance's token after the PPEG (normalised as the CLS token is), and
    ``attention_x_logit``, that logit less the bias times its attention weight
    (an approximation: the model is not additive).
    """

    permutation_invariant = False

    def __init__(
        self,
        in_dim: int,
        n_out: int,
        dim: int = 256,
        heads: int = 8,
        num_landmarks: int = 256,
        pinv_iterations: int = 6,
        dropout: float = 0.1,
    ):
        super().__init__(in_dim, n_out)
        self.fc = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        self.cls = nn.Parameter(torch.randn(1, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = NystromAttention(dim, heads, num_landmarks, pinv_iterations, dropout=dropout)
        self.ppeg = PPEG(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = NystromAttention(dim, heads, num_landmarks, pinv_iterations, dropout=dropout)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_out)

    def _bag(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One bag's projected instances ``[N, dim]`` -> (CLS embedding ``[dim]``, scores ``[N]``,
        the instances' tokens after the PPEG ``[N, dim]``)."""
        n = h.shape[0]
        side = math.isqrt(n - 1) + 1  # ceil(sqrt(n)), exact for any n >= 1
        wrap = torch.arange(side * side, device=h.device) % n
        t = torch.cat([self.cls, h[wrap]], 0)
        t = t + self.attn1(self.norm1(t))[0]
        t = self.ppeg(t, side)
        # Only the CLS token feeds the head, so the last layer computes its row alone.
        out, attn = self.attn2(self.norm2(t), cls_only=True)
        cls = t[0] + out[0]
        weights = attn.mean(0)[1:]
        scores = weights.new_zeros(n).index_add_(0, wrap, weights)
        return self.norm(cls), scores, t[1 : n + 1]

    def forward(self, batch: BagBatch) -> MILOutput:
        h = self.fc(batch.x)
        ptr = batch.ptr.tolist()
        bags = [self._bag(h[ptr[i] : ptr[i + 1]]) for i in range(batch.num_bags)]
        z, scores, tokens = (list(parts) for parts in zip(*bags))
        z, scores = torch.stack(z), torch.cat(scores)
        with torch.no_grad():
            tokens = self.norm(torch.cat(tokens).detach())
            extra = linear_head_scores(tokens, scores, self.head.weight, self.head.bias)
        extra["attention_x_logit"] = extra.pop("contribution")
        return MILOutput(logits=self.head(z), embedding=z, scores=scores, extra_scores=extra)
