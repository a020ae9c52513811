"""Space of the ``uring://`` store: extents of the data region, pins of objects being read, eviction to make
room (also for checkpoint space), and the registered bounce buffer handed out in extents."""

from __future__ import annotations

import asyncio

import torch

from ..errors import CapacityError
from ..storage.allocator import ExtentAllocator
from . import format as fmt
from .state import BLOCK, StoreState
from .transport import BlockTransport

__all__ = ["Bounce", "SpaceLayer"]


class Bounce:
    """Staging memory the device reaches directly (registered with the ring for io_uring, inside the shared
    region for vhost), handed out in extents; waiters queue when it is full. Its buffer index (``index``) is
    what ``Op.*_fixed`` ops name."""

    def __init__(self, transport: BlockTransport, nbytes: int) -> None:
        self.mem = transport.alloc(nbytes)
        self.addr = self.mem.addr
        self.alloc = ExtentAllocator(nbytes, BLOCK)
        self.tensor: torch.Tensor = self.mem.tensor
        self.index = transport.register(self.mem)
        self._cond = asyncio.Condition()

    async def get(self, n: int) -> int:
        async with self._cond:
            while True:
                off = self.alloc.alloc(n)
                if off is not None:
                    return off
                await self._cond.wait()

    async def put(self, off: int, n: int) -> None:
        async with self._cond:
            self.alloc.free(off, n)
            self._cond.notify_all()


class SpaceLayer(StoreState):
    """Extent allocation and release; an extent is freed only when no read pins it."""

    _bounce: Bounce | None

    def _release(self, e: fmt.Entry) -> None:
        e.dead = True
        self._meta_bytes -= e.packed_size
        if e.pins == 0:
            assert self._alloc is not None
            self._alloc.free(e.offset, e.extent)

    def _unpin(self, e: fmt.Entry) -> None:
        e.pins -= 1
        if e.dead and e.pins == 0:
            assert self._alloc is not None
            self._alloc.free(e.offset, e.extent)

    def _allocate(self, length: int, meta: int, dels: list[bytes]) -> int:
        assert self._alloc is not None and self._geo is not None
        if fmt.align_up(length) > self._alloc.capacity:
            raise CapacityError(f"an object of {length} bytes cannot fit in uring://{self.path} "
                                f"({self._alloc.capacity} bytes of data space)")
        meta_room = self._geo.ckpt_len - BLOCK
        while True:
            if self._meta_bytes + meta <= meta_room:
                off = self._alloc.alloc(length)
                if off is not None:
                    return off
            victim = next((k for k in self.policy.candidates() if self._index[k].pins == 0), None)
            if victim is None:
                raise CapacityError(f"uring://{self.path} is full and every object is in use")
            e = self._index.pop(victim)
            self.policy.remove(victim)
            self._release(e)
            dels.append(fmt.del_record(victim))
            self.counters["evictions"] += 1
