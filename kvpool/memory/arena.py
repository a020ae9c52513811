"""What every in-memory arena tier shares (``dram://``, ``gpu://``): objects are extents of one preallocated
buffer, found through a dict, ordered for eviction by a policy, and pinned while a copy runs outside the event
loop so that neither eviction nor an overwrite reuses the bytes under it.
"""

from __future__ import annotations

import abc

from typing import Any

import torch

from ..storage.allocator import ExtentAllocator
from ..errors import CapacityError
from ..storage.membership import IndexedMembership
from ..storage.eviction import EvictionPolicy, PolicyHints
from ..storage.backend import Backend, check_range, nbytes_of

__all__ = ["ArenaTier", "Extent"]


class Extent:
    """One object's bytes in the arena; freed when dead and no copy holds a pin."""

    __slots__ = ("dead", "nbytes", "pins", "start")

    def __init__(self, start: int, nbytes: int) -> None:
        self.start = start
        self.nbytes = nbytes
        self.pins = 0
        self.dead = False


def viewed_as(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``flat`` (uint8, contiguous) reinterpreted with ``like``'s dtype and shape."""
    return flat.view(like.dtype).view(like.shape)


class ArenaTier(IndexedMembership, PolicyHints, Backend):
    """Index, allocation, eviction and pins over ``self._arena``; subclasses do the copies.

    Subclasses set ``_capacity``, ``_alloc`` (an :class:`ExtentAllocator`), ``policy``, ``counters`` (with an
    ``evictions`` entry) and, once open, ``_arena`` (a flat uint8 tensor).
    """

    _capacity: int
    _alloc: ExtentAllocator
    _arena: torch.Tensor | None
    policy: EvictionPolicy
    counters: dict[str, int]

    def __init__(self) -> None:
        super().__init__()
        self._index: dict[bytes, Extent] = {}

    # --- sizes -------------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        return self._alloc.used

    async def object_size(self, key: bytes) -> int | None:
        ext = self._index.get(key)
        return ext.nbytes if ext is not None else None

    def __len__(self) -> int:
        return len(self._index)

    # --- bookkeeping -------------------------------------------------------------------------------------
    def _release(self, ext: Extent) -> None:
        ext.dead = True
        if ext.pins == 0:
            self._alloc.free(ext.start, ext.nbytes)

    def _unpin(self, ext: Extent) -> None:
        ext.pins -= 1
        if ext.dead and ext.pins == 0:
            self._alloc.free(ext.start, ext.nbytes)

    def _allocate(self, nbytes: int) -> int:
        """An extent for ``nbytes``, evicting unpinned objects in policy order until one fits."""
        if self._alloc.round(nbytes) > self._alloc.capacity:
            raise CapacityError(
                f"an object of {nbytes} bytes cannot fit in {self.scheme}:// of {self._capacity} bytes"
            )
        while True:
            start = self._alloc.alloc(nbytes)
            if start is not None:
                return start
            victim = next((k for k in self.policy.candidates() if self._index[k].pins == 0), None)
            if victim is None:
                raise CapacityError(
                    f"{self.scheme}:// is full: {nbytes} bytes needed, {self._alloc.free_bytes} free and every "
                    f"object is in use"
                )
            self._evict(victim)

    def _evict(self, key: bytes) -> None:
        ext = self._index.pop(key)
        self.policy.remove(key)
        self._release(ext)
        self.counters["evictions"] += 1

    def _slice(self, start: int, nbytes: int) -> torch.Tensor:
        assert self._arena is not None
        return self._arena[start : start + nbytes]

    async def write(self, key: bytes, src: torch.Tensor) -> None:
        """Copy ``src`` into a fresh extent, then publish it under ``key`` (replacing any old object)."""
        self._check_open()
        n = nbytes_of(src)
        if n == 0:
            raise ValueError("cannot store an empty object")
        start = self._allocate(n)
        ext = Extent(start, n)
        ext.pins = 1  # not yet visible, but an eviction must not hand it out while we copy
        try:
            await self._copy_in(self._slice(start, n), src)
        except BaseException:
            ext.dead = True
            self._unpin(ext)
            raise
        self._publish(key, ext)

    @abc.abstractmethod
    async def _copy_in(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Copy ``src``'s bytes into ``dst`` (a byte slice of the arena, ``nbytes_of(src)`` long)."""

    def _publish(self, key: bytes, ext: Extent) -> None:
        """Make a freshly copied extent the object under ``key`` (replacing, and releasing, any old one)."""
        ext.pins = 0
        old = self._index.get(key)
        if old is not None:
            self.policy.remove(key)
            self._release(old)
        self._index[key] = ext
        self.policy.insert(key, ext.nbytes)
        self.counters["bytes_written"] += ext.nbytes

    def _lookup(self, key: bytes, dest: torch.Tensor, offset: int) -> Extent | None:
        """The extent a range read of ``dest``'s size at ``offset`` will copy from; ``None`` (a counted miss)
        if absent. Raises ``ValueError`` for a range outside the object or an offset not on an element."""
        ext = self._index.get(key)
        if ext is None:
            self.counters["misses"] += 1
            return None
        check_range(dest, offset, ext.nbytes)
        return ext

    def _reset(self) -> None:
        """Forget every object (on close: the arena's contents do not outlive it)."""
        self._index.clear()
        self._alloc = ExtentAllocator(self._capacity, self._alloc.alignment)

    # --- the membership half of the core -----------------------------------------------------------------
    async def delete(self, key: bytes) -> bool:
        self._check_open()
        ext = self._index.pop(key, None)
        if ext is None:
            return False
        self.policy.remove(key)
        self._release(ext)
        return True

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "objects": len(self._index), "policy": self.policy.name, **self.counters}
