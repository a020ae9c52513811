"""How one range read of the SSD tier travels: its plan (where the device reads into), then verify + copy-out.

A read of ``[offset, offset + n)`` of an object reads the checksum parts covering it (``[r0, r1)``), because
only whole parts can be verified. Where those bytes land is the plan's one decision:

- ``direct``: straight into the caller's tensor, when it is exactly the covered range and its memory meets the
  device's O_DIRECT alignment (no copy at all);
- ``bounce``: a slice of the group's staging memory (:class:`~kvpool.ssd.space.Stage`: the pool's arena,
  else the store's bounce buffer; fixed ops where the transport registered it), then one ``copy_`` into the
  caller's tensor;
- ``staging``: a private aligned tensor, when the bounce buffer cannot hold the read.
"""

from __future__ import annotations

import asyncio
import errno as errno_mod
import os
from collections.abc import Sequence

import attrs
import torch

from ..errors import BackendError
from ..storage.backend import ReadRequest, check_range, nbytes_of
from ..storage.buffers import OFFLOAD_BYTES, aligned_empty, tensor_runs
from . import format as fmt
from .checksums import part_hashes, part_sizes
from .ops import Kind, Op
from ..storage.settle import gather_settled
from .state import log
from .write_path import WriteLayer

__all__ = ["ReadLayer", "ReadPlan"]


@attrs.define(slots=True, eq=False)
class ReadPlan:
    """One planned read: request ``index`` of its batch, served from ``entry``'s covering parts ``[r0, r1)``."""

    index: int
    request: ReadRequest
    entry: fmt.Entry
    r0: int
    r1: int
    runs: list[tuple[int, int]]  # the memory the device reads [r0, align_up(r1)) into, laid end to end
    bounce: tuple[int, int] | None = None  # (offset, length) in the group's staging memory
    staging: torch.Tensor | None = None  # private aligned memory when the bounce buffer is full

    @property
    def direct(self) -> bool:
        return self.bounce is None and self.staging is None

    @property
    def nbytes(self) -> int:
        return self.r1 - self.r0

    def finish(self, bounce: torch.Tensor | None, verify: bool = True) -> bool:
        """Verify the covered parts and copy the asked-for range out of staging memory. Releases the GIL in
        xxhash and torch, so large plans run in worker threads; False when a checksum does not match."""
        e, r = self.entry, self.request
        if verify:
            cover = fmt.parts_covering(e, self.r0, self.r1)
            sizes = part_sizes(e.length, e.part_size, cover.start, cover.stop)
            if part_hashes(self.runs, e.key, cover.start, sizes) != list(e.checksums[cover.start : cover.stop]):
                return False
        if not self.direct:
            n = nbytes_of(r.dest)
            if self.bounce is not None:
                assert bounce is not None
                base = bounce[self.bounce[0] : self.bounce[0] + self.bounce[1]]
            else:
                assert self.staging is not None
                base = self.staging
            src = base[r.offset - self.r0 : r.offset - self.r0 + n]
            r.dest.copy_(src.view(r.dest.dtype).view(r.dest.shape))
        return True


#: worker threads one group's verifications and copy-outs are spread over
_WORKERS = max(1, min(8, os.cpu_count() or 1))


@attrs.frozen(slots=True)
class ReadShape:
    """One request's staging need (bytes; 0 = direct) and, for a direct read, the caller's memory runs."""

    need: int
    runs: list[tuple[int, int]] | None


_MISSING = ReadShape(0, None)


