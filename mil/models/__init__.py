"""Aggregators: every model is registered by name; build them with :func:`create`."""

from mil.models import additive, attention, baselines, fusion, graph, linear, transformer  # noqa: F401  (register the models)
from mil.models.base import MILModel, MILOutput
from mil.models.registry import available, create, get, hyperparameters, register

__all__ = ["MILModel", "MILOutput", "available", "create", "get", "hyperparameters", "register"]
