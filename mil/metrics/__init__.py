"""Metrics: thin wrappers over scikit-learn / scikit-survival, and bootstrap CIs."""

from mil.metrics.bootstrap import (
    bootstrap_ci,
    bootstrap_samples,
    paired_difference,
    unpaired_difference,
)
from mil.metrics.classification import classification_metrics, confusion

__all__ = [
    "bootstrap_ci",
    "bootstrap_samples",
    "classification_metrics",
    "confusion",
    "paired_difference",
    "unpaired_difference",
]
