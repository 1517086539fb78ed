"""Discrete-time hazard NLL with censoring (Patch-GCN / MCAT), its time bins and survival."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mil.errors import DataError


def discrete_hazard_nll(
    logits: Tensor, bin_index: Tensor, event: Tensor, alpha: float = 0.0, eps: float = 1e-7
) -> Tensor:
    r"""Negative log-likelihood of a discrete-time hazard model, mean over the batch.

    Args:
        logits: ``[B, K]`` hazard logits, :math:`h_k = \sigma(\text{logit}_k)`.
        bin_index: ``[B]`` integer bin ``y`` in ``0..K-1`` of each time
            (see :func:`assign_bins`).
        event: ``[B]`` 1 where the event was observed, 0 where censored.
        alpha: weight moved from the full NLL onto the uncensored term only.
        eps: probability floor: every ``log p`` is taken as ``log(max(p, eps))``
            as in Patch-GCN, which caps one patient's loss at ``-log(eps)``
            per term; ``eps=0`` gives the exact log-likelihood.

    With :math:`S_k = \prod_{j \le k} (1 - h_j)`, :math:`S_{-1} = 1` and
    :math:`c = 1 - \text{event}`:

    .. math::
        L_\text{unc} = -(1 - c)\,(\log S_{y-1} + \log h_y), \quad
        L_\text{cens} = -c \log S_y, \quad
        L = (1 - \alpha)(L_\text{cens} + L_\text{unc}) + \alpha L_\text{unc}

    ``log h`` and ``log(1 - h)`` are log-sigmoids and ``log S`` their
    cumulative sums, never ``log(cumprod(1 - sigmoid))``, so logits of +-1e4
    give finite values and gradients.
    """
    if logits.dim() != 2 or bin_index.shape != logits.shape[:1] or event.shape != logits.shape[:1]:
        raise ValueError(
            "discrete_hazard_nll expects logits [B, K], bin_index [B], event [B]; got "
            f"{tuple(logits.shape)}, {tuple(bin_index.shape)}, {tuple(event.shape)}"
        )
    n_bins = logits.shape[1]
    y = bin_index.long().unsqueeze(1)
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= n_bins):
        raise ValueError(
            f"bin_index must lie in 0..{n_bins - 1}, got {int(y.min())}..{int(y.max())}"
        )

    log_hazard = F.logsigmoid(logits)
    log_survival = F.pad(torch.cumsum(F.logsigmoid(-logits), 1), (1, 0))  # [B, K + 1], S_-1 = 1
    log_s_before = log_survival.gather(1, y).squeeze(1)
    log_h_at = log_hazard.gather(1, y).squeeze(1)
    log_s_after = log_survival.gather(1, y + 1).squeeze(1)
    if eps > 0:
        floor = math.log(eps)
        log_s_before, log_h_at, log_s_after = (
            t.clamp(min=floor) for t in (log_s_before, log_h_at, log_s_after)
        )

    censored = 1 - event.to(logits.dtype)
    uncensored_loss = -(1 - censored) * (log_s_before + log_h_at)
    censored_loss = -censored * log_s_after
    loss = (1 - alpha) * (censored_loss + uncensored_loss) + alpha * uncensored_loss
    return loss.mean()


def discrete_survival(logits: Tensor) -> dict[str, Tensor]:
    """Hazards, survival and a risk score from hazard logits.

    Args:
        logits: ``[B, K]`` hazard logits.

    Returns:
        ``hazards [B, K]`` (sigmoid), ``survival [B, K]`` (``S_k``, the
        probability of outliving bin ``k``), and ``risk [B] = -sum_k S_k``
        (minus the expected number of bins survived: higher = worse, as in
        Patch-GCN), ready for a concordance index.
    """
    survival = torch.exp(torch.cumsum(F.logsigmoid(-logits), 1))
    return {"hazards": torch.sigmoid(logits), "survival": survival, "risk": -survival.sum(1)}


def discrete_time_bins(
    train_times: np.ndarray, train_events: np.ndarray, n_bins: int = 4
) -> np.ndarray:
    """Bin edges ``[n_bins + 1]`` from quantiles of the training fold's uncensored times.

    Inner edges are the ``1/n_bins, ..., (n_bins-1)/n_bins`` quantiles of the
    observed event times (censored times are ignored, as in Patch-GCN); the
    outer edges are 0 and ``+inf`` so every non-negative time falls in a bin.
    Bins are half-open ``[edge_k, edge_k+1)``. Use training times only: bins
    from the whole cohort leak the test fold's times.
    """
    times, events = _check_times_events(train_times, train_events, "train")
    if n_bins < 1:
        raise DataError(f"n_bins must be at least 1, got {n_bins}")
    observed = times[events]
    inner = np.quantile(observed, np.linspace(0, 1, n_bins + 1)[1:-1])
    edges = np.concatenate([[0.0], inner, [np.inf]])
    if np.any(np.diff(edges) <= 0):
        raise DataError(
            f"cannot cut {len(observed)} training event times into {n_bins} bins with distinct "
            f"edges (quantiles {inner.tolist()}); use fewer bins"
        )
    return edges


def assign_bins(times: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index ``[n]`` (int64) of each time: ``k`` such that ``edges[k] <= t < edges[k + 1]``."""
    times = np.asarray(times, dtype=float)
    edges = np.asarray(edges, dtype=float)
    if np.isnan(times).any() or (times < edges[0]).any():
        raise DataError(f"times must be non-NaN and at least the first bin edge {edges[0]}")
    return (
        (np.searchsorted(edges, times, side="right") - 1).clip(0, len(edges) - 2).astype(np.int64)
    )


def _check_times_events(
    times: np.ndarray, events: np.ndarray, name: str
) -> tuple[np.ndarray, np.ndarray]:
    times = np.asarray(times, dtype=float).ravel()
    events = np.asarray(events).ravel()
    if len(times) != len(events):
        raise DataError(f"{name} times ({len(times)}) and events ({len(events)}) differ in length")
    if not np.isfinite(times).all() or (times < 0).any():
        raise DataError(f"{name} times must be finite and non-negative")
    if not np.isin(events, (0, 1)).all():
        raise DataError(f"{name} events must be 0 (censored) or 1 (observed)")
    events = events.astype(bool)
    if not events.any():
        raise DataError(f"{name} fold has no observed events; cannot place time bins")
    return times, events


class DiscreteHazardNLL(nn.Module):
    """Module form of :func:`discrete_hazard_nll`: ``forward(logits [B, K], bin_index [B], event [B])``."""

    def __init__(self, alpha: float = 0.0, eps: float = 1e-7):
        super().__init__()
        self.alpha = alpha
        self.eps = eps

    def forward(self, logits: Tensor, bin_index: Tensor, event: Tensor) -> Tensor:
        return discrete_hazard_nll(logits, bin_index, event, alpha=self.alpha, eps=self.eps)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, eps={self.eps}"
