"""Losses: Cox partial likelihood and the discrete-time hazard NLL (survival); the focal loss and
SC-MIL's supervised contrastive loss (classification)."""

from mil.losses.cox import CoxPHLoss, cox_batches, cox_ph_loss
from mil.losses.discrete import (
    DiscreteHazardNLL,
    assign_bins,
    discrete_hazard_nll,
    discrete_survival,
    discrete_time_bins,
)
from mil.losses.focal import focal_loss
from mil.losses.supcon import ProjectionHead, SupCon, supcon_loss

__all__ = [
    "CoxPHLoss",
    "DiscreteHazardNLL",
    "ProjectionHead",
    "SupCon",
    "assign_bins",
    "cox_batches",
    "cox_ph_loss",
    "discrete_hazard_nll",
    "discrete_survival",
    "discrete_time_bins",
    "focal_loss",
    "supcon_loss",
]
