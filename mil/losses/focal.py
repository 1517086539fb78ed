"""The focal loss (Lin et al., ICCV 2017) over softmax class probabilities."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def focal_loss(
    logits: Tensor, target: Tensor, gamma: float = 2.0, weight: Tensor | None = None
) -> Tensor:
    r"""Mean focal loss of class logits ``[B, C]`` against class indices ``[B]``.

    .. math:: \mathrm{FL} = \frac{\sum_i w_{y_i} (1 - p_{i,y_i})^\gamma (-\log p_{i,y_i})}
              {\sum_i w_{y_i}}

    with ``p`` the softmax probabilities and ``w`` the class weights (1 without). The
    weighted mean is cross-entropy's (``F.cross_entropy(weight=w)``), so ``gamma = 0`` is
    exactly the (weighted) cross-entropy. For two classes, ``p_{i,1}`` is the sigmoid of the
    logit difference: the loss is torchvision's ``sigmoid_focal_loss`` on that difference
    (without its ``alpha``; class weights play that part).
    """
    logp = F.log_softmax(logits.float(), dim=1).gather(1, target.long().unsqueeze(1)).squeeze(1)
    # (1 - p)^gamma with p = exp(logp); -expm1 keeps 1 - p exact for p near 1
    modulating = (-torch.expm1(logp)).clamp_min(0.0).pow(gamma) if gamma else 1.0
    w = torch.ones_like(logp) if weight is None else weight.to(logp)[target.long()]
    return (w * modulating * -logp).sum() / w.sum()
