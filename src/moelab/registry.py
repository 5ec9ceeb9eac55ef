"""Registries that pick a variant class from a config `kind` string.

Layers register themselves with a decorator (`@ATTENTION.register("dense")`); the block asks the
registry for `config.attention.kind` and never branches on the variant itself. Later work adds
kinds without touching the block.
"""
from __future__ import annotations

import difflib
from typing import Callable, Generic, TypeVar

from moelab.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, field: str):
        self.field = field  # the config field this registry is keyed by, for error messages
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise RuntimeError(f"{self.field}: kind {name!r} registered twice")
            self._items[name] = obj
            return obj

        return deco

    def names(self) -> list[str]:
        _import_builtin_layers()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        _import_builtin_layers()
        return name in self._items

    def get(self, name: str) -> T:
        _import_builtin_layers()
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{self.field}: unknown kind {name!r}{hint}; allowed: {', '.join(self.names())}"
            )
        return self._items[name]


def _import_builtin_layers() -> None:
    # Importing the layers package registers every built-in kind.
    import moelab.layers  # noqa: F401


ATTENTION: Registry = Registry("model.attention.kind")
FFN: Registry = Registry("model.ffn.kind")
ROUTER: Registry = Registry("model.router.kind")
NORM: Registry = Registry("model.norm.kind")
