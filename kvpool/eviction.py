"""Eviction policies: which object a full tier gives up first.

A policy only orders keys; the tier that owns the bytes asks it for candidates and skips the ones it cannot
evict right now (pinned by an in-flight read). Policies are plain synchronous objects: every call is O(1)
amortised, because they run on every hit.
"""

from __future__ import annotations

import abc
from collections import OrderedDict
from collections.abc import Iterator

from .errors import ConfigError

__all__ = ["EvictionPolicy", "LRUPolicy", "make_policy", "POLICIES"]


class EvictionPolicy(abc.ABC):
    """Orders a tier's keys for eviction."""

    name: str = ""

    @abc.abstractmethod
    def insert(self, key: bytes, nbytes: int) -> None:
        """A new object arrived."""

    @abc.abstractmethod
    def touch(self, key: bytes) -> None:
        """An object was read (a hit)."""

    @abc.abstractmethod
    def remove(self, key: bytes) -> None:
        """An object left (deleted or evicted); unknown keys are ignored."""

    @abc.abstractmethod
    def candidates(self) -> Iterator[bytes]:
        """Keys in the order they should be evicted, best victim first.

        Lazy: the caller must not insert/remove while iterating (collect victims, then evict them).
        """

    def __len__(self) -> int:
        return 0


class LRUPolicy(EvictionPolicy):
    """Least recently used first."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[bytes, None] = OrderedDict()

    def insert(self, key: bytes, nbytes: int) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, key: bytes) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: bytes) -> None:
        self._order.pop(key, None)

    def candidates(self) -> Iterator[bytes]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)


POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRUPolicy}


def make_policy(name: str) -> EvictionPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ConfigError(f"unknown eviction policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None
