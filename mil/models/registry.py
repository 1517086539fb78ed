"""One registry of aggregators: ``create(name, in_dim=…, n_out=…, **hparams)``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from mil.errors import ConfigError
from mil.models.base import MILModel

_REGISTRY: dict[str, type[MILModel]] = {}

T = TypeVar("T", bound=type[MILModel])


def register(name: str) -> Callable[[T], T]:
    """Class decorator adding a model to the registry under ``name``."""

    def deco(cls: T) -> T:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"model name {name!r} is registered twice")
        _REGISTRY[name] = cls
        cls.registry_name = name
        return cls

    return deco


def available() -> list[str]:
    """Names of all registered aggregators, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> type[MILModel]:
    if name not in _REGISTRY:
        raise ConfigError(
            f"model.name: unknown model {name!r}; available models: {', '.join(available())}"
        )
    return _REGISTRY[name]


def hyperparameters(name: str) -> dict[str, Any]:
    """The hyper-parameters a model accepts, with their defaults."""
    sig = inspect.signature(get(name).__init__)
    return {
        p.name: (None if p.default is inspect.Parameter.empty else p.default)
        for p in list(sig.parameters.values())[1:]
        if p.name not in ("in_dim", "n_out") and p.kind is not p.VAR_KEYWORD
    }


def create(name: str, *, in_dim: int, n_out: int, **hparams: Any) -> MILModel:
    """Build aggregator ``name``; unknown hyper-parameters are a :class:`ConfigError`."""
    allowed = hyperparameters(name)
    unknown = sorted(set(hparams) - set(allowed))
    if unknown:
        raise ConfigError(
            f"model.{unknown[0]}: not a hyper-parameter of model {name!r}; "
            f"it accepts: {', '.join(sorted(allowed)) or 'none'}"
        )
    try:
        return get(name)(in_dim, n_out, **hparams)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model {name!r}: {exc}") from None
