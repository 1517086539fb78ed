"""Tasks: targets, heads' losses, predictions and metrics; one registry (``task.type``)."""

from __future__ import annotations

from mil.tasks import classification, multitarget, ordinal, regression, survival  # noqa: F401  (register the built-in tasks)
from mil.tasks.base import Task, TaskRun
from mil.tasks.classification import ClassificationTask
from mil.tasks.multitarget import MultiTargetTask
from mil.tasks.ordinal import OrdinalTask
from mil.tasks.registry import available, get, headline_metrics, make_task, register
from mil.tasks.regression import RegressionTask
from mil.tasks.survival import SurvivalTask

__all__ = [
    "Task",
    "TaskRun",
    "ClassificationTask",
    "MultiTargetTask",
    "OrdinalTask",
    "RegressionTask",
    "SurvivalTask",
    "available",
    "get",
    "headline_metrics",
    "make_task",
    "register",
]
