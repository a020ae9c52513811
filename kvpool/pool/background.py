"""The pool's background work: write-back, promotion and prefetch, each bounded in bytes.

- **Write-back** (``write_policy="write-back"``): a put returns once the first tier holds its chunks; one
  worker copies them to the lower tiers under :attr:`Priority.WRITE_BACK`. The queue holds at most
  ``write_back_queue_bytes`` of chunks; a put that would exceed it **waits** (back-pressure) until the
  worker has made room, so the queue, the memory and the number of tasks stay bounded, and a chunk is not
  evicted from the first tier by newer puts before it has reached the tiers below.
- **Promotion** (``promote_on_hit``): after a restore has returned, chunks it found in a lower tier are
  read *again* from that tier (not copied out of the caller's tensor, which the caller may already be
  reusing) and written into the tiers above it, under :attr:`Priority.PROMOTION`. At most
  ``promotion_queue_bytes`` are queued; beyond that a promotion is **dropped and counted**
  (``promotions_dropped``): a promotion is an optimisation, never worth slowing a restore for.
- **Prefetch** (:meth:`KVPool.prefetch`): moves of at most ``promotion_queue_bytes`` in flight; more is
  dropped and counted (``prefetches_dropped``).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import torch

from ..config import PoolConfig
from .admission import SecondHit
from .scheduler import Priority, io_class
from .tiers import TIER_FAILURES, TierSet

__all__ = ["Background"]

_WB_BATCH_BYTES = 16 << 20


class Background:
    """Queues and workers for the pool's background copies.

    Parameters
    ----------
    tiers
        The pool's tiers.
    chunk_nbytes
        Bytes of one chunk (the unit every queue counts in).
    config
        Supplies the queue bounds and the promotion admission.
    counters
        The pool's counters, updated in place.
    buffer
        ``buffer(n)`` returns an ``[n, chunk_nbytes]`` uint8 tensor of the pool's staging memory (a worker
        holds one while it runs).
    """

    def __init__(self, tiers: TierSet, chunk_nbytes: int, config: PoolConfig, counters: dict[str, int],
                 buffer: Callable[[int], Awaitable[torch.Tensor]]) -> None:
        self._tiers = tiers
        self._buffer = buffer
        self._chunk = chunk_nbytes
        self._counters = counters
        self._wb_limit = config.write_back_queue_bytes
        self._promo_limit = config.promotion_queue_bytes
        self._always = config.promotion == "always"
        self._admission = SecondHit()
        self._tasks: set[asyncio.Task[None]] = set()
        self._wb: deque[bytes] = deque()
        self._wb_bytes = 0
        self._wb_worker: asyncio.Task[None] | None = None
        self._wb_waiters: list[asyncio.Future[None]] = []
        self._promo: deque[tuple[bytes, int]] = deque()
        self._promo_keys: set[bytes] = set()
        self._promo_worker: asyncio.Task[None] | None = None
        self._moving_bytes = 0
        # chunk key -> background move (prefetch) in flight; a restore of that key waits for it
        self.moving: dict[bytes, asyncio.Future[None]] = {}
        for name in ("promotions_dropped", "prefetches_dropped", "write_back_waits", "promotion_failures"):
            counters.setdefault(name, 0)

    # --- bookkeeping -------------------------------------------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @property
    def tasks(self) -> int:
        """Background tasks alive now (at most two workers plus the bounded prefetch moves)."""
        return len(self._tasks)

    def queued_bytes(self) -> dict[str, int]:
        """Bytes waiting in each queue."""
        return {"write_back": self._wb_bytes, "promotion": len(self._promo) * self._chunk,
                "prefetch": self._moving_bytes}

    async def drain(self) -> None:
        """Wait until every queue is empty and every background task has finished."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # --- write-back --------------------------------------------------------------------------------------
    async def write_back(self, keys: list[bytes]) -> None:
        """Queue ``keys`` (held by the first tier) for the lower tiers; wait while the queue is full."""
        if not keys:
            return
        need = len(keys) * self._chunk
        waited = False
        # a put larger than the whole queue is admitted alone, once the queue is empty
        while self._wb_bytes and self._wb_bytes + need > self._wb_limit:
            if not waited:
                self._counters["write_back_waits"] += 1
                waited = True
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._wb_waiters.append(fut)
            try:
                await fut
            finally:
                if fut in self._wb_waiters:
                    self._wb_waiters.remove(fut)
        self._wb.extend(keys)
        self._wb_bytes += need
        if self._wb_worker is None or self._wb_worker.done():
            self._wb_worker = self._spawn(self._run_write_back())

    def _wake_writers(self) -> None:
        waiters, self._wb_waiters = self._wb_waiters, []
        for f in waiters:
            if not f.done():
                f.set_result(None)

    async def _run_write_back(self) -> None:
        # one batch of chunks per round (one submission per lower tier), capped so the worker's buffer
        # stays small whatever the chunk size
        batch = max(1, min(64, _WB_BATCH_BYTES // self._chunk))
        buf = await self._buffer(batch)
        with io_class(Priority.WRITE_BACK):
            while self._wb:
                keys = [self._wb.popleft() for _ in range(min(batch, len(self._wb)))]
                try:
                    await self._write_back_batch(keys, [buf[i] for i in range(len(keys))])
                finally:
                    self._wb_bytes -= len(keys) * self._chunk
                    self._wake_writers()

    async def _write_back_batch(self, keys: list[bytes], bufs: list[torch.Tensor]) -> None:
        ts = self._tiers
        # gone from the first tier before it was written back: a cache may lose it (counted as a miss)
        n = await ts.read_views(keys, [0] * len(keys), bufs, 0)
        ok = [True] * n
        for c in range(n, len(keys)):  # read_views stops at the first unreadable chunk: try the rest alone
            ok.append(bool(await ts.read_views([keys[c]], [0], [bufs[c]], 0)))
        for t in range(1, len(ts)):
            have = await ts.contains(t, keys)
            if have is None:
                continue
            items = [(k, b) for k, b, h, r in zip(keys, bufs, have, ok) if r and not h]
            if not items:
                continue
            try:
                await ts.io[t].write_many(items)
                self._counters["write_backs"] += len(items)
            except TIER_FAILURES as exc:
                self._counters["write_back_failures"] += len(items)
                ts.fault(t, "write_failures", exc)

    # --- promotion ---------------------------------------------------------------------------------------
    def promote(self, keys: list[bytes], where: list[int]) -> None:
        """Queue the chunks a restore found below the first tier (admitted ones) for copying up; no wait."""
        for key, t in zip(keys, where):
            if t == 0 or key in self._promo_keys or key in self.moving:
                continue
            if not (self._always or self._admission.admit(key)):
                continue
            if (len(self._promo) + 1) * self._chunk > self._promo_limit:
                self._counters["promotions_dropped"] += 1
                continue
            self._promo.append((key, t))
            self._promo_keys.add(key)
        if self._promo and (self._promo_worker is None or self._promo_worker.done()):
            self._promo_worker = self._spawn(self._run_promotions())

    async def _run_promotions(self) -> None:
        buf = (await self._buffer(1))[0]
        with io_class(Priority.PROMOTION):
            while self._promo:
                key, t = self._promo.popleft()
                try:
                    await self._copy_up(key, t, buf)
                finally:
                    self._promo_keys.discard(key)

    async def _copy_up(self, key: bytes, t: int, buf: torch.Tensor) -> bool:
        """Read ``key`` from tier ``t`` into ``buf`` and write it into every tier above; False if unread."""
        ts = self._tiers
        if not await ts.read_views([key], [t], [buf], 0):
            return False  # evicted meanwhile: nothing to promote
        for upper in range(t):
            try:
                await ts.io[upper].write(key, buf)
                self._counters["promotions"] += 1
            except TIER_FAILURES as exc:  # a full or failing upper tier skips it
                self._counters["promotion_failures"] += 1
                ts.fault(upper, "write_failures", exc)
        return True

    # --- prefetch ----------------------------------------------------------------------------------------
    def prefetch(self, keys: list[bytes], where: list[int]) -> bool:
        """Start moving the chunks below the first tier up; False when nothing was started."""
        todo = [(k, t) for k, t in zip(keys, where) if t > 0 and k not in self.moving]
        if not todo:
            return False
        need = len(todo) * self._chunk
        if self._moving_bytes and self._moving_bytes + need > self._promo_limit:
            self._counters["prefetches_dropped"] += 1
            return False
        loop = asyncio.get_running_loop()
        futs = {k: loop.create_future() for k, _ in todo}
        self.moving.update(futs)
        self._moving_bytes += need
        self._spawn(self._move_up(todo, futs, need))
        return True

    async def _move_up(self, todo: list[tuple[bytes, int]], futs: dict[bytes, asyncio.Future[None]],
                       need: int) -> None:
        try:
            buf = (await self._buffer(1))[0]
            with io_class(Priority.PREFETCH):
                for k, t in todo:
                    try:
                        await self._copy_up(k, t, buf)
                    finally:
                        self.moving.pop(k, None)
                        if not futs[k].done():
                            futs[k].set_result(None)
        finally:
            self._moving_bytes -= need
            for k, f in futs.items():
                self.moving.pop(k, None)
                if not f.done():
                    f.set_result(None)

    async def join_moves(self, keys: list[bytes]) -> bool:
        """Wait for the prefetch moves of ``keys`` in flight; True if there were any."""
        if not self.moving:
            return False
        pending = [self.moving[k] for k in keys if k in self.moving]
        if not pending:
            return False
        await asyncio.gather(*(asyncio.shield(f) for f in pending))
        return True
