"""The write side of ``mooncake://``: parts under a fresh version first, then the headers (inline objects
with their data) upserted over what was there, each stage pipelined in batches through the transfer buffer;
the replaced version's parts removed later; and deletes."""

from __future__ import annotations

import asyncio
import ctypes
import itertools
from typing import Any

import xxhash

from ..base import Item
from ..format import hdr_len, part_seed
from . import client as mc
from . import options as opt
from .core import MooncakeCore
from .regions import Region, batches


class _Prepared:
    """A batch of values ready to be written: in the transfer buffer (``region``) or as ``vals``."""

    __slots__ = ("names", "lens", "region", "offs", "vals")

    def __init__(self, names: list[str], lens: list[int], region: Region | None, offs: list[int], vals: list[Any]) -> None:
        self.names = names
        self.lens = lens
        self.region = region
        self.offs = offs
        self.vals = vals


class MooncakeWrites(MooncakeCore):
    """Writes and deletes of :class:`~kvpool.remote.mooncake.MooncakeBackend`."""

    async def _write_items(self, objs: list[Item], total: int) -> None:
        names = [o.name for o in objs]
        deadline = asyncio.get_running_loop().time() + self._deadline(total)
        written_parts: list[str] = []
        olds: list[Any] = []
        # what each write replaces (to remove its parts later), read while the parts go out; it must be read
        # before the new header is
        olds_task = asyncio.ensure_future(self._fixed_headers(names, deadline))
        try:
            # 1. the parts of multi-part objects, under fresh names
            units = [(o, p) for o in objs if not o.inline for p in range(o.nparts)]
            part_batches = [[units[b] for b in batch] for batch in batches([o.part_len(p) for o, p in units],
                                                                           self._chunk)]
            written_parts = [self._part_name(o.name, o.version, p) for o, p in units]
            await self._pipeline(
                part_batches,
                lambda sub: self._prepare_parts(sub, deadline),
                lambda sub, prep: self._send(prep, deadline, "put"),
                self._discard_prepared,
            )
            olds = await olds_task
            # 2. the headers, and the inline objects, replacing what was there (once one may be written, the
            # parts are no longer ours to remove on failure)
            written_parts = []
            hlens = [hdr_len(o.nparts) + (o.nbytes if o.inline else 0) for o in objs]
            await self._pipeline(
                [[objs[b] for b in batch] for batch in batches(hlens, self._chunk)],
                lambda sub: self._prepare_headers(sub, deadline),
                lambda sub, prep: self._send(prep, deadline, "upsert"),
                self._discard_prepared,
            )
        except BaseException:
            if written_parts:
                self._schedule_removal(written_parts, 0.0)
            raise
        finally:
            if not olds_task.done():
                olds_task.cancel()
                await asyncio.wait({olds_task})
            if not olds_task.cancelled():
                olds_task.exception()
        replaced = [
            n for o, old in zip(objs, olds) for n in self._old_parts(o.name, None if isinstance(old, int) else old,
                                                                     o.version)
        ]
        if replaced:
            self._schedule_removal(replaced, self.grace)

    def _copy_parts(self, sub: list[tuple[Item, int]], region: Region | None, offs: list[int]) -> list[Any]:
        """Checksum each part (and copy it into the transfer buffer when there is one); return the values the
        plain calls take otherwise. Pure CPU work."""
        vals: list[Any] = []
        for (o, p), off in zip(sub, offs):
            src = o.part(p)
            if region is not None:
                assert self._buf is not None
                self._buf.tensor(region, off, src.numel()).copy_(src)
                mv = self._buf.view(region, off, src.numel()).mv
            else:
                mv = src.numpy().data.cast("B")
                vals.append(mv)
            o.sums[p] = xxhash.xxh3_64_intdigest(mv, part_seed(o.key, p))
        return vals

    async def _prepare_parts(self, sub: list[tuple[Item, int]], deadline: float) -> _Prepared:
        """Checksum a batch of parts (copied into the transfer buffer for zero-copy)."""
        lens = [o.part_len(p) for o, p in sub]
        names = [self._part_name(o.name, o.version, p) for o, p in sub]
        return await self._prepare(names, lens, sum(lens), self._copy_parts, sub, deadline)

    async def _prepare_headers(self, objs: list[Item], deadline: float) -> _Prepared:
        """Build a batch of header values (inline objects with their data)."""
        lens = [hdr_len(o.nparts) + (o.nbytes if o.inline else 0) for o in objs]
        work = sum(o.nbytes for o in objs if o.inline)
        return await self._prepare([o.name for o in objs], lens, work, self._build_headers, objs, deadline)

    async def _prepare(self, names: list[str], lens: list[int], work: int, build: Any, sub: Any,
                       deadline: float) -> _Prepared:
        offs = list(itertools.accumulate((opt.round_up(n) for n in lens), initial=0))
        if not self.zero_copy:
            return _Prepared(names, lens, None, offs, await self._cpu(work, build, sub, None, offs))
        region = await self._acquire(offs[-1], deadline)
        try:
            await self._cpu(work, build, sub, region, offs)
        except BaseException:
            self._release([region])
            raise
        return _Prepared(names, lens, region, offs, [])

    def _discard_prepared(self, prep: _Prepared) -> None:
        self._release([prep.region])

    async def _send(self, prep: _Prepared, deadline: float, how: str) -> None:
        """Write a prepared batch: ``put`` (fresh names) or ``upsert`` (replacing)."""
        what = "writing parts" if how == "put" else "writing headers"
        try:
            if prep.region is None:
                fn = self._store.put_batch if how == "put" else self._store.upsert_batch
                rc = int(await self._call(deadline, fn, prep.names, prep.vals, self._config))
                self._check_write([rc], what)
                return
            fn = self._store.batch_put_from if how == "put" else self._store.batch_upsert_from
            codes = await self._call(
                deadline, fn, prep.names, [prep.region.ptr + o for o in prep.offs[:-1]], prep.lens, self._config,
                region=prep.region,
            )
            self._check_write([int(c) for c in codes], what)
        finally:
            self._release([prep.region])

    def _build_headers(self, objs: list[Item], region: Region | None, offs: list[int]) -> list[Any]:
        """Header values (an inline object's data copied after its header and checksummed there); written
        into the transfer buffer when there is one, else returned as bytes. Pure CPU work."""
        vals: list[Any] = []
        for o, off in zip(objs, offs):
            if o.inline:
                if region is not None:
                    assert self._buf is not None
                    self._buf.tensor(region, off + opt.INLINE_OFF, o.nbytes).copy_(o.flat)
                    data = self._buf.view(region, off + opt.INLINE_OFF, o.nbytes).mv
                else:
                    data = o.flat.numpy().data.cast("B")
                o.sums[0] = xxhash.xxh3_64_intdigest(data, part_seed(o.key, 0))
            hdr = self.wire.pack_header(o.key, o.nbytes, self.part_size, o.version, o.sums, o.inline)
            if region is not None:
                ctypes.memmove(region.ptr + off, hdr, len(hdr))
            else:
                vals.append(hdr + o.flat.numpy().tobytes() if o.inline else hdr)
        return vals

    def _check_write(self, codes: list[int], what: str) -> None:
        for c in codes:
            mc.check_code(c, what)
        bad = [c for c in codes if c != 0]
        if bad:
            raise mc.ClientError(f"{what}: Mooncake refused {len(bad)} value(s) (code {bad[0]})")

    # --- deletes -----------------------------------------------------------------------------------------
    async def _delete(self, key: bytes, name: str) -> bool:
        old = await self._fixed_header(key, name)
        codes = await self._remove([name, *self._old_parts(name, old)])
        mc.check_code(codes[0], "deleting an object")
        if codes[0] != 0 and codes[0] not in mc.ABSENT_CODES:
            raise mc.ClientError(f"deleting an object: Mooncake error {codes[0]}")
        return codes[0] == 0