class ReadLayer(WriteLayer):
    """Reads, in groups whose staging fits the bounce buffer; a read fault or a bad checksum is a miss."""

    def _shape(self, r: ReadRequest) -> ReadShape:
        """Where a read goes, worked out once per request (grouping and planning both use it): the staging
        bytes it needs (0 when it goes straight into the caller's memory, or the key is missing) and the
        caller's memory runs when it does."""
        e = self._index.get(r.key)
        if e is None:
            return _MISSING
        n = nbytes_of(r.dest)
        parts = fmt.parts_covering(e, r.offset, min(r.offset + n, e.length))
        r0 = parts.start * e.part_size
        span = fmt.align_up(min(parts.stop * e.part_size, e.length)) - r0
        if r.dest.device.type != "cpu" or r0 != r.offset or span != n:
            return ReadShape(span, None)
        runs = tensor_runs(r.dest)
        return ReadShape(0, runs) if self._aligned(runs) else ReadShape(span, None)

    async def _read_group(self, requests: Sequence[ReadRequest], shapes: Sequence[ReadShape]) -> list[bool]:
        assert self._transport is not None and self._bounce is not None and self._geo is not None
        # reserve staging only for reads that will not go straight into the caller's memory
        need = sum(sh.need for sh in shapes if sh.need <= self._bounce.alloc.capacity)
        need = need if need <= self._bounce.alloc.capacity else 0
        stage = await self._stage(need) if need else None
        cursor = 0
        results = [False] * len(requests)
        plans: list[ReadPlan] = []
        pinned: list[fmt.Entry] = []
        ops: list[Op] = []
        op_owner: list[int] = []
        try:
            for i, r in enumerate(requests):
                e = self._index.get(r.key)
                if e is None:
                    self.counters["misses"] += 1
                    continue
                n = check_range(r.dest, r.offset, e.length)
                if n == 0:
                    results[i] = True
                    continue
                e.pins += 1
                pinned.append(e)
                parts = fmt.parts_covering(e, r.offset, r.offset + n)
                r0 = parts.start * e.part_size
                r1 = min(parts.stop * e.part_size, e.length)
                span = fmt.align_up(r1) - r0
                file_off = self._geo.d_off + e.offset + r0
                runs = shapes[i].runs
                if runs is not None and r0 == r.offset and span == n:  # (re-checked: the index may have changed)
                    plan = ReadPlan(i, r, e, r0, r1, runs)
                    plan_ops = self._iov_ops(Kind.READ, runs, file_off)
                    self.counters["direct_reads"] += 1
                elif cursor + span > need:
                    tmp = aligned_empty((span,), torch.uint8)
                    plan = ReadPlan(i, r, e, r0, r1, [(tmp.data_ptr(), span)], staging=tmp)
                    plan_ops = self._iov_ops(Kind.READ, [(tmp.data_ptr(), span)], file_off)
                    self.counters["bounce_reads"] += 1
                else:
                    assert stage is not None
                    boff = cursor
                    cursor += span
                    plan = ReadPlan(i, r, e, r0, r1, [(stage.addr + boff, span)], bounce=(boff, span))
                    plan_ops = stage.ops(Kind.READ, file_off, boff, span, self._max_io)
                    self.counters["bounce_reads"] += 1
                plans.append(plan)
                ops.extend(plan_ops)
                op_owner.extend([len(plans) - 1] * len(plan_ops))
            try:
                res = await self._submit(ops, "read") if ops else []
            except BackendError as exc:  # a read fault is a miss (counted), never an exception to the caller
                log.warning("%s: %s; %d reads are misses", self.path, exc, len(plans))
                res = [-(exc.errno or errno_mod.EIO)] * len(ops)
            failed = {owner for owner, rv, op in zip(op_owner, res, ops) if rv != op.nbytes}
            bounce_t = stage.tensor if stage is not None else None
            todo = [p for p in range(len(plans)) if p not in failed]
            for p in failed:
                self.counters["read_errors"] += 1
                self.counters["misses"] += 1
            # Large verifications and copy-outs run in worker threads (xxhash and torch release the GIL), so the
            # event loop keeps submitting I/O for other requests meanwhile; small ones are cheaper inline.
            verify = self._verify
            big = {p for p in todo if plans[p].nbytes >= OFFLOAD_BYTES}
            verdict = {p: plans[p].finish(bounce_t, verify) for p in todo if p not in big}
            if big:
                # one worker job per core, each finishing its share of the plans in turn: a thread hop per plan
                # (48 per 1.5 GB restore) cost more in context switches than the hashing it spread out
                order = sorted(big)
                jobs = [order[k :: _WORKERS] for k in range(min(_WORKERS, len(order)))]

                def finish_all(ps: list[int]) -> list[bool]:
                    return [plans[p].finish(bounce_t, verify) for p in ps]

                for ps, oks in zip(jobs, await gather_settled(*(asyncio.to_thread(finish_all, ps) for ps in jobs))):
                    verdict.update(zip(ps, oks))
            for p in todo:
                i, e, r = plans[p].index, plans[p].entry, plans[p].request
                if not verdict[p]:
                    self.counters["corrupt"] += 1
                    self.counters["misses"] += 1
                    log.warning("%s: object %s failed its checksum; treated as a miss", self.path, e.key.hex())
                    continue
                results[i] = True
                self.counters["hits"] += 1
                self.counters["bytes_read"] += nbytes_of(r.dest)
                self.policy.touch(r.key)
        finally:
            bounce_t = None
            if stage is not None:  # every op on it has completed: submit waits for them even when cancelled
                await self._unstage(stage)
                stage = None
            for e in pinned:
                self._unpin(e)
        return results
