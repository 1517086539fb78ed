"""The config schema: typed sections, YAML parsing and value checks; errors name the key and file.

The bottom layer of the config: it knows no model or task. :mod:`mil.config`
adds the checks against the model and task registries.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from mil.errors import ConfigError
from mil.io import read_yaml_mapping  # noqa: F401  (the config readers import it from here)


@dataclass
class TaskConfig:
    """``task:``: ``type`` names a registered task (mil.tasks: classification, survival,
    regression, or one a plugin adds); every other key is the task's own option, declared by
    the task (its ``Options``) and checked by :mod:`mil.config`, which fills the internal
    fields below."""

    type: str = "classification"
    # the keys given besides type, as written (mil.config checks them against the task)
    given: dict[str, Any] = field(default_factory=dict, metadata={"internal": True})
    # the task's options, typed and checked (an instance of the task's Options dataclass)
    options: Any = field(default=None, metadata={"internal": True})
    # what the cohort reads as targets (the task's mil.data.targets.Targets)
    targets: Any = field(default=None, metadata={"internal": True})
    # keys given that another task declares: ignored, and warned about when a run starts
    ignored: dict[str, Any] = field(default_factory=dict, metadata={"internal": True})

    def to_dict(self) -> dict[str, Any]:
        """``type`` and the task's options (as given where the config was not checked)."""
        opts = (
            dataclasses.asdict(self.options)
            if dataclasses.is_dataclass(self.options)
            else self.given
        )
        return {"type": self.type, **copy.deepcopy(opts)}


DEFAULT_PATIENT_COL = "case_id"


@dataclass
class DataConfig:
    csv: str | None = None
    features: str | None = None
    slide_col: str = "slide_id"
    # the patient of each slide; null: the CSV's "case_id" column where it has one, else
    # each slide is its own patient (with a warning). A column named here must exist.
    patient_col: str | None = None
    label_col: str = "label"
    bag_level: Literal["slide", "patient"] = "slide"
    classes: list[str] | None = None
    # labels read as another class, e.g. {DLBCL: [DLBCL NOS, NOS]} (centres' own names)
    class_aliases: dict[str, list[str]] = field(default_factory=dict)
    time_col: str = "time"
    event_col: str = "event"
    censored_value: int | None = None
    # instance-table input (one row per instance): see mil.data.instances
    instances: str | None = None
    bag_col: str = "bag_id"
    # per training fold (mil.data.transforms): false, z-scores (true), ZCA whitening (default)
    standardize: bool | Literal["whiten"] = "whiten"
    # tissue source site (centre) of each slide: a subgroup, and the groups of splits.by_site
    site_col: str | None = None
    # further cohort CSV columns (sex, stage, scanner, ...) whose values get their own metrics
    subgroup_cols: list[str] = field(default_factory=list)
    tabular: list[dict[str, Any]] = field(
        default_factory=list
    )  # joined by patient: mil.data.tabular
    cache_gb: float = 8.0
    cache_dtype: Literal["float16", "float32"] = "float32"
    store: Literal["files", "packed"] = "files"  # packed: one memory map (mil.data.store)
    store_dir: str | None = None  # the packed store's folder; null: <features>/.mil_store
    prefetch: int = 2  # loss batches read ahead on a thread while one trains; 0: inline
    # generate the built-in synthetic cohort at csv/features when they are absent
    synthetic: (
        Literal["classification", "survival", "regression", "ordinal", "multitarget", "multimodal"]
        | None
    ) = None


@dataclass
class SplitsConfig:
    dir: str | None = None
    folds: int = 5
    val_fraction: float = 0.15
    seed: int = 0
    repeats: int = 1
    assignment: str | None = None
    # site-preserved folds: all patients of a site (data.site_col) share one test fold,
    # so a model is always tested on sites it never saw (Howard et al., Nat Commun 2021)
    by_site: bool = False


