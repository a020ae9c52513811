"""Space of the ``uring://`` store: extents of the data region, pins of objects being read, eviction to make
room (also for checkpoint space), and the staging memory of reads and writes that cannot go direct: a slice of
the pool's staging arena when one is attached (populated memory, registered by the transport), else an extent
of the store's own bounce buffer."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import attrs
import torch

from ..errors import CapacityError
from ..storage.allocator import ExtentAllocator
from . import format as fmt
from .ops import Kind, Op
from .state import BLOCK, StoreState
from .transport import BlockTransport

if TYPE_CHECKING:
    from ..storage.staging import StagingArena

__all__ = ["Bounce", "SpaceLayer", "Stage"]


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


@attrs.define(slots=True, eq=False)
class Stage:
    """One group's staging memory: ``nbytes`` at ``addr``, ``tensor`` a ``uint8`` view of it.

    A slice of the pool's arena (``bounce_off`` None) or the extent at ``bounce_off`` of the bounce buffer
    (``index`` names it in fixed ops).
    """

    tensor: torch.Tensor = attrs.field(repr=False)
    addr: int
    nbytes: int
    index: int = -1
    bounce_off: int | None = None

    def ops(self, kind: Kind, file_off: int, off: int, n: int, max_io: int) -> list[Op]:
        """Ops moving ``[off, off + n)`` of this staging memory to/from ``file_off``, ``max_io`` at most each."""
        out: list[Op] = []
        for o in range(0, n, max_io):
            ln = min(max_io, n - o)
            if self.bounce_off is not None:
                out.append(Op(kind, file_off + o, fixed=(self.index, self.bounce_off + off + o, ln)))
            else:
                # plain iovecs: the transport turns them into fixed ops where the arena is registered with it
                out.append(Op(kind, file_off + o, iov=((self.addr + off + o, ln),)))
        return out


class SpaceLayer(StoreState):
    """Extent allocation and release; an extent is freed only when no read pins it."""

    _bounce: Bounce | None
    _staging: StagingArena | None

    _arena_inflight: int  # this store's groups holding arena staging now
    _arena_freed: asyncio.Event  # set (and replaced) when one of them gives its slice back

    async def _stage(self, need: int) -> Stage:
        """``need`` bytes of staging memory for one group, from the pool's arena where the device reaches it
        with no copy, else from the bounce buffer (waiting for room there).

        When the arena is full, a group waits only while this store's own groups hold arena staging: those
        give it back within one I/O, so waiting cannot deadlock and the bounce buffer -- 256 MiB that would be
        faulted in -- stays untouched under a burst of concurrent reads. When the rest is held by others
        (``get`` results a caller keeps), it falls back to the bounce buffer at once: waiting for memory the
        caller itself holds could last forever.
        """
        arena = self._staging
        if arena is not None and self._transport is not None and need <= arena.nbytes:
            while True:
                t = arena.try_empty((need,), torch.uint8)
                if t is not None:
                    if not self._transport.mem_ok(t.data_ptr(), need):
                        break  # memory this transport cannot reach with no copy (t goes back on return)
                    self.counters["arena_staging"] += 1
                    self._arena_inflight += 1
                    return Stage(t, t.data_ptr(), need)
                if self._arena_inflight == 0:
                    break
                self.counters["arena_waits"] += 1
                # no await between the failed try and this wait: a release cannot slip in unseen
                await self._arena_freed.wait()
        assert self._bounce is not None
        off = await self._bounce.get(need)
        self.counters["bounce_staging"] += 1
        b = self._bounce
        return Stage(b.tensor[off : off + need], b.addr + off, need, b.index, off)

    async def _unstage(self, stage: Stage) -> None:
        """Give a group's staging memory back (only once no op of the group is in flight on it). The caller
        holds no other view of it."""
        if stage.bounce_off is not None:
            assert self._bounce is not None
            await self._bounce.put(stage.bounce_off, stage.nbytes)
            return
        # an arena slice returns to the arena when its last view goes: this one
        # (no await here: a cancellation cannot leave the count of slices held wrong)
        stage.tensor = torch.empty(0, dtype=torch.uint8)
        self._arena_inflight -= 1
        freed, self._arena_freed = self._arena_freed, asyncio.Event()
        freed.set()

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
