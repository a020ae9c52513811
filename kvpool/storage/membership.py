"""Membership over an in-memory index: what every tier whose objects are named in a ``dict`` answers alike."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any


class IndexedMembership:
    """``contains``/``contains_many``/``keys`` of a backend whose objects are the keys of ``self._index``.

    Mixed in before :class:`~kvpool.storage.backend.Backend` (which supplies ``_check_open``).
    """

    _index: dict[bytes, Any]

    if TYPE_CHECKING:  # provided by Backend, which comes after this mixin in the MRO

        def _check_open(self) -> None: ...

    async def contains(self, key: bytes) -> bool:
        self._check_open()
        return key in self._index

    async def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        self._check_open()
        index = self._index
        return [k in index for k in keys]

    async def keys(self) -> AsyncIterator[bytes]:
        self._check_open()
        for k in list(self._index):
            yield k
