"""Name → class registries that fail loudly, with a did-you-mean, on unknown names.

Every user-facing name (method, selector, repair) is resolved through a :class:`Registry`, so a typo in a sweep
override costs one job a one-line error instead of a traceback deep inside a pruning loop.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(ValueError):
    """An unknown registry name; the message lists the known ones and the closest match."""


def unknown_name_message(kind: str, name: object, known: list[str]) -> str:
    """One line: the bad value, the closest known names, and every allowed value."""
    close = difflib.get_close_matches(str(name), known, n=2, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown {kind} {name!r}.{hint} Known: {', '.join(sorted(known))}."


class Registry(Generic[T]):
    """A small registry: ``@REG.register("name")`` on a class, ``REG.get("name")`` to look it up."""

    def __init__(self, kind: str, loader: Callable[[], None] | None = None) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._loader = loader
        self._loaded = loader is None

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def add(self, name: str, obj: T) -> None:
        self.register(name)(obj)

    def _ensure_loaded(self) -> None:
        # Plug-ins (the baselines package) register themselves on import; import them on first use so that
        # `import gradmap` stays cheap and free of import cycles.
        if not self._loaded:
            self._loaded = True
            assert self._loader is not None
            self._loader()

    def get(self, name: str) -> T:
        self._ensure_loaded()
        if name not in self._items:
            raise UnknownNameError(unknown_name_message(self.kind, name, list(self._items)))
        return self._items[name]

    def names(self) -> list[str]:
        self._ensure_loaded()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self._ensure_loaded()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
