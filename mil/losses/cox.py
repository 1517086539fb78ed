"""Cox partial-likelihood loss over a batch's risk set, with Efron or Breslow ties, and loss
batches that each hold the two events a risk set needs."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from mil.errors import DataError

Ties = Literal["efron", "breslow"]


def cox_ph_loss(risk: Tensor, time: Tensor, event: Tensor, ties: Ties = "efron") -> Tensor:
    r"""Negative log Cox partial likelihood of a batch, averaged over its events.

    Args:
        risk: ``[B]`` (or ``[B, 1]``) log-hazard scores :math:`r_i`.
        time: ``[B]`` event or censoring times.
        event: ``[B]`` 1 (or True) where the event was observed, 0 where censored.
        ties: ``"efron"`` (default) or ``"breslow"`` handling of tied event times.

    Returns:
        A scalar in the dtype of ``risk``:

        .. math::
            -\frac{1}{n_\text{events}} \sum_{g} \Big[\sum_{i \in D_g} r_i
            - \sum_{l=0}^{d_g - 1} \log\Big(\sum_{j \in R_g} e^{r_j}
            - \tfrac{l}{d_g} \sum_{i \in D_g} e^{r_i}\Big)\Big]

        where :math:`g` runs over the distinct event times, :math:`D_g` holds
        the :math:`d_g` events at that time and :math:`R_g` everyone with
        ``time >= t_g``. Breslow drops the :math:`l / d_g` correction. The sum
        is divided by the number of events, not by the number of distinct
        event times, so the value is ``-log_likelihood / n_events`` of
        lifelines and scikit-survival. A batch without events returns a zero
        that still carries a (zero) gradient, so one such batch never breaks
        a training step; the runner should give every batch at least two
        events, since with fewer the loss carries no ranking signal.

    Cost is O(B log B): one sort by time and a cumulative log-sum-exp, no
    ``[B, B]`` matrix. Every term is kept in log space (the Efron correction as
    ``log R + log1p(-(l/d) D/R)`` with ``D <= R``), so scores of +-1e3 give a
    finite loss and finite gradients.
    """
    if ties not in ("efron", "breslow"):
        raise ValueError(f"ties must be 'efron' or 'breslow', got {ties!r}")
    if risk.dim() == 2 and risk.shape[1] == 1:
        risk = risk.squeeze(1)
    if risk.dim() != 1 or time.shape != risk.shape or event.shape != risk.shape:
        raise ValueError(
            "cox_ph_loss expects risk, time and event of shape [B]; got "
            f"{tuple(risk.shape)}, {tuple(time.shape)}, {tuple(event.shape)}"
        )
    is_event = event != 0
    n_events = int(is_event.sum())
    if n_events == 0:
        return risk.sum() * 0

    # Latest times first: everyone at or before position i (up to the end of
    # i's tie group) is still at risk at time_i, so the risk-set sums are a
    # cumulative log-sum-exp read at the last member of each tie group.
    order = torch.argsort(time, descending=True, stable=True)
    r = risk[order]
    is_event = is_event[order]
    _, group, group_size = torch.unique_consecutive(
        time[order], return_inverse=True, return_counts=True
    )
    group_last = torch.cumsum(group_size, 0) - 1
    log_risk_set = torch.logcumsumexp(r, 0)[group_last]

    r_event = r[is_event]
    log_denominator = log_risk_set[group[is_event]]
    if ties == "efron":
        log_denominator = log_denominator + _efron_correction(
            r_event, group[is_event], log_denominator
        )
    return -(r_event - log_denominator).sum() / n_events


def _efron_correction(r_event: Tensor, event_group: Tensor, log_risk_set: Tensor) -> Tensor:
    """``log(1 - (l/d) D/R)`` for each event: its rank ``l`` among the ``d`` tied events.

    ``event_group`` is sorted (events come in time order), so tie groups are
    runs of equal values.
    """
    _, tie, n_tied = torch.unique_consecutive(event_group, return_inverse=True, return_counts=True)
    first = torch.cumsum(n_tied, 0) - n_tied
    rank = torch.arange(len(tie), device=tie.device) - first[tie]
    # log-sum-exp of the tied events' scores, shifted by each group's maximum;
    # only groups that hold events exist here, so no log(0) enters the graph.
    shift = torch.full(
        (len(n_tied),), float("-inf"), dtype=r_event.dtype, device=r_event.device
    ).scatter_reduce(0, tie, r_event.detach(), reduce="amax")
    tied_sum = torch.zeros_like(shift).index_add(0, tie, torch.exp(r_event - shift[tie]))
    log_tied = torch.log(tied_sum) + shift
    # D <= R in exact arithmetic; the clamp only absorbs round-off.
    ratio = torch.exp(log_tied[tie] - log_risk_set).clamp(max=1.0)
    fraction = rank.to(r_event.dtype) / n_tied[tie].to(r_event.dtype)
    return torch.log1p(-fraction * ratio)


class CoxPHLoss(nn.Module):
    """Module form of :func:`cox_ph_loss`: ``forward(risk [B], time [B], event [B]) -> scalar``."""

    def __init__(self, ties: Ties = "efron"):
        super().__init__()
        if ties not in ("efron", "breslow"):
            raise ValueError(f"ties must be 'efron' or 'breslow', got {ties!r}")
        self.ties = ties

    def forward(self, risk: Tensor, time: Tensor, event: Tensor) -> Tensor:
        return cox_ph_loss(risk, time, event, ties=self.ties)

    def extra_repr(self) -> str:
        return f"ties={self.ties!r}"


def cox_batches(
    event: np.ndarray, batch_size: int, rng: np.random.Generator, where: str = "this fold"
) -> list[np.ndarray]:
    """Loss batches (row positions) of one epoch, each with at least two events.

    ``ceil(n / batch_size)`` batches, or fewer (and then larger than
    ``batch_size``) when there are fewer than two events per batch. Events and
    censored rows are shuffled separately and dealt out evenly, so batch sizes
    differ by at most one and the events are spread across batches.

    Raises:
        DataError: fewer than two events in total.
    """
    event = np.asarray(event).astype(bool)
    n_events = int(event.sum())
    if n_events < 2:
        raise DataError(
            f"{where}: the training bags hold {n_events} event(s); every Cox loss batch needs "
            f"at least 2. Use fewer folds, more patients, or task.loss: nll"
        )
    n_batches = max(1, min(math.ceil(len(event) / max(batch_size, 1)), n_events // 2))
    events = np.array_split(rng.permutation(np.flatnonzero(event)), n_batches)
    # array_split puts the larger parts first: reversing one side balances the sums
    censored = np.array_split(rng.permutation(np.flatnonzero(~event)), n_batches)[::-1]
    batches = [rng.permutation(np.concatenate([e, c])) for e, c in zip(events, censored)]
    return [batches[i] for i in rng.permutation(n_batches)]