@dataclass
class TrainConfig:
    # lr, min_steps, schedule, warmup_steps: chosen on the cohort zoo (docs/benchmarks.md)
    epochs: int = 40
    batch_size: int | Literal["auto"] = 16  # auto: from the rarest class (mil.train.sampling)
    # balanced: classes equal in each batch; auto: the task's choice on each fold's training bags
    # (classification: balanced where a class outnumbers another 5:1; docs/benchmarks.md)
    sampler: Literal["auto", "random", "balanced"] = "auto"
    lr: float = 1.0e-3
    weight_decay: float = 1.0e-4
    # adamw: decoupled wd; adam: coupled L2 (Ilse 2018); sgd: momentum, L2 (mi-Net); radam: TransMIL's
    optimizer: Literal["adamw", "adam", "sgd", "radam"] = "adamw"
    patience: int | None = 8
    # early stopping never stops before this many epochs (as CLAM's stop_epoch)
    min_epochs: int = 0
    # at least this many optimizer steps: a small cohort gets more epochs (ceil(min_steps /
    # batches per epoch)), and early stopping waits for them; null: train.epochs decides.
    # A config that sets train.epochs gets FIXED_EPOCHS for the budget keys it leaves unset.
    min_steps: int | None = 500
    # lr per step: constant, or cosine decay to 0 over the run's steps; after a warm-up
    schedule: Literal["constant", "cosine"] = "cosine"
    warmup_steps: int = 50
    # the checkpoint kept is the lowest validation loss among epochs >= best_from_epoch (on
    # few validation bags an untrained network near the prior can score the lowest loss)
    best_from_epoch: int = 0
    seed: int = 0
    # compute chunk: instances per forward call (the loss batch may span several)
    max_instances: int = 8192
    # optional random instance subsampling per bag during training (None = full bags)
    subsample: int | None = None
    device: str = "auto"
    # bf16: bfloat16 autocast (matmuls in bf16; softmax, reductions, loss in fp32); fp32: exact
    precision: Literal["fp32", "bf16"] = "fp32"
    threads: int | None = None
    grad_clip: float | None = None
    # deletion/insertion curves of each fold's test bags (mil.explain.faithfulness): ~20 passes
    faithfulness: bool = True
    # models trained per fold from different seeds (initial weights, batch order, dropout),
    # their outputs and instance scores averaged (mil.train.replicas); 1: one model
    seeds: int = 1
    # the epoch early stopping keeps: "auto" (the task's: survival the validation C-index,
    # otherwise the validation loss; docs/benchmarks.md), "loss", or a validation metric
    stop_on: str = "auto"


@dataclass
class SelectConfig:
    # "inner": per outer fold, the model alone, each linear model of `members` or the model
    # averaged with `ensemble:`, chosen by inner K-fold CV on the fold's training bags
    # (mil.train.selection); "none": the model averaged with `ensemble:`
    mode: Literal["none", "inner"] = "none"
    folds: int = 3  # inner folds
    members: list[str] = field(default_factory=lambda: ["meanpool_linear", "bow_linear"])
    # also the model on the other preprocessing (raw features where data.standardize is set,
    # whitened where it is false), a candidate alone
    other_preprocessing: bool = True


@dataclass
class Config:
    name: str = "run"
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    splits: SplitsConfig = field(default_factory=SplitsConfig)
    model: dict[str, Any] = field(
        default_factory=lambda: {"name": "abmil_additive"}
    )  # docs/benchmarks.md
    train: TrainConfig = field(default_factory=TrainConfig)
    # linear models fitted on each fold beside `model` and averaged with it; "auto": the
    # task's (survival: [meanpool_linear] for slide models; docs/benchmarks.md), [] for none
    ensemble: Literal["auto"] | list[str] = "auto"
    select: SelectConfig = field(default_factory=SelectConfig)
    # `mil compare`: models to run through the same folds, each {model: {...}, train: {...}, label}
    compare: list[dict[str, Any]] = field(default_factory=list)
    # `mil train` hyper-parameter search (mil.train.search): train./model. key -> values to try
    search: dict[str, list[Any]] = field(default_factory=dict)
    source: str = field(default="<dict>", metadata={"internal": True})
    # the ensemble's linear members as resolved (mil.config: "auto" by task and model)
    members: list[str] = field(default_factory=list, metadata={"internal": True})

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("source")
        out.pop("members")
        out["task"] = self.task.to_dict()
        for key in ("compare", "search"):  # plain runs keep the config.yaml they always had
            if not out[key]:
                out.pop(key)
        if self.select.mode == "none":
            out.pop("select")
        return out

    @property
    def model_name(self) -> str:
        return str(self.model["name"])

    @property
    def model_hparams(self) -> dict[str, Any]:
        return {k: v for k, v in self.model.items() if k != "name"}


