"""Metrics: thin wrappers over scikit-learn / scikit-survival, and bootstrap CIs."""

from mil.metrics.bootstrap import bootstrap_ci
from mil.metrics.classification import classification_metrics, confusion

__all__ = ["bootstrap_ci", "classification_metrics", "confusion"]
