"""The tier logic under the façade: locate chunks, read them with fallback, store them across tiers.

kvpool is a cache, so a tier's failure is that tier's problem: a tier that is down, full, out of space or
times out during a put is skipped and counted (``stats()["tiers"][i]["faults"]``), and the chunk goes to
every other tier that can take it; a put raises only when no tier could store its first chunk. A read that
fails in one tier falls back to the tiers below; a membership query that fails counts as "not there".
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import attrs
import torch

from ..config import PoolConfig
from ..errors import BackendError, CapacityError, ConfigError, PoolClosedError
from ..storage.backend import Backend, ReadRequest, nbytes_of
from ..storage.registry import backend_from_spec
from ..striped.backend import StripedBackend
from .intents import Slot, WriteIntents
from .scheduler import TierScheduler

__all__ = ["TierSet", "StoreResult", "TIER_FAILURES", "tier_from_spec"]

# What a tier raises when *it* fails (down, EIO, ENOSPC, full, timeout, closed under us). Anything else
# (TypeError, a plain ValueError, NotImplementedError) is the caller's error or a bug and propagates.
TIER_FAILURES: tuple[type[BaseException], ...] = (CapacityError, BackendError, PoolClosedError, OSError)

_FAULT_NAMES = ("write_failures", "capacity_skips", "contains_failures", "read_failures", "delete_failures")


@attrs.define
class StoreResult:
    """What one put achieved.

    Attributes
    ----------
    stored
        Number of leading chunks held by at least one tier (the put's acknowledged prefix).
    written
        Chunks this call wrote (summed over tiers).
    skipped
        Chunks a tier already held (summed over tiers).
    top
        Indices of the chunks (within ``stored``) the first tier holds: what write-back copies down.
    """

    stored: int
    written: int = 0
    skipped: int = 0
    top: list[int] = attrs.field(factory=list)


def tier_from_spec(spec: Any) -> Backend:
    """A spec string or backend object is one tier; a list of them is one tier striped across them."""
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ConfigError("a striped tier needs at least one backend")
        striped: Backend = StripedBackend.from_specs(list(spec))
        return striped
    return backend_from_spec(spec)


def _cut(sizes: Sequence[int], limit: int) -> list[list[int]]:
    """Indices grouped into runs of at most ``limit`` bytes (one scheduler operation each)."""
    out: list[list[int]] = []
    cur: list[int] = []
    acc = 0
    for i, n in enumerate(sizes):
        if cur and acc + n > limit:
            out.append(cur)
            cur, acc = [], 0
        cur.append(i)
        acc += n
    if cur:
        out.append(cur)
    return out


class TierSet:
    """The pool's tiers (fastest first), their schedulers, fault counters and write intents.

    Parameters
    ----------
    tiers
        Open backends, fastest first.
    config
        Supplies the per-tier scheduler settings.
    """

    def __init__(self, tiers: Sequence[Backend], config: PoolConfig) -> None:
        self.tiers: list[Backend] = list(tiers)
        # every data call to a tier goes through its scheduler (priorities, deadlines, queue depth)
        self.io = [
            TierScheduler(t, max_inflight=config.io_max_inflight, max_inflight_bytes=config.io_max_inflight_bytes,
                          background_inflight=config.io_background_inflight, op_bytes=config.io_op_bytes)
            for t in self.tiers
        ]
        self.faults: list[dict[str, int]] = [dict.fromkeys(_FAULT_NAMES, 0) for _ in self.tiers]
        self.intents = WriteIntents()
        self.last_error: list[str] = ["" for _ in self.tiers]

    def __len__(self) -> int:
        return len(self.tiers)

    def fault(self, t: int, what: str, exc: BaseException | None = None) -> None:
        self.faults[t][what] += 1
        if exc is not None:
            self.last_error[t] = f"{what}: {exc!r}"[:300]

    # --- membership --------------------------------------------------------------------------------------
    async def contains(self, t: int, keys: Sequence[bytes]) -> list[bool] | None:
        """Which of ``keys`` tier ``t`` holds, or None when the tier failed to answer (counted)."""
        try:
            return list(await self.io[t].contains_many(keys))
        except TIER_FAILURES as exc:
            self.fault(t, "contains_failures", exc)
            return None

    async def locate(self, keys: list[bytes]) -> list[int]:
        """For the longest prefix of ``keys`` held somewhere: the index of the fastest tier holding each.

        The fastest tier is asked about every key; each lower tier only about the keys the tiers above it
        lack, so the remote round trip (the last tier, usually) is made only when a faster tier misses.
        The answer stops at the first chunk no tier holds.
        """
        where = [-1] * len(keys)
        missing = list(range(len(keys)))
        for t in range(len(self.tiers)):
            if not missing:
                break
            got = await self.contains(t, [keys[i] for i in missing])
            if got is None:
                continue
            still: list[int] = []
            for i, f in zip(missing, got):
                if f:
                    where[i] = t
                else:
                    still.append(i)
            missing = still
        n = next((i for i, w in enumerate(where) if w < 0), len(where))
        return where[:n]

    # --- reads -------------------------------------------------------------------------------------------
    async def _read_tier(self, t: int, reqs: list[ReadRequest]) -> list[bool]:
        try:
            return list(await self.io[t].read_many(reqs))
        except TIER_FAILURES as exc:  # a failing tier's reads are misses; lower tiers may have the chunks
            self.fault(t, "read_failures", exc)
            return [False] * len(reqs)

    async def read_views(self, keys: list[bytes], where: list[int], views: list[torch.Tensor], offset: int) -> int:
        """Read chunk ``c`` into ``views[c]`` from tier ``where[c]`` (falling back to lower tiers that hold
        it, and updating ``where``); return the number of leading chunks that were read."""
        nch = len(where)
        ok = [False] * nch
        by_tier: dict[int, list[int]] = {}
        for c, t in enumerate(where):
            by_tier.setdefault(t, []).append(c)

        async def run(t: int, cs: list[int]) -> None:
            res = await self._read_tier(t, [ReadRequest(keys[c], views[c], offset) for c in cs])
            for c, r in zip(cs, res):
                ok[c] = r

        if len(by_tier) == 1:  # the common case: no task per tier
            await run(*next(iter(by_tier.items())))
        else:
            await asyncio.gather(*(run(t, cs) for t, cs in by_tier.items()))
        # A tier that failed a read (evicted meanwhile, corrupt, down) is not the last word.
        for c in range(nch):
            if ok[c]:
                continue
            for t in range(where[c] + 1, len(self.tiers)):
                if (await self._read_tier(t, [ReadRequest(keys[c], views[c], offset)]))[0]:
                    where[c] = t
                    ok[c] = True
                    break
            if not ok[c]:
                return c
        return nch

    # --- writes ------------------------------------------------------------------------------------------
    async def store(self, keys: list[bytes], views: list[torch.Tensor], *, write_back: bool) -> StoreResult:
        """Store chunk ``i`` (``views[i]`` under ``keys[i]``) in every tier that can take it.

        With ``write_back`` only the first tier is written, plus the lower tiers for the chunks the first
        tier could not take. Returns what was achieved; raises only when no tier could store the first
        chunk (the error of the fastest tier that failed), or for a caller error. Whatever the outcome, no
        write of this call is still running when it returns or raises, and a rollback (failure,
        cancellation) deletes only chunks no concurrent call relies on.
        """
        n = len(keys)
        everywhere = list(range(len(self.tiers)))
        slots: list[Slot] = [(t, k) for t in everywhere for k in keys]
        waits = self.intents.claim(slots)
        wrote: list[Slot] = []
        held = [[False] * n for _ in self.tiers]
        errors: list[BaseException] = []
        res = StoreResult(stored=0)
        try:
            if waits:  # a concurrent rollback is deleting some of these slots: look only after it is done
                await asyncio.gather(*(asyncio.shield(w) for w in waits))
            first = [0] if write_back and len(self.tiers) > 1 else everywhere
            await self._store_in(first, list(range(n)), keys, views, held, wrote, errors, res)
            if first != everywhere:  # write-back: what the first tier could not take goes down now
                rest = [i for i in range(n) if not held[0][i]]
                if rest:
                    await self._store_in(everywhere[1:], rest, keys, views, held, wrote, errors, res)
            stored = next((i for i in range(n) if not any(h[i] for h in held)), n)
            if stored == 0 and n:
                raise _best(errors)
            res.stored = stored
            res.top = [i for i in range(stored) if held[0][i]]
            # chunks after the first gap are unreachable by prefix: give their space back
            late = set(keys[stored:])
            beyond = [(t, k) for (t, k) in wrote if k in late]
            if beyond:
                await self._rollback(beyond)
            self.intents.keep((t, k) for t in everywhere for k in keys[:stored])
            return res
        except BaseException:
            await self._rollback(wrote)
            raise
        finally:
            self.intents.release(slots)

    async def _store_in(
        self,
        targets: list[int],
        idx: list[int],
        keys: list[bytes],
        views: list[torch.Tensor],
        held: list[list[bool]],
        wrote: list[Slot],
        errors: list[BaseException],
        res: StoreResult,
    ) -> None:
        outcome = await asyncio.gather(
            *(self._store_tier(t, idx, keys, views, held[t], wrote, errors, res) for t in targets),
            return_exceptions=True,
        )
        # every tier's writes have finished here (gather waited for all): now a caller error may propagate
        for r in outcome:
            if isinstance(r, BaseException):
                raise r

    async def _store_tier(
        self,
        t: int,
        idx: list[int],
        keys: list[bytes],
        views: list[torch.Tensor],
        held: list[bool],
        wrote: list[Slot],
        errors: list[BaseException],
        res: StoreResult,
    ) -> None:
        tier, io = self.tiers[t], self.io[t]
        have = await self.contains(t, [keys[i] for i in idx])
        if have is None:  # the tier cannot even answer: skip it for this put
            self.faults[t]["write_failures"] += 1
            errors.append(BackendError(f"tier {t} ({tier.scheme}) did not answer"))
            return
        todo: list[int] = []
        for i, h in zip(idx, have):
            if h:
                held[i] = True
                res.skipped += 1
            else:
                todo.append(i)
        cap = tier.capacity
        if cap is not None and todo:
            # A put bigger than the tier: write only the leading chunks that fit at all (the rest go to the
            # lower tiers); writing more would only evict this put's own first chunks again.
            room = cap - sum(nbytes_of(views[i]) for i in idx if held[i])
            fit = 0
            for i in todo:
                room -= nbytes_of(views[i])
                if room < 0:
                    break
                fit += 1
            if fit < len(todo):
                self.fault(t, "capacity_skips")
                errors.append(CapacityError(f"tier {t} ({tier.scheme}) of {cap} bytes cannot hold this put"))
                todo = todo[:fit]
        if not todo:
            return
        groups = [[todo[j] for j in g] for g in _cut([nbytes_of(views[i]) for i in todo], io.op_bytes)]

        async def one(g: list[int]) -> None:
            wrote.extend((t, keys[i]) for i in g)  # a failed batch may have landed in part
            await io.write_many([(keys[i], views[i]) for i in g])

        outcome = await asyncio.gather(*(one(g) for g in groups), return_exceptions=True)
        failure: BaseException | None = None
        for g, r in zip(groups, outcome):
            if r is None:
                for i in g:
                    held[i] = True
                res.written += len(g)
            elif isinstance(r, TIER_FAILURES):
                self.fault(t, "capacity_skips" if isinstance(r, CapacityError) else "write_failures", r)
                errors.append(r)
            else:
                failure = failure or r
        if failure is not None:
            raise failure

    async def _rollback(self, wrote: list[Slot]) -> None:
        """Delete what this call wrote and nobody else relies on; wait for concurrent claimants first."""
        doomed, fut = self.intents.doomed(wrote)
        try:
            for t, k in doomed:
                await self.delete_in(t, k)
        finally:
            if not fut.done():
                fut.set_result(None)

    async def delete_all(self, keys: list[bytes]) -> int:
        """Delete ``keys`` from every tier; return how many were stored somewhere. A down tier is counted
        (``delete_failures``), not raised: a delete from a cache only has to make the chunks unreadable
        through the tiers that answer."""
        removed: set[int] = set()
        for t in range(len(self.tiers)):
            for i, k in enumerate(keys):
                if await self.delete_in(t, k):
                    removed.add(i)
        return len(removed)

    async def delete_in(self, t: int, key: bytes) -> bool:
        """Delete ``key`` from tier ``t``; a tier that fails is counted, not raised."""
        try:
            return await self.io[t].delete(key)
        except TIER_FAILURES as exc:
            self.fault(t, "delete_failures", exc)
            return False


def _best(errors: list[BaseException]) -> BaseException:
    """The error to raise when no tier could store a chunk: capacity if every tier was full."""
    if not errors:
        return BackendError("no tier could store the chunk")
    if all(isinstance(e, CapacityError) for e in errors):
        return errors[0]
    return next(e for e in errors if not isinstance(e, CapacityError))