def parse_config(
    raw: dict[str, Any], source: str = "<dict>", overrides: list[str] | None = None
) -> Config:
    """``raw`` with ``key.sub=value`` overrides applied, as a typed :class:`Config` whose
    values are checked; the model and task names are checked by :func:`mil.config.config_from_dict`."""
    raw = copy.deepcopy(raw)
    for item in overrides or []:
        apply_override(raw, item, source)
    cfg = _build(Config, raw, "", source)
    cfg.source = source
    budget = dict(vars(cfg.train))
    fixed_epoch_budget(raw.get("train"), budget)
    cfg.train = TrainConfig(**budget)
    cfg.model.setdefault("name", "abmil_additive")
    _check_values(cfg)
    return cfg


#: the budget of a config that sets train.epochs: those epochs at a constant lr
FIXED_EPOCHS = {"min_steps": None, "schedule": "constant", "warmup_steps": 0}


def fixed_epoch_budget(asked: Any, train: dict[str, Any]) -> None:
    """``asked`` (train keys a config or override sets) names ``epochs``: the keys of
    :data:`FIXED_EPOCHS` it leaves unset take those values in ``train`` (a dict or section)."""
    if isinstance(asked, dict) and "epochs" in asked:
        for key, value in FIXED_EPOCHS.items():
            if key not in asked:
                train[key] = value


