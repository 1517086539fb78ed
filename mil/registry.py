"""A registry of named classes (models, tasks): ``@register(name)``, ``available()``, ``get(name)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from mil.errors import ConfigError

C = TypeVar("C", bound=type)


class Registry(Generic[C]):
    """Name -> class, filled by a class decorator; ``key`` is the config key that names
    one (``model.name``), so an unknown name is a :class:`ConfigError` naming it."""

    def __init__(self, what: str, key: str, on_register: Callable[[str, C], None] | None = None):
        self.what, self.key = what, key
        self._on_register = on_register
        self._classes: dict[str, C] = {}

    def register(self, name: str) -> Callable[[C], C]:
        """Class decorator adding a class under ``name``."""

        def deco(cls: C) -> C:
            if name in self._classes and self._classes[name] is not cls:
                raise ValueError(f"{self.what} name {name!r} is registered twice")
            if self._on_register is not None:
                self._on_register(name, cls)
            self._classes[name] = cls
            return cls

        return deco

    def available(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._classes)

    def get(self, name: str) -> C:
        if name not in self._classes:
            raise ConfigError(
                f"{self.key}: unknown {self.what} {name!r}; available {self.what}s: "
                f"{', '.join(self.available())}"
            )
        return self._classes[name]
