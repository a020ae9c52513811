"""The read side of ``mooncake://``: fetching values (zero-copy into the transfer buffer, or as ``bytes``),
range reads over parts in two rounds (headers, then the covering parts) pipelined in batches, sizes and
membership. Every fault is a miss, counted (the base's boundary)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence

from ...storage.backend import ReadRequest
from ..base import Ident, Plan, Value
from ..format import Header, bytes_address, hdr_len
from . import client as mc
from . import options as opt
from .core import MooncakeCore
from .regions import Region, batches

# How long a read waits for a value that is being written (Mooncake answers "replica not ready" meanwhile).
_NOT_READY_WAIT = 0.5
# A header slot is sized for the range asked for plus this many more parts' checksums.
_SLACK_PARTS = 64

# a value (or error code) per name, and the buffer regions holding them (the caller releases them)
_Fetched = tuple[list[Value | int], list[Region]]


class MooncakeReads(MooncakeCore):
    """Reads, sizes and membership of :class:`~kvpool.remote.mooncake.MooncakeBackend`."""

    # --- fetching values -----------------------------------------------------------------------------------
    async def _fetch(self, names: Sequence[str], slots: Sequence[int], deadline: float, *, exact: bool) -> _Fetched:
        """Fetch the values of ``names`` (each at most ``slots[i]`` bytes, exactly that if ``exact``); a value
        or an error code per name. Values being written are waited for a while."""
        out: list[Value | int] = [mc.OBJECT_NOT_FOUND] * len(names)
        regions: list[Region] = []
        loop = asyncio.get_running_loop()
        ready_by = min(deadline, loop.time() + _NOT_READY_WAIT)
        todo = list(range(len(names)))
        delay = 0.001
        try:
            region: Region | None = None
            offs: list[int] = []
            if self.zero_copy:
                offs = list(itertools.accumulate((opt.round_up(s) for s in slots), initial=0))
                region = await self._acquire(offs[-1], deadline)
                regions.append(region)
            while True:
                sub = [names[i] for i in todo]
                if region is not None:
                    assert self._buf is not None
                    codes = await self._call(
                        deadline, self._store.batch_get_into, sub, [region.ptr + offs[i] for i in todo],
                        [slots[i] for i in todo], region=region,
                    )
                    for i, c in zip(todo, codes):
                        c = int(c)
                        out[i] = self._buf.view(region, offs[i], c) if c >= 0 else c
                else:
                    vals = await self._call(deadline, self._store.get_batch, sub)
                    empty = []
                    for i, v in zip(todo, vals):
                        if v:
                            b = bytes(v)
                            out[i] = Value(memoryview(b), bytes_address(b), b)
                        else:
                            empty.append(i)
                    if empty:
                        # an empty answer is a missing value or one being written: ask which
                        ex = await self._call(deadline, self._store.batch_is_exist, [names[i] for i in empty])
                        for i, e in zip(empty, ex):
                            e = int(e)
                            out[i] = mc.REPLICA_IS_NOT_READY if e == 1 else (mc.OBJECT_NOT_FOUND if e == 0 else e)
                for i in todo:
                    v = out[i]
                    if isinstance(v, int):
                        mc.check_code(v, "fetching values")
                todo = [i for i in todo if isinstance(out[i], int) and out[i] in mc.NOT_READY_CODES]
                if not todo or loop.time() + delay > ready_by:
                    break
                await asyncio.sleep(delay)
                delay = min(2 * delay, 0.02)
            if exact:
                for i, v in enumerate(out):
                    if isinstance(v, Value) and len(v.mv) != slots[i]:
                        out[i] = mc.INVALID_PARAMS
        except BaseException:
            self._release(regions)
            raise
        return out, regions

    async def _fetch_headers(self, names: Sequence[str], guesses: Sequence[int], deadline: float) -> _Fetched:
        """Header values (with the data of inline objects) into slots sized from the ranges asked for; the
        few that do not fit are measured and fetched again."""
        out, regions = await self._fetch(names, guesses, deadline, exact=False)
        big = [i for i, v in enumerate(out) if isinstance(v, int) and v in mc.TOO_SMALL_CODES]
        if not self.zero_copy or not big:
            return out, regions
        try:
            sizes = await self._call(deadline, self._sizes, [names[i] for i in big])
            for s in sizes:
                mc.check_code(s, "measuring values")
            fit = [(i, s) for i, s in zip(big, sizes) if 0 < s <= self._budget]
            for i, s in zip(big, sizes):
                if s <= 0 or s > self._budget:
                    out[i] = s if s < 0 else mc.INVALID_PARAMS
            if fit:
                vals, more = await self._fetch([names[i] for i, _ in fit], [s for _, s in fit], deadline, exact=False)
                regions.extend(more)
                for (i, _), v in zip(fit, vals):
                    out[i] = v
        except BaseException:
            self._release(regions)
            raise
        return out, regions

    def _sizes(self, names: Sequence[str]) -> list[int]:
        return [int(self._store.get_size(n)) for n in names]

    # --- reads -------------------------------------------------------------------------------------------
    def _guess(self, offset: int, nbytes: int) -> int:
        """Slot for a header value when the range ``[offset, offset+nbytes)`` is read: exact for an inline
        object that ends there, room for ``_SLACK_PARTS`` more checksums for a multi-part one."""
        end = max(offset + nbytes, 1)
        ps = self.part_size
        inline = opt.INLINE_OFF + end if end <= ps else 0
        return max(inline, hdr_len(-(-end // ps) + _SLACK_PARTS))

    async def _read_statuses(
        self, reqs: Sequence[ReadRequest], names: list[str], sizes: list[int], status: list[str | None]
    ) -> None:
        deadline = asyncio.get_running_loop().time() + self._deadline(sum(sizes))
        guesses = [self._guess(r.offset, n) for r, n in zip(reqs, sizes)]

        async def fetch(idxs: list[int]) -> tuple[dict[str, Value | int], list[Region]]:
            # round 1 of a read: the header values (small objects come with their data)
            slot: dict[str, int] = {}
            for i in idxs:
                slot[names[i]] = max(slot.get(names[i], 0), guesses[i])
            uniq = list(slot)
            values, regions = await self._fetch_headers(uniq, [slot[n] for n in uniq], deadline)
            return dict(zip(uniq, values)), regions

        async def finish(idxs: list[int], fetched: tuple[dict[str, Value | int], list[Region]]) -> None:
            await self._finish_group(reqs, names, sizes, idxs, fetched, status, deadline)

        await self._pipeline(list(batches(guesses, self._chunk)), fetch, finish, lambda f: self._release(f[1]))
        # a value replaced while we read it fails verification: read those once more
        again = [i for i in range(len(reqs)) if status[i] == "corrupt"]
        if again:
            self.counters["retries"] += len(again)
            for idxs in batches([guesses[i] for i in again], self._chunk):
                group = [again[k] for k in idxs]
                await finish(group, await fetch(group))

    async def _finish_group(
        self, reqs: Sequence[ReadRequest], names: list[str], sizes: list[int], idxs: list[int],
        fetched: tuple[dict[str, Value | int], list[Region]], status: list[str | None], deadline: float,
    ) -> None:
        by_name, regions = fetched
        plans: list[Plan] = []
        try:
            hdrs: dict[str, Header | None] = {}
            for i in idxs:
                v = by_name[names[i]]
                got = self._plan(i, reqs[i], names[i], sizes[i], mc.code_status(v, "absent") if isinstance(v, int)
                                 else v, hdrs)
                if isinstance(got, str):
                    status[i] = got
                else:
                    plans.append(got)
            # inline objects: verified and copied while their bytes are in the buffer
            inline = [pl for pl in plans if pl.hdr.inline]
            if inline:
                await self._cpu(sum(pl.hdr.length for pl in inline), self._finish_inline, inline)
                for pl in inline:
                    status[pl.index] = pl.status
        finally:
            self._release(regions)
        # round 2: the parts covering the ranges of multi-part objects
        multi = [pl for pl in plans if not pl.hdr.inline]
        if multi:
            await self._read_parts(multi, deadline)
            for pl in multi:
                status[pl.index] = pl.status

    async def _read_parts(self, plans: list[Plan], deadline: float) -> None:
        want, wnames, wlens, users = self._part_wants(plans)

        async def fetch(batch: list[int]) -> _Fetched:
            if all(pl.status != "ok" for b in batch for pl in users[want[b]]):
                return [], []
            return await self._fetch([wnames[b] for b in batch], [wlens[b] for b in batch], deadline, exact=True)

        async def apply(batch: list[int], fetched: _Fetched) -> None:
            vals, regions = fetched
            try:
                if vals:
                    items: list[tuple[Ident, Value | str, list[Plan]]] = [
                        (want[b], mc.code_status(v, "missing_parts") if isinstance(v, int) else v, users[want[b]])
                        for b, v in zip(batch, vals)
                    ]
                    await self._cpu(sum(wlens[b] for b in batch), self._apply_parts, items)
            finally:
                self._release(regions)

        await self._pipeline(list(batches(wlens, self._chunk)), fetch, apply, lambda f: self._release(f[1]))
        done = [pl for pl in plans if pl.filler is not None]
        await self._cpu(sum(pl.nbytes for pl in done if pl.status == "ok"), self._finish_fillers, done)

    # --- membership --------------------------------------------------------------------------------------
    async def _exists(self, names: list[str]) -> list[bool]:
        res = await self._call(asyncio.get_running_loop().time() + self.timeout, self._store.batch_is_exist, names)
        codes = [int(x) for x in res]
        for c in codes:
            mc.check_code(c, "looking keys up")
        if any(c < 0 for c in codes):
            self.counters["errors"] += 1
        return [c == 1 for c in codes]
