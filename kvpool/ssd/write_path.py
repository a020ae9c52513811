"""The write path of the ``uring://`` store: stage (direct or via bounce buffers), checksum, allocate, write
with O_DIRECT, then journal -- and publish to the index inside the journal writer."""

from __future__ import annotations

import errno as errno_mod
from collections.abc import Sequence

import torch

from ..storage.backend import nbytes_of
from ..storage.buffers import aligned_empty, tensor_runs
from . import format as fmt
from .checksums import checksums
from .ops import Kind, Op
from .opening import OpenLayer
from .state import BLOCK

__all__ = ["WriteLayer"]

_IOV_MAX = 512  # iovecs per SQE (the kernel's limit is 1024)


class WriteLayer(OpenLayer):
    """Writes, in groups whose staging fits the bounce buffer."""

    def _aligned(self, runs: list[tuple[int, int]]) -> bool:
        """Whether the device can move ``runs`` with no copy (the transport's rule: the DIO alignment for
        io_uring, inside the shared region for vhost)."""
        t = self._transport
        return self._direct and t is not None and all(t.mem_ok(addr, n) for addr, n in runs)

    def _groups(self, sizes: list[int]) -> list[range]:
        """Split a batch so that each group's staging memory fits in half the bounce buffer."""
        assert self._bounce is not None
        cap = self._bounce.alloc.capacity // 2
        if self._staging is not None:  # a group's staging comes from the arena: several must fit in it at once
            cap = min(cap, max(self._staging.nbytes // 4, BLOCK))
        groups, start, acc = [], 0, 0
        for i, n in enumerate(sizes):
            n = n if n <= self._bounce.alloc.capacity else 0  # larger ones use private staging memory
            if acc + n > cap and i > start:
                groups.append(range(start, i))
                start, acc = i, 0
            acc += n
        groups.append(range(start, len(sizes)))
        return groups

    async def _write_group(self, items: Sequence[tuple[bytes, torch.Tensor]]) -> None:
        assert self._transport is not None and self._bounce is not None
        # One reservation of staging memory per group, taken atomically: groups never deadlock on it.
        need = sum(fmt.align_up(nbytes_of(s)) for _, s in items)
        need = need if need <= self._bounce.alloc.capacity else 0
        stage = await self._stage(need) if need else None
        cursor = 0
        # stage each object: checksums, an extent, and either direct iovecs or a bounce copy
        staged: list[tuple[bytes, fmt.Entry, list[tuple[int, int]], tuple[int, int] | None]] = []
        dels: list[bytes] = []
        keep: list[torch.Tensor] = []
        committed = False
        try:
            for key, src in items:
                if src.device.type != "cpu":
                    src = src.cpu()
                n = nbytes_of(src)
                ps = fmt.part_size_for(n)
                runs = tensor_runs(src)
                keep.append(src)
                sums = checksums(runs, key, n, ps)
                self._seq += 1
                e = fmt.Entry(key, 0, n, ps, sums, self._seq)
                e.offset = self._allocate(n, e.packed_size, dels)
                e.pins = 1  # not visible yet; eviction cannot pick it, and a failure frees it
                self._meta_bytes += e.packed_size
                if n % BLOCK == 0 and self._aligned(runs):
                    staged.append((key, e, runs, None))
                else:
                    ext = e.extent
                    if stage is None or cursor + ext > need:
                        # too large to stage at once: a contiguous aligned copy of our own
                        tmp = aligned_empty((ext,), torch.uint8)
                        tmp[n:].zero_()
                        tmp[:n].view(src.dtype).view(src.shape).copy_(src)
                        keep.append(tmp)
                        staged.append((key, e, [(tmp.data_ptr(), ext)], None))
                    else:
                        boff = cursor
                        cursor += ext
                        view = stage.tensor[boff : boff + ext]
                        view[:n].view(src.dtype).view(src.shape).copy_(src)
                        if ext > n:
                            view[n:].zero_()
                        del view
                        staged.append((key, e, [], (boff, ext)))
            ops: list[Op] = []
            for _key, e, runs, b in staged:
                file_off = self._geo.d_off + e.offset if self._geo else 0
                if b is not None:
                    assert stage is not None
                    ops.extend(stage.ops(Kind.WRITE, file_off, b[0], b[1], self._max_io))
                else:
                    ops.extend(self._iov_ops(Kind.WRITE, runs, file_off))
            results = await self._submit(ops, "write")
            for op, r in zip(ops, results):
                if r < 0:
                    raise self._oserror(-r, "write failed")
                if r != op.nbytes:  # a short write (e.g. past a shrunk device's end) is a failed write
                    raise self._oserror(errno_mod.EIO, f"short write at {op.file_offset}: {r} of {op.nbytes} bytes")
            # data is on the device: now the journal names it, then readers may see it
            recs = dels + [fmt.put_record(e) for _, e, _, _ in staged]

            def publish() -> None:
                # Runs inside the journal writer, after the block naming these puts is on the device and
                # before any later batch is handled: a checkpoint the writer takes next is built from an index
                # that already holds every acknowledged put (it would otherwise start a new epoch that hides
                # this batch's journal block, and a kill before the next checkpoint would lose the puts).
                nonlocal committed
                committed = True
                for key, e, _runs_, _b in staged:
                    e.pins = 0
                    old = self._index.get(key)
                    if old is not None:
                        self.policy.remove(key)
                        self._release(old)
                    self._index[key] = e
                    self.policy.insert(key, e.length)
                    self.counters["bytes_written"] += e.length

            await self._log(recs, publish)
        except BaseException:
            if committed:  # cancelled after the journal took it: the put is stored, nothing to undo
                raise
            for _key, e, _runs_, b in staged:
                e.dead = True
                self._meta_bytes -= e.packed_size
                self._unpin(e)
            if dels:
                try:
                    await self._log(dels)
                except Exception:
                    pass
            raise
        finally:
            if stage is not None:  # every op on it has completed: submit waits for them even when cancelled
                await self._unstage(stage)
                stage = None

    def _iov_ops(self, kind: Kind, runs: list[tuple[int, int]], file_off: int) -> list[Op]:
        """Ops covering ``runs`` laid end to end at ``file_off``: <= _IOV_MAX iovecs and <= max_io bytes each."""
        max_io = self._max_io
        ops: list[Op] = []
        cur: list[tuple[int, int]] = []
        cur_n = 0
        pos = file_off
        for addr, n in runs:
            while n > 0:
                take = min(n, max_io - cur_n)
                cur.append((addr, take))
                cur_n += take
                addr += take
                n -= take
                if cur_n >= max_io or len(cur) >= _IOV_MAX:
                    ops.append(Op(kind, pos, iov=tuple(cur)))
                    pos += cur_n
                    cur, cur_n = [], 0
        if cur:
            ops.append(Op(kind, pos, iov=tuple(cur)))
        return ops
