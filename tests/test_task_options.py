"""A task's own ``task:`` keys (its ``Options``): typed and checked like a config section,
another task's keys ignored with a warning, and each built-in task's table in docs/config.md
naming exactly its keys, with their defaults and choices."""

from __future__ import annotations

import dataclasses
import typing
import warnings

import pytest
import yaml

from mil.config import config_from_dict, warn_ignored
from mil.errors import ConfigError, MilWarning
from mil.tasks import available, get, make_task
from tests.test_config_reference import rows_of, unquote, words

BASE = {"data": {"csv": "x.csv", "features": "f"}}


@pytest.mark.parametrize(
    "name", ["classification", "survival", "regression", "ordinal", "multitarget"]
)
def test_each_tasks_keys_are_documented(name):
    options = get(name).Options
    rows = rows_of(f"key (`{name}`)")
    fields = {f.name: f for f in dataclasses.fields(options)}
    assert {k.removeprefix("task.") for k in rows} == set(fields)
    hints = typing.get_type_hints(options)
    for key, row in rows.items():
        f = fields[key.removeprefix("task.")]
        assert yaml.safe_load(unquote(row[2])) == f.default, key
        for word in words(hints[f.name]):
            assert word in row[1], f"{key}: the type cell {row[1]!r} does not name {word}"
        assert row[3], key


def test_options_are_typed_checked_and_saved():
    cfg = config_from_dict({**BASE, "task": {"type": "survival", "loss": "nll", "bins": 3}})
    assert cfg.task.options == get("survival").Options(loss="nll", bins=3)
    assert make_task(cfg, []).n_out == 3
    assert cfg.to_dict()["task"] == {
        "type": "survival",
        "loss": "nll",
        "ties": "efron",
        "bins": 3,
        "bins_from": "fold",
        "alpha": 0.0,
    }
    with pytest.raises(ConfigError, match=r"task.bins = 'x'; expected int"):
        config_from_dict({**BASE, "task": {"type": "survival", "bins": "x"}})
    with pytest.raises(ConfigError, match="task.bins must be at least 2"):
        config_from_dict({**BASE, "task": {"type": "survival", "bins": 1}})
    with pytest.raises(
        ConfigError, match=r"unknown key 'task.bogus' for task 'regression'; it accepts: loss"
    ):
        config_from_dict({**BASE, "task": {"type": "regression", "bogus": 1}})


def test_another_tasks_key_is_ignored_with_a_warning():
    cfg = config_from_dict({**BASE, "task": {"type": "regression", "class_weights": "balanced"}})
    assert (
        cfg.task.ignored == {"class_weights": "balanced"}
        and "class_weights" not in cfg.to_dict()["task"]
    )
    with pytest.warns(
        MilWarning, match=r"task.class_weights = balanced is ignored: a regression task"
    ):
        warn_ignored(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MilWarning)
        warn_ignored(config_from_dict({**BASE, "task": {"type": "regression"}}))


def test_a_config_saved_before_tasks_owned_their_options_loads_silently():
    """Saved configs used to hold every task's keys at their defaults."""
    old = {
        "class_weights": "none",
        "operating_point": "youden",
        "loss": "cox",
        "ties": "efron",
        "bins": 4,
        "bins_from": "fold",
        "alpha": 0.0,
    }
    for kind in ("classification", "survival"):
        cfg = config_from_dict({**BASE, "task": {"type": kind, **old}})
        assert cfg.task.type == kind and set(cfg.task.ignored) < set(old)
        with warnings.catch_warnings():
            warnings.simplefilter("error", MilWarning)
            warn_ignored(cfg)
    # a value that is not a default is a choice, and is warned about
    with pytest.warns(MilWarning, match="task.bins = 8 is ignored"):
        warn_ignored(
            config_from_dict({**BASE, "task": {"type": "classification", **old, "bins": 8}})
        )


def test_a_task_receives_its_options_and_the_run_not_the_config():
    cfg = config_from_dict(
        {**BASE, "name": "n1", "task": {"type": "classification", "class_weights": "balanced"}}
    )
    task = make_task(cfg, ["a", "b"])
    assert not hasattr(task, "cfg")
    assert task.options.class_weights == "balanced" and task.run.name == "n1"
    assert task.run.columns == {"label": "label"} and task.operating_point.applies
    assert sorted(available()) == available()
