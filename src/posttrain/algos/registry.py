"""A registry maps a name from a recipe (``advantage = "dr_grpo"``) to one small pure function.

Every entry of one registry shares one signature, so a recipe swaps algorithms by changing a string and
adding a variant is one function, one decorator line and one test (STYLE.md §1). The registries themselves
live next to their functions (``ADVANTAGES`` in advantages.py, ...); importing ``posttrain.algos`` fills them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from posttrain.errors import UserError

F = TypeVar("F", bound=Callable[..., object])


class Registry(Generic[F]):
    """Name -> function for one kind of component (``kind`` names it in error messages)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator: ``@ADVANTAGES.register("grpo")``. A second entry under one name is a bug, so it raises."""

        def deco(fn: F) -> F:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered (by {self._entries[name]!r})")
            self._entries[name] = fn
            return fn

        return deco

    def get(self, name: str) -> F:
        try:
            return self._entries[name]
        except KeyError:
            raise UserError(
                f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}"
            ) from None

    __getitem__ = get

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
