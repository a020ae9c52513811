"""Metadata I/O, journal and checkpoints of the ``uring://`` store (see :mod:`kvpool.ssd.format` for the
commit protocol): group commit of put/delete records, journal-full checkpoints, and recovery at open."""

from __future__ import annotations

import asyncio
import errno as errno_mod
import os
import random
from collections.abc import Callable

from ..errors import BackendError
from ..storage.allocator import ExtentAllocator
from ..storage.buffers import alloc_aligned, buffer_address
from . import format as fmt
from .errors import ssd_errors
from .ops import Op
from ..storage.settle import wait_uncancellable
from .space import SpaceLayer
from .state import BLOCK, JournalItem, log

__all__ = ["JournalLayer"]


class JournalLayer(SpaceLayer):
    """The transport as the store reaches it, the metadata regions, and the journal writer task."""

    def _oserror(self, err: int, what: str) -> BackendError:
        return BackendError(err, f"{what}: {os.strerror(err)}", self.path)

    async def _submit(self, ops: list[Op], what: str) -> list[int]:
        """The one way the store reaches the device: native and OS errors come out as BackendError."""
        assert self._transport is not None
        with ssd_errors(self.path, what):
            return await self._transport.submit(ops)

    async def _read_head(self, n: int) -> bytes:
        """The first ``n`` bytes (fewer if the file is shorter), zero-padded to ``n``."""
        assert self._transport is not None
        size = fmt.align_up(max(n, BLOCK))
        buf = alloc_aligned(size, hugepages=False)
        try:
            (res,) = await self._submit([Op.read_iov(0, [(buffer_address(buf), size)])], "read the head")
            if res < 0:
                raise self._oserror(-res, f"cannot read the start of {self.path}")
            return bytes(buf[:res]).ljust(n, b"\0")[:n]
        finally:
            buf.close()

    async def _read_meta(self, offset: int, n: int) -> bytes | None:
        assert self._transport is not None
        buf = alloc_aligned(fmt.align_up(n), hugepages=False)
        try:
            (res,) = await self._submit([Op.read_iov(offset, [(buffer_address(buf), fmt.align_up(n))])], "metadata read")
            if res < n:
                return None
            return bytes(buf[:n])
        finally:
            buf.close()

    async def _write_meta(self, offset: int, data: bytes) -> None:
        assert self._transport is not None
        n = fmt.align_up(len(data))
        buf = alloc_aligned(n, hugepages=False)
        try:
            buf[: len(data)] = data
            (res,) = await self._submit([Op.write_iov(offset, [(buffer_address(buf), n)])], "metadata write")
        finally:
            buf.close()
        if res < 0:
            raise self._oserror(-res, f"metadata write at {offset} failed")
        if res != n:
            raise self._oserror(errno_mod.EIO, f"short metadata write at {offset}")

    async def _recover(self) -> None:
        geo = self._geo
        assert geo is not None
        best: tuple[int, list[fmt.Entry]] | None = None
        entries: list[fmt.Entry]
        for slot in (geo.ckpt_a, geo.ckpt_b):
            head = await self._read_meta(slot, BLOCK)
            h = fmt.checkpoint_header(head, geo.uuid) if head else None
            if h is None:
                continue
            epoch, n, plen, pcrc = h
            if plen > geo.ckpt_len - BLOCK:
                continue
            payload = await self._read_meta(slot + BLOCK, plen) if plen else b""
            if payload is None or fmt.crc(payload) != pcrc:
                log.warning("%s: checkpoint at %d is damaged", self.path, slot)
                continue
            try:
                entries = fmt.unpack_checkpoint_entries(payload, n)
            except Exception:
                continue
            if best is None or epoch > best[0]:
                best = (epoch, entries)
        if best is None:
            log.warning("%s: no valid checkpoint; starting empty", self.path)
            self._epoch = random.getrandbits(62)
            entries = []
        else:
            self._epoch, entries = best
        live: dict[bytes, fmt.Entry] = {e.key: e for e in entries}
        # replay the journal of this epoch, in sequence order
        jdata = await self._read_meta(geo.j_off, geo.j_len)
        blocks = []
        if jdata is not None:
            mv = memoryview(jdata)
            for pos in range(geo.j_len // BLOCK):
                parsed = fmt.parse_journal_block(mv[pos * BLOCK : (pos + 1) * BLOCK], self._epoch)
                if parsed is not None:
                    blocks.append(parsed)
        blocks.sort(key=lambda b: b[0])
        self._seq = max((e.seq for e in entries), default=0)
        for seq, recs in blocks:
            self._seq = max(self._seq, seq)
            for kind, rec in recs:
                if kind == fmt.REC_PUT:
                    assert isinstance(rec, fmt.Entry)
                    live[rec.key] = rec
                    self._seq = max(self._seq, rec.seq)
                else:
                    assert isinstance(rec, bytes)
                    live.pop(rec, None)
        # rebuild space: newest first; an older entry overlapping a newer one was superseded
        self._alloc = ExtentAllocator(geo.d_len, BLOCK)
        kept = []
        for e in sorted(live.values(), key=lambda e: e.seq, reverse=True):
            if e.length <= 0 or e.part_size <= 0 or len(e.checksums) != -(-e.length // e.part_size):
                self.counters["dropped_on_recovery"] += 1
                continue
            if self._alloc.reserve(e.offset, e.extent):
                kept.append(e)
            else:
                self.counters["dropped_on_recovery"] += 1
        self._index = {}
        self._meta_bytes = 0
        for e in sorted(kept, key=lambda e: e.seq):
            self._index[e.key] = e
            self._meta_bytes += e.packed_size
            self.policy.insert(e.key, e.length)
        self.counters["recovered_objects"] = len(self._index)
        if not self._readonly:
            await self._checkpoint()  # compact: the replayed journal is folded into a new checkpoint

    async def _checkpoint(self, index: dict[bytes, fmt.Entry] | None = None) -> None:
        """Write the whole index to the older slot with a new epoch; the journal starts over."""
        geo = self._geo
        assert geo is not None
        epoch = self._epoch + 1
        entries = sorted((self._index if index is None else index).values(), key=lambda e: e.seq)
        data = fmt.pack_checkpoint(epoch, entries, geo.uuid)
        if len(data) > geo.ckpt_len:  # cannot happen: writes keep _meta_bytes within the slot
            raise self._oserror(errno_mod.ENOSPC, "checkpoint does not fit its slot")
        slot = geo.ckpt_a if epoch % 2 == 0 else geo.ckpt_b
        await self._write_meta(slot, data)
        self._epoch = epoch
        self._jpos = 0
        self.counters["checkpoints"] += 1

    async def _log(self, records: list[bytes], publish: Callable[[], None] | None = None) -> None:
        """Append ``records`` to the journal (group commit); ``publish`` runs once they are durable.

        A caller cancelled here still waits for its batch: whether the records were committed must be known
        before the caller undoes anything, or a rollback would free extents a committed record names.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._jpending.append((records, fut, publish))
        if self._jtask is None or self._jtask.done():
            self._jtask = asyncio.ensure_future(self._journal_writer())
        await wait_uncancellable(fut)

    async def _drain_journal(self) -> None:
        while self._jtask is not None and not self._jtask.done():
            await asyncio.shield(self._jtask)

    async def _journal_writer(self) -> None:
        geo = self._geo
        assert geo is not None
        while self._jpending:
            batch, self._jpending = self._jpending, []
            try:
                blocks: list[bytes] = []
                cur = b""
                for recs, _, _ in batch:
                    for r in recs:
                        if len(cur) + len(r) > fmt.JOURNAL_PAYLOAD:
                            blocks.append(cur)
                            cur = b""
                        cur += r
                if cur:
                    blocks.append(cur)
                if self._jpos + len(blocks) > geo.j_len // BLOCK:
                    # Journal full: fold everything (including this batch, applied below) into a checkpoint.
                    await self._checkpoint_with(batch)
                else:
                    data = b"".join(
                        fmt.pack_journal_block(self._epoch, self._seq + 1 + i, blk) for i, blk in enumerate(blocks)
                    )
                    self._seq += len(blocks)
                    await self._write_meta(geo.j_off + self._jpos * BLOCK, data)
                    self._jpos += len(blocks)
            except BaseException as exc:
                for _, fut, _ in batch:
                    if not fut.done():
                        fut.set_exception(exc if isinstance(exc, Exception) else BackendError(str(exc)))
                if not isinstance(exc, Exception):
                    raise
                continue
            # Publish before completing and before the next batch: see _write_group's publish().
            for _, _, publish in batch:
                if publish is not None:
                    publish()
            for _, fut, _ in batch:
                if not fut.done():
                    fut.set_result(None)

    async def _checkpoint_with(self, batch: list[JournalItem]) -> None:
        """Checkpoint the index as it will be once ``batch`` is applied (its puts are not yet published)."""
        snapshot = dict(self._index)
        for recs, _, _ in batch:
            for r in recs:
                if r[0] == fmt.REC_PUT:
                    e, _pos = fmt.Entry.unpack_from(r, 1)
                    snapshot[e.key] = e
                else:
                    snapshot.pop(r[1:17], None)
        await self._checkpoint(snapshot)
