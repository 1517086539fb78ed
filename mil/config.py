"""YAML config -> validated, typed :class:`Config`: the schema's checks (:mod:`mil.schema`)
and the model and task names against their registries; errors name the key and the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mil.errors import ConfigError
from mil.models import registry as models
from mil.schema import (
    DEFAULT_PATIENT_COL,
    Config,
    DataConfig,
    SplitsConfig,
    TaskConfig,
    TrainConfig,
    apply_override,
    dump_config,
    parse_config,
    read_yaml_mapping,
)
from mil.tasks import registry as tasks

__all__ = [
    "DEFAULT_PATIENT_COL",
    "Config",
    "DataConfig",
    "SplitsConfig",
    "TaskConfig",
    "TrainConfig",
    "apply_override",
    "config_from_dict",
    "dump_config",
    "load_config",
    "read_yaml_mapping",
]


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (safe loader), apply ``key.sub=value`` overrides, validate."""
    return config_from_dict(read_yaml_mapping(path), source=str(path), overrides=overrides)


def config_from_dict(
    raw: dict[str, Any], source: str = "<dict>", overrides: list[str] | None = None
) -> Config:
    """Parse and check a raw config: its values (:func:`mil.schema.parse_config`), the
    model's name and hyper-parameters, and the task's name (which also says what the
    cohort reads as targets)."""
    cfg = parse_config(raw, source, overrides)
    try:
        allowed = models.hyperparameters(cfg.model_name)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    unknown = sorted(set(cfg.model_hparams) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key 'model.{unknown[0]}' for model {cfg.model_name!r}; "
            f"it accepts: {', '.join(sorted(allowed))}"
        )
    if cfg.task.type not in tasks.available():
        raise ConfigError(
            f"{source}: task.type = {cfg.task.type!r}; expected one of {tasks.available()}"
        )
    cfg.task.target_kind = tasks.get(cfg.task.type).target_kind
    return cfg
