"""The policy interface every eviction policy implements, and the backend mixin that feeds it hints."""

from __future__ import annotations

import abc
from collections.abc import Iterator


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

    def link(self, parent: bytes, child: bytes) -> None:
        """``child`` is the chunk that follows ``parent`` in some prompt (it is useless without it)."""

    def observe(self, key: bytes, mass: float) -> None:
        """The model paid ``mass`` (>= 0) attention to the chunk ``key``."""

    def __len__(self) -> int:
        return 0


class PolicyHints:
    """Mixin for a backend whose objects are ordered by an :class:`EvictionPolicy` in ``self.policy``: the
    backend's eviction-hint surface (``hint_prefix``/``hint_attention``/``hint_touch``, see
    :class:`kvpool.storage.backend.Backend`) fed straight to the policy. Put it before ``Backend`` in the
    bases and declare ``eviction_hints=True``."""

    policy: EvictionPolicy

    def hint_prefix(self, parent: bytes, child: bytes) -> None:
        self.policy.link(parent, child)

    def hint_attention(self, key: bytes, mass: float) -> None:
        self.policy.observe(key, mass)

    def hint_touch(self, key: bytes) -> None:
        self.policy.touch(key)  # every policy ignores keys it does not hold
