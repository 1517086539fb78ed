"""Survival losses: Cox partial likelihood and the discrete-time hazard NLL."""

from mil.losses.cox import CoxPHLoss, cox_batches, cox_ph_loss
from mil.losses.discrete import (
    DiscreteHazardNLL,
    assign_bins,
    discrete_hazard_nll,
    discrete_survival,
    discrete_time_bins,
)

__all__ = [
    "CoxPHLoss",
    "DiscreteHazardNLL",
    "assign_bins",
    "cox_batches",
    "cox_ph_loss",
    "discrete_hazard_nll",
    "discrete_survival",
    "discrete_time_bins",
]
