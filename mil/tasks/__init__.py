"""Tasks: classification and survival heads, losses, predictions and metrics."""

from __future__ import annotations

from mil.config import Config
from mil.tasks.base import Task
from mil.tasks.classification import ClassificationTask


def make_task(cfg: Config, classes: list[str]) -> Task:
    """The task named by ``cfg.task.type``."""
    if cfg.task.type == "classification":
        return ClassificationTask(cfg, classes)
    from mil.tasks.survival import SurvivalTask

    return SurvivalTask(cfg, classes)


__all__ = ["Task", "ClassificationTask", "make_task"]
