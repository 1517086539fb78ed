"""One registry of tasks: ``task.type`` -> :class:`~mil.tasks.base.Task` subclass.

A new task is one module that defines a ``Task`` subclass under
``@register("name")``; the config accepts ``task.type: name`` (and the task's own
``Options``) once the module is imported, and the runner, summary, report, comparison
and ``mil.Run`` use it through the hooks ``Task`` declares.
"""

from __future__ import annotations

import dataclasses

from mil.registry import Registry
from mil.schema import Config
from mil.tasks.base import Task, TaskRun


def _named(name: str, cls: type[Task]) -> None:
    if not dataclasses.is_dataclass(cls.Options):
        raise ValueError(f"task {name!r}: Options must be a dataclass (the task's own task: keys)")
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


def task_run(cfg: Config) -> TaskRun:
    """What a task of ``cfg`` knows of its run: its name, the config file, the bag level, each
    target's cohort column and whether the folds have a validation split."""
    reader = cfg.task.targets
    columns = {} if reader is None else dict(zip(reader.columns, reader.source_columns(cfg.data)))
    return TaskRun(
        name=cfg.name,
        source=cfg.source,
        bag_level=cfg.data.bag_level,
        columns=columns,
        validated=cfg.splits.val_fraction > 0,
    )


def make_task(cfg: Config, classes: list[str]) -> Task:
    """The task named by ``cfg.task.type`` with its own options (``cfg.task.options``), for a
    cohort with ``classes`` (a task with classes)."""
    cls = get(cfg.task.type)
    options = cfg.task.options if isinstance(cfg.task.options, cls.Options) else cls.Options()
    return cls(options, classes, task_run(cfg))
