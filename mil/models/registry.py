"""One registry of aggregators: ``create(name, in_dim=…, n_out=…, **hparams)``."""

from __future__ import annotations

import inspect
from typing import Any

from mil.errors import ConfigError
from mil.models.base import MILModel
from mil.registry import Registry


def _named(name: str, cls: type[MILModel]) -> None:
    cls.registry_name = name


_MODELS: Registry[type[MILModel]] = Registry("model", "model.name", _named)
#: class decorator adding a model to the registry under ``name``
register = _MODELS.register
#: names of all registered aggregators, sorted
available = _MODELS.available
get = _MODELS.get


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
