"""A small name -> entry registry shared by models, datasets and other pluggable pieces."""

from __future__ import annotations

import difflib
import fnmatch
from typing import Generic, Iterator, TypeVar

from dlkit.errors import NotFoundError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to entries. Registering a name twice is a programming error."""

    def __init__(self, kind: str, list_command: str | None = None):
        self.kind = kind
        self.list_command = list_command
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise NotFoundError(f"unknown {self.kind} '{name}'", hint=self._hint(name)) from None

    def _hint(self, name: str) -> str:
        close = difflib.get_close_matches(name, self._entries, n=3, cutoff=0.5)
        parts = []
        if close:
            parts.append("did you mean " + " or ".join(f"'{c}'" for c in close) + "?")
        if self.list_command:
            parts.append(f"`{self.list_command}` lists them all")
        else:
            parts.append("known: " + ", ".join(sorted(self._entries)))
        return "; ".join(parts)

    def names(self, pattern: str = "*") -> list[str]:
        return [n for n in self._entries if fnmatch.fnmatch(n, pattern)]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def items(self):
        return self._entries.items()
