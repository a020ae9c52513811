"""The async I/O scheduler that sits in front of every tier.

Requests carry a priority class and a deadline, taken from context variables the pool sets (so a backend
call deep inside a background task is classed correctly without threading arguments through)::

    FOREGROUND (a restore a request is waiting on)  >  PREFETCH  >  PROMOTION  >  WRITE_BACK

Rules, per tier:

- At most ``max_inflight`` operations and ``max_inflight_bytes`` bytes are in flight at once (the device's
  useful queue depth; bytes, because a layer-wise restore issues many small operations and a bulk one few
  large ones); an operation is always admitted when nothing is running. Large batches are cut into operations of at most ``op_bytes`` so that a big background batch cannot hold the
  device for long.
- Foreground operations are served earliest-deadline-first (a layer-wise restore gives layer *i* the deadline
  ``start + i * layer_time``: each layer's data is due just before the model needs it). Among equal
  deadlines, every request's k-th operation goes before any request's (k+1)-th (round-robin fairness: a big
  restore cannot starve a small one that arrived just after it), then FIFO.
- Background classes run only in the slack: when no foreground operation is running or waiting, and never
  more than ``background_inflight`` at once, so a foreground arrival waits for at most that many background
  operations already on the device.
- Cancellation: a cancelled waiter leaves the queue; a cancelled running operation is cancelled in the
  backend (whose buffers are the caller's, returned on cancellation).

The scheduler is a full proxy: the pool makes every data and membership call to a tier through it
(``read_many``/``read_into``, ``write_many``/``write``, ``contains_many``/``contains``, ``delete``), and
calls the backend itself only for its lifecycle (open/close), ``flush``, eviction hints and ``stats``.
Membership queries and deletes move no bytes. On a ``remote`` tier each is a network round trip that shares
the connection with the data, so it is queued as a zero-byte operation in the caller's priority class (a
lookup is foreground; a write-back's "is it there yet?" waits for the slack). On a local tier they are index
lookups in memory: queueing them behind device reads would only delay the lookup that decides what to read,
so they go straight through (counted, like everything else).

Range reads on a tier without ``partial_reads``: such a backend is only asked for whole objects, so a
request for a range (a layer of a chunk) becomes one whole-object read into a temporary buffer and a copy.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from enum import IntEnum
from typing import Any, TypeVar

import torch

from ..storage.settle import gather_settled
from ..storage.backend import Backend, ReadRequest, nbytes_of
from .observe import LatencyHistogram

__all__ = ["Priority", "TierScheduler", "io_class", "io_priority", "io_deadline"]

T = TypeVar("T")


class Priority(IntEnum):
    FOREGROUND = 0
    PREFETCH = 1
    PROMOTION = 2
    WRITE_BACK = 3


io_priority: contextvars.ContextVar[Priority] = contextvars.ContextVar("kvpool_io_priority", default=Priority.FOREGROUND)
io_deadline: contextvars.ContextVar[float] = contextvars.ContextVar("kvpool_io_deadline", default=math.inf)


class io_class:
    """Context manager: run the enclosed I/O at ``priority`` (and ``deadline``, a ``time.monotonic()`` value)."""

    def __init__(self, priority: Priority, deadline: float = math.inf) -> None:
        self.priority, self.deadline = priority, deadline
        self._tokens: tuple[contextvars.Token[Priority], contextvars.Token[float]] | None = None

    def __enter__(self) -> io_class:
        self._tokens = (io_priority.set(self.priority), io_deadline.set(self.deadline))
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._tokens is not None
        io_priority.reset(self._tokens[0])
        io_deadline.reset(self._tokens[1])


class TierScheduler:
    """Queues a tier's reads and writes by priority and deadline under a concurrency limit.

    Parameters
    ----------
    backend
        The tier.
    max_inflight
        Operations in flight at once.
    background_inflight
        Of those, at most this many of a background class.
    op_bytes
        Batches are cut into operations of about this many bytes.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        max_inflight: int = 32,
        max_inflight_bytes: int = 256 << 20,
        background_inflight: int = 1,
        op_bytes: int = 64 << 20,
    ) -> None:
        if max_inflight < 1 or background_inflight < 0:
            raise ValueError("max_inflight must be >= 1 and background_inflight >= 0")
        self.backend = backend
        self.max_inflight = max_inflight
        self.max_inflight_bytes = max_inflight_bytes
        self.queued = backend.capabilities.queued_io
        self._running_bytes = 0
        self.background_inflight = max(1, min(background_inflight, max_inflight))
        self.op_bytes = op_bytes
        self._heap: list[tuple[int, float, int, int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._running = 0
        self._running_bg = 0
        self.counters = {f"ops_{p.name.lower()}": 0 for p in Priority}
        self.counters.update(cancelled=0, max_queue=0, ops_meta=0, whole_object_reads=0)
        self.remote = backend.capabilities.remote
        self.partial_reads = backend.capabilities.partial_reads
        self.wait_time = {p.name.lower(): 0.0 for p in Priority}
        #: each request's time in the queue (0 when admitted at once), per priority class: the tail of
        #: these, not the totals in ``wait_time``, says whether a class is starved
        self.wait_histograms = {p.name.lower(): LatencyHistogram() for p in Priority}
        self.bytes = {"read": 0, "written": 0}
        self._recent_bps = 0.0  # EWMA of foreground read bandwidth

    # --- admission ---------------------------------------------------------------------------------------
    def _can_start(self, prio: int, nbytes: int) -> bool:
        if self._running and (
            self._running >= self.max_inflight or self._running_bytes + nbytes > self.max_inflight_bytes
        ):
            return False
        if prio == Priority.FOREGROUND:
            return True
        # background only in the slack: nothing of the foreground running (queued foreground sorts first)
        return self._running_bg < self.background_inflight and self._running == self._running_bg

    def _pump(self) -> None:
        while self._heap:
            prio, _dl, _rank, _seq, nbytes, fut = self._heap[0]
            if fut.done():  # cancelled while queued
                heapq.heappop(self._heap)
                continue
            if not self._can_start(prio, nbytes):
                return
            heapq.heappop(self._heap)
            self._running += 1
            self._running_bytes += nbytes
            if prio != Priority.FOREGROUND:
                self._running_bg += 1
            fut.set_result(None)

    async def _run(self, fn: Callable[[], Awaitable[T]], rank: int = 0, nbytes: int = 0) -> T:
        prio = int(io_priority.get())
        deadline = io_deadline.get() if prio == Priority.FOREGROUND else math.inf
        t0 = time.perf_counter()
        if self._heap or not self._can_start(prio, nbytes):
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            heapq.heappush(self._heap, (prio, deadline, rank, next(self._seq), nbytes, fut))
            self.counters["max_queue"] = max(self.counters["max_queue"], len(self._heap))
            self._pump()
            try:
                await fut
            except asyncio.CancelledError:
                self.counters["cancelled"] += 1
                if fut.done() and not fut.cancelled():
                    self._release(prio, nbytes)  # admitted just as we were cancelled: give the slot back
                raise
        else:
            self._running += 1
            self._running_bytes += nbytes
            if prio != Priority.FOREGROUND:
                self._running_bg += 1
        waited = time.perf_counter() - t0
        self.wait_time[Priority(prio).name.lower()] += waited
        self.wait_histograms[Priority(prio).name.lower()].observe(waited)
        self.counters[f"ops_{Priority(prio).name.lower()}"] += 1
        try:
            return await fn()
        finally:
            self._release(prio, nbytes)

    def _release(self, prio: int, nbytes: int) -> None:
        self._running -= 1
        self._running_bytes -= nbytes
        if prio != Priority.FOREGROUND:
            self._running_bg -= 1
        self._pump()

    # --- the tier's data calls, scheduled ----------------------------------------------------------------
    def _cut(self, sizes: Sequence[int]) -> list[range]:
        out, start, acc = [], 0, 0
        for i, n in enumerate(sizes):
            if acc and acc + n > self.op_bytes:
                out.append(range(start, i))
                start, acc = i, 0
            acc += n
        out.append(range(start, len(sizes)))
        return out

    async def read_many(self, requests: Sequence[ReadRequest]) -> list[bool]:
        """Serve range reads in the caller's priority class (see the module docstring)."""
        if not requests:
            return []
        if not self.partial_reads:
            return await self._read_whole(requests)
        return await self._read_many(requests)

    async def _read_whole(self, requests: Sequence[ReadRequest]) -> list[bool]:
        """Range reads on a backend that reads only whole objects: each object asked for a range is read
        whole (once per key, into a temporary buffer) and the ranges are copied out; requests for a whole
        object go through unchanged. (A key's objects all have one size -- the key binds the layout -- so
        the size looked up first is the size read.)"""
        sizes = [await self.object_size(r.key) for r in requests]
        out = [False] * len(requests)
        whole: list[int] = []
        ranged: dict[bytes, list[int]] = {}
        size_of: dict[bytes, int] = {}
        for i, (r, size) in enumerate(zip(requests, sizes)):
            if size is None:
                continue  # a miss
            n = nbytes_of(r.dest)
            if r.offset < 0 or r.offset + n > size:
                raise ValueError(f"range [{r.offset}, {r.offset + n}) outside an object of {size} bytes")
            if r.offset == 0 and n == size:
                whole.append(i)
            else:
                ranged.setdefault(r.key, []).append(i)
                size_of[r.key] = size
        tmp = {k: torch.empty(size_of[k], dtype=torch.uint8) for k in ranged}
        res = await self._read_many([requests[i] for i in whole] + [ReadRequest(k, t) for k, t in tmp.items()])
        for i, ok in zip(whole, res):
            out[i] = ok
        for (k, idx), ok in zip(ranged.items(), res[len(whole):]):
            if not ok:
                continue
            for i in idx:
                r = requests[i]
                src = tmp[k][r.offset : r.offset + nbytes_of(r.dest)]
                if r.offset % r.dest.element_size():
                    src = src.clone()  # a dtype view needs an element-aligned start
                r.dest.copy_(src.view(r.dest.dtype).view(r.dest.shape))
                out[i] = True
        self.counters["whole_object_reads"] += len(tmp)
        return out

    async def _read_many(self, requests: Sequence[ReadRequest]) -> list[bool]:
        if not self.queued:  # a memory tier: nothing to queue for, go straight through
            t0 = time.perf_counter()
            res = await self.backend.read_many(requests)
            self._account_read(requests, res, time.perf_counter() - t0)
            return res
        groups = self._cut([nbytes_of(r.dest) for r in requests])

        async def one(rank: int, g: range) -> list[bool]:
            sub = [requests[i] for i in g]
            t0 = time.perf_counter()
            res = await self._run(lambda: self.backend.read_many(sub), rank, sum(nbytes_of(r.dest) for r in sub))
            self._account_read(sub, res, time.perf_counter() - t0)
            return res

        if len(groups) == 1:
            return await one(0, groups[0])
        parts = await gather_settled(*(one(r, g) for r, g in enumerate(groups)))
        return [ok for p in parts for ok in p]

    async def read_into(self, key: bytes, dest: torch.Tensor, offset: int = 0) -> bool:
        return (await self.read_many([ReadRequest(key, dest, offset)]))[0]

    async def write_many(self, items: Sequence[tuple[bytes, torch.Tensor]]) -> None:
        if not items:
            return
        if not self.queued:
            await self.backend.write_many(items)
            self.bytes["written"] += sum(nbytes_of(s) for _, s in items)
            return
        groups = self._cut([nbytes_of(s) for _, s in items])

        async def one(rank: int, g: range) -> None:
            sub = [items[i] for i in g]
            await self._run(lambda: self.backend.write_many(sub), rank, sum(nbytes_of(s) for _, s in sub))
            self.bytes["written"] += sum(nbytes_of(s) for _, s in sub)

        if len(groups) == 1:  # the common case: no task per group
            await one(0, groups[0])
        else:
            await gather_settled(*[one(r, g) for r, g in enumerate(groups)])

    async def write(self, key: bytes, src: torch.Tensor) -> None:
        await self.write_many([(key, src)])

    # --- membership and deletes: metadata, no bytes --------------------------------------------------------
    async def _meta(self, fn: Callable[[], Awaitable[T]]) -> T:
        """A membership query or delete: queued as a zero-byte operation on a remote tier (a round trip on
        the data's connection), straight through on a local one (an index lookup in memory)."""
        self.counters["ops_meta"] += 1
        if self.remote and self.queued:
            return await self._run(fn)
        return await fn()

    async def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        if not keys:
            return []
        return await self._meta(lambda: self.backend.contains_many(keys))

    async def contains(self, key: bytes) -> bool:
        return await self._meta(lambda: self.backend.contains(key))

    async def delete(self, key: bytes) -> bool:
        return await self._meta(lambda: self.backend.delete(key))

    async def object_size(self, key: bytes) -> int | None:
        return await self._meta(lambda: self.backend.object_size(key))

    def _account_read(self, reqs: Sequence[ReadRequest], res: Sequence[bool], dt: float) -> None:
        n = sum(nbytes_of(r.dest) for r, ok in zip(reqs, res) if ok)
        self.bytes["read"] += n
        if n and dt > 0 and io_priority.get() == Priority.FOREGROUND:
            self._recent_bps = 0.8 * self._recent_bps + 0.2 * (n / dt) if self._recent_bps else n / dt

    def stats(self) -> dict[str, Any]:
        return {
            "queued": len(self._heap),
            "running": self._running,
            **self.counters,
            "bytes_read": self.bytes["read"],
            "bytes_written": self.bytes["written"],
            "recent_read_Bps": round(self._recent_bps),
            "wait_s": {k: round(v, 6) for k, v in self.wait_time.items()},
        }