def apply_override(raw: dict[str, Any], item: str, source: str = "--set") -> None:
    """Apply one ``a.b.c=value`` override (value parsed as YAML) to a raw config dict."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=1e-4")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    node = raw
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
        node = nxt
    node[parts[-1]] = parsed


def build_section(cls: type, raw: Any, prefix: str, source: str) -> Any:
    """The dataclass ``cls`` from the mapping ``raw``, every key typed and checked as a config
    section's (unknown keys and wrong types are a :class:`ConfigError` naming ``prefix`` + the
    key and ``source``): how a task's own options are read."""
    return _build(cls, raw, prefix, source)


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: '{prefix.rstrip('.') or 'config'}' must be a mapping, found {raw!r}"
        )
    if cls is TaskConfig:  # the task's own keys are the task's (mil.config checks them)
        task_type = _coerce(raw.get("type", TaskConfig.type), str, f"{prefix}type", source)
        return TaskConfig(task_type, given={k: v for k, v in raw.items() if k != "type"})
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key '{prefix}{unknown[0]}'; valid keys here: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value if value is not None else {}, f"{key}.", source)
        else:
            kwargs[name] = _coerce(value, hint, key, source)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check ``value`` against a type hint, converting ints to floats where a float is wanted."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            try:
                return _coerce(value, option, key, source)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{source}: {key} = {value!r} is not valid; expected {_describe(hint)}")
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{source}: {key} must be empty")
    if origin is Literal:
        if value in typing.get_args(hint):
            return value
        raise ConfigError(
            f"{source}: {key} = {value!r}; expected one of {list(typing.get_args(hint))}"
        )
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key} must be a list, found {value!r}")
        return [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict or hint is Any:
        if origin is dict and not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping, found {value!r}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-4" as a string
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{source}: {key} = {value!r}; expected {_describe(hint)}")


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "empty (null)"
    return getattr(hint, "__name__", str(hint))


def _value_rules(cfg: Config) -> list[tuple[bool, str, str]]:
    """(holds, key, what is wrong otherwise) for every value rule of the config."""
    s, t, d = cfg.splits, cfg.train, cfg.data
    finite = math.isfinite
    rules = [
        (s.folds >= 2, "splits.folds", "must be at least 2"),
        (0.0 <= s.val_fraction < 0.5, "splits.val_fraction", "must be in [0, 0.5)"),
        (s.repeats >= 1, "splits.repeats", "must be at least 1"),
        (t.epochs >= 1, "train.epochs", "must be at least 1"),
        (t.batch_size == "auto" or t.batch_size >= 1, "train.batch_size", "must be >= 1 or auto"),
        (finite(t.lr) and t.lr > 0, "train.lr", "must be a positive finite number"),
        (
            finite(t.weight_decay) and t.weight_decay >= 0,
            "train.weight_decay",
            "must be a finite number >= 0",
        ),
        (t.min_epochs >= 0, "train.min_epochs", "must be >= 0"),
        (
            t.min_steps is None or t.min_steps >= 1,
            "train.min_steps",
            "must be at least 1 (or null: train.epochs decides)",
        ),
        (t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0"),
        (
            t.subsample is None or t.subsample >= 1,
            "train.subsample",
            "must be at least 1 tile per bag (or null: full bags)",
        ),
        (
            t.threads is None or t.threads >= 1,
            "train.threads",
            "must be at least 1 (or null: torch's default)",
        ),
        (
            t.grad_clip is None or (finite(t.grad_clip) and t.grad_clip > 0),
            "train.grad_clip",
            "must be a positive finite number (or null: no clipping)",
        ),
        (
            re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", t.device) is not None,
            "train.device",
            f"= {t.device!r}; expected auto, cpu, cuda, cuda:<index> or mps",
        ),
        (
            0 <= t.best_from_epoch < t.epochs,
            "train.best_from_epoch",
            f"must be in [0, train.epochs = {t.epochs})",
        ),
        (t.max_instances >= 1, "train.max_instances", "must be at least 1"),
        (t.seeds >= 1, "train.seeds", "must be at least 1 (models per fold)"),
        (cfg.select.folds >= 2, "select.folds", "must be at least 2 (inner folds)"),
        (finite(d.cache_gb) and d.cache_gb >= 0, "data.cache_gb", "must be a finite number >= 0"),
    ]
    return rules + _conditional_rules(cfg)


def _conditional_rules(cfg: Config) -> list[tuple[bool, str, str]]:
    """The rules that apply only with some other key set (patience, by_site, instances)."""
    s, t, d = cfg.splits, cfg.train, cfg.data
    rules: list[tuple[bool, str, str]] = []
    if t.patience is not None:
        rules += [
            (t.patience >= 1, "train.patience", "must be at least 1 (or null for fixed epochs)"),
            (
                s.val_fraction > 0,
                "train.patience",
                "needs a validation split (splits.val_fraction > 0); set train.patience: null "
                "for fixed epochs",
            ),
        ]
    if s.by_site:
        rules += [
            (d.site_col is not None, "splits.by_site", "needs data.site_col (the site column)"),
            (s.assignment is None, "splits.by_site", "cannot be combined with splits.assignment"),
        ]
    if d.instances is not None:
        rules.append(
            (
                d.site_col is None and not d.subgroup_cols,
                "data.site_col / data.subgroup_cols",
                "are read from a cohort CSV (data.csv), not from an instance table (data.instances)",
            )
        )
    else:
        rules += [
            (d.csv is not None, "data.csv", "is required (the cohort CSV)"),
            (d.features is not None, "data.features", "is required (the feature folder)"),
        ]
    return rules


def _check_values(cfg: Config) -> None:
    for holds, key, what in _value_rules(cfg):
        if not holds:
            raise ConfigError(f"{cfg.source}: {key} {what}")


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
