"""A named, ordered set of declarations (the methods, the metrics): lookup by name with a
clear error, and the table order."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, Protocol, TypeVar


class _Named(Protocol):
    name: str


T = TypeVar("T", bound=_Named)


class Catalog(Generic[T]):
    """``entries`` in table order; ``what`` names them in errors ("method", "metric")."""

    def __init__(self, entries: Iterable[T], what: str) -> None:
        self.entries: tuple[T, ...] = tuple(entries)
        self.what = what
        self.names: tuple[str, ...] = tuple(e.name for e in self.entries)
        self._by_name = {e.name: e for e in self.entries}

    def __getitem__(self, name: str) -> T:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"unknown {self.what} {name!r}; known {self.what}s: {', '.join(self.names)}") from None

    def rank(self, name: str) -> int:
        """Position of ``name`` in table order; unknown names after every known one."""
        return self.names.index(name) if name in self._by_name else len(self.names)

    def ordered(self, names: Iterable[str]) -> list[str]:
        """The distinct ``names`` in table order (unknown names last, alphabetically)."""
        return sorted(set(names), key=lambda n: (self.rank(n), n))
