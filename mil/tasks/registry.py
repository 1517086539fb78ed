"""One registry of tasks: ``task.type`` -> :class:`~mil.tasks.base.Task` subclass.

A new task is one module that defines a ``Task`` subclass under
``@register("name")``; the config accepts ``task.type: name`` once the module
is imported, and the runner, summary, report, comparison and ``mil.Run`` use
it through the hooks ``Task`` declares.
"""

from __future__ import annotations

from mil.registry import Registry
from mil.schema import Config
from mil.tasks.base import Task


def _named(name: str, cls: type[Task]) -> None:
    if cls.target_kind not in ("label", "survival"):
        raise ValueError(f"task {name!r}: target_kind must be 'label' or 'survival'")
    cls.name = name


_TASKS: Registry[type[Task]] = Registry("task", "task.type", _named)
#: class decorator adding a task to the registry under ``name`` (its ``task.type``)
register = _TASKS.register
#: registered task types, sorted
available = _TASKS.available
get = _TASKS.get


def headline_metrics(task_type: str) -> tuple[str, ...]:
    """The metrics that compare runs of ``task_type``, headline first; none for a task this
    mil does not know (a run folder written by a plugin that is not imported)."""
    return _TASKS.get(task_type).headline_metrics if task_type in _TASKS.available() else ()


def make_task(cfg: Config, classes: list[str]) -> Task:
    """The task named by ``cfg.task.type``, for a cohort with ``classes`` (classification)."""
    return get(cfg.task.type)(cfg, classes)
