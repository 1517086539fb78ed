"""YAML config -> validated, typed :class:`Config`: the schema's checks (:mod:`mil.schema`)
and the model and task names against their registries; errors name the key and the file."""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from pathlib import Path
from typing import Any

from mil.data.cohort import AVAILABILITY_COL
from mil.data.tabular import parse_tabular
from mil.errors import ConfigError, MilWarning
from mil.models import registry as models
from mil.schema import (
    DEFAULT_PATIENT_COL,
    Config,
    DataConfig,
    SplitsConfig,
    TaskConfig,
    TrainConfig,
    apply_override,
    build_section,
    dump_config,
    fixed_epoch_budget,
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
    "derive",
    "dump_config",
    "load_config",
    "point_config",
    "read_yaml_mapping",
    "refuse_search",
    "search_grid",
    "searchable",
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
    _check_search(cfg)
    _check_targets(cfg)
    if cfg.data.tabular:  # its entries checked; metrics per availability pattern in subgroups.csv
        parse_tabular(cfg.data.tabular, source)
        if AVAILABILITY_COL not in cfg.data.subgroup_cols:
            cfg.data.subgroup_cols.append(AVAILABILITY_COL)
    try:
        allowed = models.hyperparameters(cfg.model_name)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    unknown = sorted(set(cfg.model_hparams) - set(allowed))
    if unknown:
        accepts = (
            f"it accepts: {', '.join(sorted(allowed))}"
            if allowed
            else "it takes no model keys but name"
        )
        raise ConfigError(
            f"{source}: unknown key 'model.{unknown[0]}' for model {cfg.model_name!r}; {accepts}"
        )
    _check_task(cfg)
    _check_stopping_and_ensemble(cfg)
    for key, values in cfg.search.items():  # each value alone first: the error names its key
        for value in values:
            point_config(cfg, {key: value})
    for point in search_grid(cfg):
        point_config(cfg, point)
    return cfg


def search_grid(cfg: Config) -> list[dict[str, Any]]:
    """The points of ``cfg.search``: every combination of its values (the cartesian product;
    keys in the config's order, the last varying fastest), each ``{dotted key: value}``."""
    if not cfg.search:
        return []
    keys = list(cfg.search)
    return [dict(zip(keys, values)) for values in itertools.product(*cfg.search.values())]


def refuse_search(cfg: Config, verb: str) -> None:
    """A :class:`ConfigError` for a config with a ``search:`` block given to ``verb`` (``mil
    compare``, ``mil generalize``), which runs plain runs and would silently drop the grid."""
    if cfg.search:
        raise ConfigError(
            f"{cfg.source}: {verb} runs plain cross-validations and cannot run its search: block "
            f"({', '.join(cfg.search)}); run the search with `mil train`, or remove search: and "
            "write the values to use into the config's model:, train: or data: section"
        )


def derive(cfg: Config, changes: dict[str, Any], source: str) -> Config:
    """A plain config made from ``cfg`` (a search point, a compare entry, a generalization
    setting, an external cohort): ``cfg`` without its ``search`` and ``compare`` blocks, with
    ``changes`` applied, checked like any config (errors name ``source``).

    A dotted key sets one value (``"train.lr"``, ``"splits.dir"``); a bare key replaces a
    top-level value or a whole section (``"name"``, ``"model"``, ``"data"``). ``train`` keys
    given follow the config rule for ``train.epochs`` (:func:`mil.schema.fixed_epoch_budget`).
    """
    raw = cfg.to_dict()
    raw.pop("search", None)
    raw.pop("compare", None)
    train: dict[str, Any] = {}
    for key, value in changes.items():
        section, dot, sub = key.partition(".")
        if dot:
            raw.setdefault(section, {})[sub] = value
            if section == "train":
                train[sub] = value
        else:
            raw[key] = value
    fixed_epoch_budget(train, raw["train"])
    return config_from_dict(raw, source=source)


def point_config(cfg: Config, point: dict[str, Any], name: str | None = None) -> Config:
    """The plain config of one search point: ``cfg`` without ``search`` (and ``compare``), the
    point's values in place of its own, checked like any config; errors name the point."""
    where = ", ".join(f"{k} = {v!r}" for k, v in point.items())
    changes = {**point, **({"name": name} if name is not None else {})}
    return derive(cfg, changes, source=f"{cfg.source}: search {where}")


def _check_stopping_and_ensemble(cfg: Config) -> None:
    """``train.stop_on``: auto, loss or a headline metric of the task; ``ensemble``: auto
    (resolved by the task into ``cfg.members``) or registered linear models (closed-form fits).
    A model fitted in closed form itself runs alone."""
    task = tasks.get(cfg.task.type)
    allowed = ["auto", "loss", *task.headline_metrics]
    if cfg.train.stop_on not in allowed:
        raise ConfigError(
            f"{cfg.source}: train.stop_on = {cfg.train.stop_on!r}; expected one of {allowed}"
        )
    if cfg.train.sampler == "balanced" and task.balance_groups is tasks.Task.balance_groups:
        raise ConfigError(
            f"{cfg.source}: train.sampler: balanced: a {cfg.task.type} task has no groups of bags "
            "to balance (classes, or event status); use train.sampler: random"
        )
    model = models.get(cfg.model_name)
    linear = [n for n in models.available() if not models.get(n).trained_by_gradient]
    for name in [] if cfg.ensemble == "auto" else cfg.ensemble:
        if name not in linear:
            raise ConfigError(
                f"{cfg.source}: ensemble: {name!r} is not a linear model; members are {linear} (or [] for the model alone)"
            )
    if cfg.ensemble != "auto" and len(set(cfg.ensemble)) != len(cfg.ensemble):
        raise ConfigError(f"{cfg.source}: ensemble: {cfg.ensemble} names a model twice")
    for name in cfg.select.members:
        if name not in linear:
            raise ConfigError(
                f"{cfg.source}: select.members: {name!r} is not a linear model; expected some of {linear}"
            )
    if cfg.select.mode != "none" and not model.trained_by_gradient:
        raise ConfigError(
            f"{cfg.source}: select.mode: {cfg.select.mode} chooses between a trained model and "
            f"linear ones; model {cfg.model_name!r} is itself linear (set select.mode: none)"
        )
    if not model.trained_by_gradient:  # a linear model runs alone
        cfg.members = []
    else:
        auto = task.default_ensemble(model, tables=bool(cfg.data.tabular))
        cfg.members = list(auto if cfg.ensemble == "auto" else cfg.ensemble)


def _check_task(cfg: Config) -> None:
    """``task.type`` is a registered task; the other ``task:`` keys are its own options (its
    ``Options`` dataclass: typed and value-checked into ``cfg.task.options``) or another task's
    (kept in ``cfg.task.ignored``, warned about when a run starts: :func:`warn_ignored`); its
    reader of the targets goes into ``cfg.task.targets``."""
    t = cfg.task
    if t.type not in tasks.available():
        raise ConfigError(
            f"{cfg.source}: task.type = {t.type!r}; expected one of {tasks.available()}"
        )
    cls = tasks.get(t.type)
    own = [f.name for f in dataclasses.fields(cls.Options)]
    others = {f.name for n in tasks.available() for f in dataclasses.fields(tasks.get(n).Options)}
    unknown = sorted(k for k in t.given if k not in own and k not in others)
    if unknown:
        accepts = f"it accepts: {', '.join(own)}" if own else "it takes no task keys but type"
        raise ConfigError(
            f"{cfg.source}: unknown key 'task.{unknown[0]}' for task {t.type!r}; {accepts}"
        )
    # configs saved before tasks owned their options hold every task's defaults, some under a
    # key this task declares too (``loss: cox`` of a classification run): ignored, not refused
    saved = {k for k in own if k in t.given and cls.saved_defaults.get(k, t) == t.given[k]}
    t.ignored = {k: v for k, v in t.given.items() if k not in own or k in saved}
    mine = {k: v for k, v in t.given.items() if k in own and k not in saved}
    try:
        t.options = build_section(cls.Options, mine, "task.", cfg.source)
    except (TypeError, ValueError) as exc:  # the Options' own value checks
        raise ConfigError(f"{cfg.source}: {exc}") from None
    t.targets = cls.target_reader(t.options)


def warn_ignored(cfg: Config) -> None:
    """A :class:`MilWarning` per ``task:`` key that another task declares, which this run's
    task does not read (``task.operating_point: 0.9`` of a survival run); silent for a default
    value of a task that declares it (configs saved before tasks owned their options hold every
    task's defaults)."""
    for key, value in cfg.task.ignored.items():
        if any(value == _default(n, key) for n in _declaring(key)):
            continue  # a default that earlier versions saved for every task, not a choice
        warnings.warn(
            f"{cfg.source}: task.{key} = {value} is ignored: a {cfg.task.type} task does not "
            f"read it (an option of {', '.join(_declaring(key))})",
            MilWarning,
            stacklevel=4,
        )


def _default(task: str, key: str) -> Any:
    return next(f.default for f in dataclasses.fields(tasks.get(task).Options) if f.name == key)


def _declaring(key: str) -> list[str]:
    return [
        n
        for n in tasks.available()
        if key in {f.name for f in dataclasses.fields(tasks.get(n).Options)}
    ]


def _check_targets(cfg: Config) -> None:
    """``data.class_aliases``: {class: [aliases]}, each alias naming one class, no alias a class."""
    seen: dict[str, str] = {}
    for cls, aliases in cfg.data.class_aliases.items():
        if not isinstance(aliases, list) or not all(
            isinstance(a, (str, int, float)) for a in aliases
        ):
            raise ConfigError(
                f"{cfg.source}: data.class_aliases.{cls} must be a list of labels, found {aliases!r}"
            )
        for a in map(str, aliases):
            if a in cfg.data.class_aliases and a != str(cls):
                raise ConfigError(
                    f"{cfg.source}: data.class_aliases: {a!r} is both a class and an alias of {cls!r}"
                )
            if seen.setdefault(a, str(cls)) != str(cls):
                raise ConfigError(
                    f"{cfg.source}: data.class_aliases: {a!r} is an alias of both {seen[a]!r} and {cls!r}"
                )


#: ``train.`` keys a ``search:`` grid may hold: those that change what a fold learns (``seed``,
#: ``device``, ``threads``, ``max_instances`` and ``faithfulness`` change no selection worth making)
SEARCH_TRAIN_KEYS = tuple(
    "epochs batch_size lr weight_decay optimizer patience min_epochs min_steps schedule "
    "warmup_steps best_from_epoch subsample precision grad_clip sampler".split()
)
#: other keys a grid may hold: a fold's own feature preprocessing
SEARCH_DATA_KEYS = ("data.standardize",)
#: model keys a run fills in itself (the tables' layout), never searched
_INTERNAL_MODEL_KEYS = ("tabular", "modalities")
#: grids larger than this are warned about (each point trains every fold)
LARGE_GRID = 100


def searchable(key: str) -> bool:
    """Whether ``search:`` accepts ``key``: ``train.<one of SEARCH_TRAIN_KEYS>``,
    ``model.<a hyper-parameter>`` (or ``model.name``), or one of :data:`SEARCH_DATA_KEYS`."""
    section, _, sub = key.partition(".")
    if section == "train":
        return sub in SEARCH_TRAIN_KEYS
    if section == "model":
        return bool(sub) and "." not in sub and sub not in _INTERNAL_MODEL_KEYS
    return key in SEARCH_DATA_KEYS


def _check_search(cfg: Config) -> None:
    """``search:`` keys are :func:`searchable` with non-empty lists, and need a validation split
    (:func:`mil.config.config_from_dict` checks the values against the schema)."""
    for key, values in cfg.search.items():
        if not searchable(str(key)):
            raise ConfigError(
                f"{cfg.source}: search: {key!r} cannot be searched; searchable keys: "
                f"train.{{{', '.join(SEARCH_TRAIN_KEYS)}}}, model.<hyper-parameter> (or "
                f"model.name) and {', '.join(SEARCH_DATA_KEYS)}"
            )
        if not isinstance(values, list) or not values:
            raise ConfigError(
                f"{cfg.source}: search: {key} must be a non-empty list of values, e.g. [1.0e-4, 1.0e-3]"
            )
    if cfg.search and cfg.splits.val_fraction <= 0:
        raise ConfigError(
            f"{cfg.source}: search needs a validation split (splits.val_fraction > 0): each point is selected by its validation loss"
        )


def other_preprocessing(cfg: Config) -> tuple[str, bool | str] | None:
    """The model on the other preprocessing, a candidate under ``select.other_preprocessing``:
    its member name and its ``data.standardize`` (None without selection or without it)."""
    if cfg.select.mode == "none" or not cfg.select.other_preprocessing:
        return None
    value: bool | str = False if cfg.data.standardize else "whiten"
    return f"{cfg.model_name}_{'raw' if value is False else value}", value
