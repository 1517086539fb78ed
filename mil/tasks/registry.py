"""One registry of tasks: ``task.type`` -> :class:`~mil.tasks.base.Task` subclass.

A new task is one module that defines a ``Task`` subclass under
``@register("name")``; the config accepts ``task.type: name`` once the module
is imported, and the runner, summary, report, comparison and ``mil.Run`` use
it through the hooks ``Task`` declares.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from mil.errors import ConfigError
from mil.schema import Config
from mil.tasks.base import Task

_REGISTRY: dict[str, type[Task]] = {}

T = TypeVar("T", bound=type[Task])


def register(name: str) -> Callable[[T], T]:
    """Class decorator adding a task to the registry under ``name`` (its ``task.type``)."""

    def deco(cls: T) -> T:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"task type {name!r} is registered twice")
        if cls.target_kind not in ("label", "survival"):
            raise ValueError(f"task {name!r}: target_kind must be 'label' or 'survival'")
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return deco


def available() -> list[str]:
    """Registered task types, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> type[Task]:
    if name not in _REGISTRY:
        raise ConfigError(f"task.type: unknown task {name!r}; available tasks: {', '.join(available())}")
    return _REGISTRY[name]


def make_task(cfg: Config, classes: list[str]) -> Task:
    """The task named by ``cfg.task.type``, for a cohort with ``classes`` (classification)."""
    return get(cfg.task.type)(cfg, classes)
