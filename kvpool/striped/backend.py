"""``striped`` -- one tier made of several child backends (SSDs), each object's bytes split across them.

Built from children, not from a spec string: ``KVPool.open(backends=[..., ["uring:///dev/a", "uring:///dev/b"]])``
or ``StripedBackend.from_specs(["uring:///dev/a?bw=3GB/s", "uring:///dev/b?bw=1.5GB/s"])`` or
``StripedBackend([UringBackend(...), UringBackend(...)])``.

Placement. An object of ``n`` bytes is cut into contiguous byte ranges, one per child, sized in proportion to
the children's read bandwidth (:func:`kvpool.striped.placement.split_by_weight`), so that a restore reads every child
for the same time. Weights come from, in order: ``weights=`` given to the constructor; ``bw=`` in a child's
spec (:meth:`from_specs`); the child's ``capabilities.read_bandwidth``; a :class:`~kvpool.striped.placement.BandwidthProbe`
at open (cached: ``PATH.bw.json`` next to a pool file; for devices, under the probe's ``cache_dir``), which
measures only an empty child (probe writes into a child holding data could evict objects already
acknowledged); else the mean of the others. Piece boundaries are multiples of 4 KiB and, when the balance stays within
``tolerance`` (2 %), multiples of the object's rows (the leading dimensions of the tensor written): a strided
view such as ``kv[:, :, t0:t1]`` is then split into strided views of itself and written without a packing
copy, and a read into such a view lands in place. Otherwise a non-contiguous source is made contiguous once.
A child without room for its share (its free space; or its capacity, once all are full and evicting), or
one that failed, gets nothing; the others take its share (a *degraded* write, counted).

Per-object metadata. Child ``i`` stores its piece under ``blake3(key, seq, i)[:16]``, where ``seq`` is a
write sequence number (nanosecond clock, monotonic): an overwrite writes new pieces under new keys and
never touches the old ones, so a concurrent reader sees the old object or the new one, never a mix. After
the pieces, a 512-byte *record* is written to the child that holds the first piece, under
``b"KVSTRIP1" + blake3(key, seq)[:8]``: magic, key, seq, length and the (child, bytes) list of the pieces,
with a checksum. The in-memory index is key -> record; only once pieces and record are stored is the index
switched, then the old pieces and record are deleted (after the readers still using them finish). The split
of every object is thus explicit, so objects written under old weights read after the weights change.

Open rebuilds the index from the records found in the children: per key the newest record whose pieces all
exist with their recorded sizes wins; older records, their pieces and pieces no record names (a crash
between pieces and record, or between record and the deletion of the old object) are deleted. The children
therefore belong to the striped tier: do not share them with anything else. Children are positional: reopen
with the same children in the same order.

Failure. Any piece missing or failing verification in its child makes the object a miss (and the rest of it
is deleted). A child whose I/O raises is marked down for ``retry_after`` seconds: its reads are misses, new
objects are placed on the others, and the tier keeps working as long as one child does.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import attrs
import torch

from ..errors import BackendError, CapacityError, ConfigError, PoolClosedError
from .placement import BandwidthProbe, makespan, split_by_weight
from .ranges import aligned_bytes, byte_range, granules, row_view
from .records import (
    MAX_CHILDREN,
    META_MAGIC,
    META_NBYTES,
    StripedObject,
    meta_key,
    pack_record,
    piece_key,
    unpack_record,
)
from ..storage.backend import HOST_MEMORY, Backend, Capabilities, ReadRequest, check_range, nbytes_of

if TYPE_CHECKING:
    from typing import Self

    from ..config import BackendSpec
    from ..storage.staging import StagingArena

__all__ = ["StripedBackend", "META_MAGIC", "META_NBYTES"]

log = logging.getLogger("kvpool.striped")

_ALIGN = 4096


def _device_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says the child's device failed (EIO, gone, timeout), as opposed to a full child
    (CapacityError) or a caller's mistake (TypeError, NotImplementedError from a meta tensor...)."""
    # BackendError is an OSError; a child closed under us is a device that went away
    return isinstance(exc, (OSError, PoolClosedError))


@attrs.frozen
class _Plan:
    """A write in preparation: the new object and the tensors each child stores."""

    obj: StripedObject
    views: tuple[torch.Tensor, ...]  # one per piece
    degraded: bool


class StripedBackend(Backend):
    """One tier striped over several child backends (see the module's docstring).

    Parameters
    ----------
    children
        The child backends (unopened or open); the striped tier opens and closes them.
    weights
        Relative read bandwidth of each child; ``None`` takes hints or probes (see the module's docstring).
        ``[1, 1, ...]`` is plain equal (round-robin) striping.
    probe
        The probe for children without a weight; ``True``: a default :class:`BandwidthProbe`;
        ``False``: no probing (unknown children weigh the mean of the known ones, or all weigh 1).
    align
        Piece boundaries are multiples of this (bytes).
    tolerance
        Row-aligned (copy-free) boundaries are preferred while the slowest child's time stays within this
        fraction of the best split's.
    retry_after
        Seconds a child that raised stays out of placement before it is tried again.
    gc
        At open, delete child objects that no valid record names (leftovers of a crash, stale versions).
    """

    scheme = "striped"

    def __init__(
        self,
        children: Sequence[Backend],
        *,
        weights: Sequence[float] | None = None,
        probe: BandwidthProbe | bool = True,
        align: int = _ALIGN,
        tolerance: float = 0.02,
        retry_after: float = 30.0,
        gc: bool = True,
    ) -> None:
        super().__init__()
        self.children: list[Backend] = list(children)
        if not self.children:
            raise ConfigError("a striped tier needs at least one child backend")
        if len(self.children) > MAX_CHILDREN:
            raise ConfigError(f"a striped tier takes at most {MAX_CHILDREN} children, got {len(self.children)}")
        if not all(isinstance(c, Backend) for c in self.children):
            raise ConfigError("striped children must be Backend objects")
        if not all(c.capabilities.partial_reads for c in self.children):
            raise ConfigError("striped children must serve partial reads (a request reads ranges of pieces)")
        if len({id(c) for c in self.children}) != len(self.children):
            raise ConfigError("the same backend object is given twice as a striped child")
        if weights is not None:
            ws = [float(w) for w in weights]
            if len(ws) != len(self.children):
                raise ConfigError(f"{len(ws)} weights for {len(self.children)} striped children")
            if any(not math.isfinite(w) or w < 0 for w in ws) or not any(w > 0 for w in ws):
                raise ConfigError(f"striped weights must be >= 0 and not all 0, got {list(weights)}")
        if align <= 0 or align % 512:
            raise ConfigError(f"align must be a positive multiple of 512, got {align}")
        self._given_weights = None if weights is None else [float(w) for w in weights]
        self._probe: BandwidthProbe | None = (
            probe if isinstance(probe, BandwidthProbe) else (BandwidthProbe() if probe else None)
        )
        self._align = align
        self._tolerance = tolerance
        self._retry_after = retry_after
        self._gc = gc
        self.weights: list[float] = list(self._given_weights or [1.0] * len(self.children))
        self.weight_sources: list[str] = ["given" if weights is not None else "default"] * len(self.children)
        self._index: dict[bytes, StripedObject] = {}
        self._down_until = [0.0] * len(self.children)
        self._last_seq = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.counters = {
            "hits": 0,
            "misses": 0,
            "bytes_read": 0,
            "bytes_written": 0,
            "degraded_writes": 0,
            "child_errors": 0,
            "contiguous_copies": 0,
            "temp_reads": 0,
            "recovered_objects": 0,
            "dropped_on_recovery": 0,
            "gc_deleted": 0,
        }
        # the children's total bandwidth, once open() has weighed them all by hints or probes
        self._read_bandwidth: float | None = None

    @property
    def capabilities(self) -> Capabilities:
        """Composed from the children's (an object lives on several of them: it is as persistent and durable
        as the least of them, remote if any is), and computed, not stored: ``read_bandwidth`` is known only
        after open has weighed the children. Pieces are not the caller's objects, so no eviction hints."""
        cc = [c.capabilities for c in self.children]
        return Capabilities(
            persistent=all(c.persistent for c in cc),
            durable=all(c.durable for c in cc),
            device_memory=all(c.device_memory for c in cc),
            partial_reads=True,  # the tier reads only the pieces (and ranges of them) a request covers
            remote=any(c.remote for c in cc),
            queued_io=any(c.queued_io for c in cc),
            eviction_hints=False,
            # the strongest need of any child: one shared-memory child makes the pool back its arena with a memfd
            host_memory=max((c.host_memory for c in cc), key=HOST_MEMORY.index),
            read_bandwidth=self._read_bandwidth,
        )

    # --- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: BackendSpec) -> Self:
        raise ConfigError(
            f"{spec.text}: a striped tier is built from its children: give a nested list of specs, "
            "backends=[..., ['uring:///dev/a?bw=3GB/s', 'uring:///dev/b?bw=1.5GB/s']], "
            "or StripedBackend.from_specs([...])"
        )

    @classmethod
    def from_specs(cls, specs: Sequence[str | Backend], **kwargs: Any) -> StripedBackend:
        """Build from child spec strings (or backends). A ``bw=RATE`` option in a child's spec is the child's
        read bandwidth hint: it is taken out of the spec before the child is built (children need not know
        it). Children without one are weighed by their capabilities or probed."""
        from ..config import BackendSpec
        from ..storage.registry import backend_from_spec

        children: list[Backend] = []
        hints: list[float | None] = []
        for s in specs:
            if isinstance(s, str):
                parsed = BackendSpec.parse(s)
                hint = parsed.bandwidth("bw")
                if hint is not None:
                    rest = {k: v for k, v in parsed.params.items() if k != "bw"}
                    s = f"{parsed.scheme}://{parsed.location}" + (f"?{urlencode(rest)}" if rest else "")
                hints.append(hint)
            else:
                hints.append(None)
            children.append(backend_from_spec(s))
        obj = cls(children, **kwargs)
        obj._hints = hints
        return obj

    _hints: list[float | None] | None = None

    # --- sizes -------------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int | None:
        caps = [c.capacity for c in self.children]
        if any(c is None for c in caps):
            return None
        return sum(c for c in caps if c is not None)

    @property
    def used_bytes(self) -> int:
        return sum(c.used_bytes for c in self.children)

    def __len__(self) -> int:
        return len(self._index)

    async def object_size(self, key: bytes) -> int | None:
        obj = self._index.get(key)
        return obj.length if obj is not None else None

    # --- open / close ------------------------------------------------------------------------------------
    async def _open(self) -> None:
        res = await asyncio.gather(*(c.open() for c in self.children), return_exceptions=True)
        errors = [r for r in res if isinstance(r, BaseException)]
        if errors:
            await asyncio.gather(*(c.close() for c, r in zip(self.children, res) if r is None), return_exceptions=True)
            raise errors[0]
        try:
            self._down_until = [0.0] * len(self.children)
            await self._recover()
            await self._resolve_weights()
        except BaseException:
            await asyncio.gather(*(c.close() for c in self.children), return_exceptions=True)
            self._index.clear()
            raise

    async def _close(self) -> None:
        await self._drain()
        self._index.clear()
        res = await asyncio.gather(*(c.close() for c in self.children), return_exceptions=True)
        for r in res:
            if isinstance(r, BaseException):
                raise r

    async def _drain(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def attach_staging(self, arena: StagingArena) -> None:
        """Hand the pool's staging arena to every child that uses it (pieces land in the caller's memory)."""
        for c in self.children:
            if c.capabilities.host_memory != "none":
                await c.attach_staging(arena)

    async def flush(self) -> None:
        """Flush the children that can (durability of what was written so far)."""
        self._check_open()
        await self._drain()
        for c in self.children:
            if c.capabilities.durable:
                await c.flush()

    async def _resolve_weights(self) -> None:
        n = len(self.children)
        w: list[float | None] = [None] * n
        src = ["default"] * n
        for i, c in enumerate(self.children):
            if self._given_weights is not None:
                w[i], src[i] = self._given_weights[i], "given"
            elif self._hints is not None and self._hints[i] is not None:
                w[i], src[i] = self._hints[i], "hint"
            elif c.capabilities.read_bandwidth:
                w[i], src[i] = c.capabilities.read_bandwidth, "capabilities"
        if self._probe is not None:
            for i, c in enumerate(self.children):
                if w[i] is None:
                    r = await self._probe.get(c)
                    if r is not None:
                        w[i], src[i] = r.read_bandwidth, "probe-cache" if r.cached else "probe"
        known = [x for x in w if x is not None]
        fill = sum(known) / len(known) if known else 1.0
        self.weights = [fill if x is None else x for x in w]
        self.weight_sources = src
        if not any(x > 0 for x in self.weights):
            raise ConfigError("every striped child has weight 0")
        if all(s in ("hint", "capabilities", "probe", "probe-cache") for s in src):
            self._read_bandwidth = float(sum(self.weights))

    # --- background work ---------------------------------------------------------------------------------
    def _spawn(self, coro: Any) -> None:
        t: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def _child_error(self, i: int, exc: BaseException, what: str) -> None:
        self.counters["child_errors"] += 1
        self._down_until[i] = time.monotonic() + self._retry_after
        log.warning("striped child %d (%s): %s failed: %r; out of placement for %.0f s", i,
                    self.children[i], what, exc, self._retry_after)

    def _usable(self, i: int) -> bool:
        return self.children[i].is_open and time.monotonic() >= self._down_until[i]

    async def _free(self, obj: StripedObject) -> None:
        """Delete an object's pieces and record from the children (best effort)."""
        dels: list[tuple[int, bytes]] = [(c, piece_key(obj.key, obj.seq, c)) for c, _s, _n in obj.pieces]
        dels.append((obj.meta_child, meta_key(obj.key, obj.seq)))
        await self._delete_child_keys(dels)

    async def _delete_child_keys(self, dels: Iterable[tuple[int, bytes]]) -> None:
        async def one(c: int, k: bytes) -> None:
            child = self.children[c]
            if not child.is_open:
                return
            try:
                await child.delete(k)
            except Exception as exc:  # noqa: BLE001 - a leftover is collected at the next open
                log.debug("striped child %d: delete failed: %r", c, exc)

        await asyncio.gather(*(one(c, k) for c, k in dels))

    async def _retire(self, obj: StripedObject, *, background: bool = False) -> None:
        """``obj`` left the index: free its pieces now, or when its last reader is done."""
        obj.dead = True
        if obj.readers or obj.freed:
            return
        obj.freed = True
        if background:
            self._spawn(self._free(obj))
        else:
            await self._free(obj)

    def _unpin(self, obj: StripedObject) -> None:
        obj.readers -= 1
        if obj.dead and obj.readers == 0 and not obj.freed:
            obj.freed = True
            self._spawn(self._free(obj))

    def _invalidate(self, obj: StripedObject) -> None:
        """A piece of ``obj`` is gone (evicted, corrupt): the object is a miss from now on."""
        if self._index.get(obj.key) is obj:
            del self._index[obj.key]
        if not obj.dead:
            obj.dead = True
            if obj.readers == 0 and not obj.freed:
                obj.freed = True
                self._spawn(self._free(obj))

    def _next_seq(self) -> int:
        self._last_seq = max(self._last_seq + 1, time.time_ns())
        return self._last_seq

    # --- placement ---------------------------------------------------------------------------------------
    def _limits(self, usable: list[bool], reserved: list[int]) -> tuple[list[int | None], list[int | None]]:
        """Limits per child: its free space, and its capacity (placement uses free space while the object fits
        there, so that no child evicts while another has room; then capacity: the children evict). An
        unusable child's limit is 0."""
        free: list[int | None] = []
        caps: list[int | None] = []
        for i, c in enumerate(self.children):
            cap = c.capacity if usable[i] else 0
            caps.append(cap)
            free.append(None if cap is None else max(0, cap - c.used_bytes - reserved[i] - _ALIGN))
        return free, caps

    def _plan(self, key: bytes, src: torch.Tensor, exclude: frozenset[int], reserved: list[int]) -> _Plan:
        n = nbytes_of(src)
        usable = [self._usable(i) and i not in exclude for i in range(len(self.children))]
        weights = [w if u else 0.0 for w, u in zip(self.weights, usable)]
        if not any(w > 0 for w in weights):
            raise BackendError("no striped child can take writes (all failed, full or weighted 0)")
        seed = int.from_bytes(key[:8], "little")
        rv = row_view(src)
        # candidate granules: natural rows of the object (copy-free for this source), then plain alignment
        cands = [gg for gg in (math.lcm(g, self._align) for g in granules(src, rv[1])) if gg < n]
        cands.append(self._align)
        scored: list[tuple[int, list[int], float]] = []
        for limits in self._limits(usable, reserved):
            for g in cands:
                try:
                    sizes = split_by_weight(n, weights, g, limits, seed=seed)
                except ValueError:
                    continue
                scored.append((g, sizes, makespan(sizes, weights)))
            if scored:
                break
        if not scored:
            raise CapacityError(f"an object of {n} bytes does not fit in the striped children that can take writes")
        best = min(sc[2] for sc in scored)
        sizes = next(sc[1] for sc in scored if sc[2] <= best * (1 + self._tolerance))
        pieces: list[tuple[int, int, int]] = []
        start = 0
        for c, sz in enumerate(sizes):
            if sz:
                pieces.append((c, start, sz))
                start += sz
        views = [byte_range(rv, s, s + sz) for _c, s, sz in pieces]
        if any(v is None for v in views):
            flat = row_view(src.contiguous())
            self.counters["contiguous_copies"] += 1
            views = [byte_range(flat, s, s + sz) for _c, s, sz in pieces]
        for c, _s, sz in pieces:
            reserved[c] += -(-sz // _ALIGN) * _ALIGN
        obj = StripedObject(key, self._next_seq(), n, tuple(pieces))
        degraded = any(not u and w > 0 for u, w in zip(usable, self.weights))
        return _Plan(obj, tuple(v for v in views if v is not None), degraded)

    # --- writes ------------------------------------------------------------------------------------------
    async def write(self, key: bytes, src: torch.Tensor) -> None:
        await self.write_many([(key, src)])

    async def write_many(self, items: Sequence[tuple[bytes, torch.Tensor]]) -> None:
        self._check_open()
        for _, src in items:
            if nbytes_of(src) == 0:
                raise ValueError("cannot store an empty object")
        if not items:
            return
        cap = self.capacity
        for _, src in items:
            if cap is not None and -(-nbytes_of(src) // _ALIGN) * _ALIGN > cap:
                raise CapacityError(f"an object of {nbytes_of(src)} bytes cannot fit in a striped tier of {cap} bytes")
        reserved = [0] * len(self.children)
        plans = [self._plan(k, s, frozenset(), reserved) for k, s in items]
        failed = await self._store(plans)
        # retry what failed, one object at a time, without the children that failed it (a degraded write)
        errors: list[BaseException] = []
        for idx, errs in failed:
            key, src = items[idx]
            exclude = set(errs)
            all_capacity = all(isinstance(e, CapacityError) for e in errs.values())
            last: BaseException = next(iter(errs.values()))
            stored = False
            for _attempt in range(len(self.children)):
                try:
                    plan = self._plan(key, src, frozenset(exclude), [0] * len(self.children))
                except (BackendError, CapacityError) as exc:
                    last = CapacityError(str(exc)) if all_capacity and not isinstance(exc, CapacityError) else exc
                    break
                again = await self._store([plan])
                if not again:
                    stored = True
                    break
                errs = again[0][1]
                exclude |= set(errs)
                all_capacity = all_capacity and all(isinstance(e, CapacityError) for e in errs.values())
                last = next(iter(errs.values()))
            if not stored:
                errors.append(last)
        if errors:
            err = errors[0]
            if isinstance(err, (CapacityError, BackendError, ValueError)):
                raise err
            raise BackendError(f"striped write failed on every child that could take it: {err!r}") from err

    async def _store(self, plans: Sequence[_Plan]) -> list[tuple[int, dict[int, BaseException]]]:
        """Write the pieces, then the records, then publish. Returns the plans that failed (their index in
        ``plans`` and the exception of each child that failed them); what they wrote is deleted."""
        by_child: dict[int, list[tuple[int, bytes, torch.Tensor]]] = {}
        for p, plan in enumerate(plans):
            for (c, _s, _n), view in zip(plan.obj.pieces, plan.views):
                by_child.setdefault(c, []).append((p, piece_key(plan.obj.key, plan.obj.seq, c), view))
        errors: dict[int, dict[int, BaseException]] = {}
        written: dict[int, list[tuple[int, bytes]]] = {p: [] for p in range(len(plans))}
        try:
            await self._write_children(by_child, errors, written)
            metas: dict[int, list[tuple[int, bytes, torch.Tensor]]] = {}
            for p, plan in enumerate(plans):
                if p in errors:
                    continue
                rec = torch.frombuffer(bytearray(pack_record(plan.obj)), dtype=torch.uint8)
                metas.setdefault(plan.obj.meta_child, []).append((p, meta_key(plan.obj.key, plan.obj.seq), rec))
            await self._write_children(metas, errors, written)
        except BaseException:
            dels = [d for lst in written.values() for d in lst]
            self._spawn(self._delete_child_keys(dels))
            raise
        if errors:
            await self._delete_child_keys([d for p in errors for d in written[p]])
        for p, plan in enumerate(plans):
            if p in errors:
                continue
            obj = plan.obj
            old = self._index.get(obj.key)
            if old is not None and old.seq > obj.seq:
                # a newer write of this key finished first: this one is already superseded
                await self._retire(obj)
                continue
            self._index[obj.key] = obj
            self.counters["bytes_written"] += obj.length
            if plan.degraded:
                self.counters["degraded_writes"] += 1
            if old is not None:
                await self._retire(old)
        return sorted(errors.items())

    async def _write_children(
        self,
        by_child: dict[int, list[tuple[int, bytes, torch.Tensor]]],
        errors: dict[int, dict[int, BaseException]],
        written: dict[int, list[tuple[int, bytes]]],
    ) -> None:
        children = list(by_child)

        async def one(c: int) -> None:
            await self.children[c].write_many([(k, v) for _p, k, v in by_child[c]])

        res = await asyncio.gather(*(one(c) for c in children), return_exceptions=True)
        fatal: BaseException | None = None
        for c, r in zip(children, res):
            # a failed batch may have been stored in part: what it wrote is deleted with the rest
            for p, k, _v in by_child[c]:
                written[p].append((c, k))
            if isinstance(r, BaseException):
                if not isinstance(r, (OSError, PoolClosedError, CapacityError, ValueError)):
                    # cancellation, or the caller's error (a tensor the child cannot read: TypeError,
                    # NotImplementedError...): not the device's fault, so no child is marked down
                    fatal = fatal or r
                    continue
                if _device_failure(r):
                    self._child_error(c, r, "write")
                for p, _k, _v in by_child[c]:
                    errors.setdefault(p, {})[c] = r
        if fatal is not None:
            raise fatal

    # --- reads -------------------------------------------------------------------------------------------
    async def read_into(self, key: bytes, dest: torch.Tensor, offset: int = 0) -> bool:
        return (await self.read_many([ReadRequest(key, dest, offset)]))[0]

    async def read_many(self, requests: Sequence[ReadRequest]) -> list[bool]:
        self._check_open()
        results = [False] * len(requests)
        if not requests:
            return results
        # jobs: (request index, object, temp or None); per-child requests tagged with their job
        jobs: list[tuple[int, StripedObject, torch.Tensor | None]] = []
        per_child: dict[int, list[tuple[int, ReadRequest]]] = {}
        pinned: list[StripedObject] = []
        try:
            for idx, r in enumerate(requests):
                obj = self._index.get(r.key)
                if obj is None:
                    self.counters["misses"] += 1
                    continue
                n = check_range(r.dest, r.offset, obj.length)
                if n == 0:
                    results[idx] = True
                    continue
                obj.readers += 1
                pinned.append(obj)
                lo, hi = r.offset, r.offset + n
                parts = [(c, max(lo, s), min(hi, s + sz), s) for c, s, sz in obj.pieces if s < hi and s + sz > lo]
                rv = row_view(r.dest)
                views = [byte_range(rv, a - lo, b - lo) for _c, a, b, _s in parts]
                temp = None
                if any(v is None for v in views):
                    temp = aligned_bytes(n)
                    self.counters["temp_reads"] += 1
                    views = [temp[a - lo : b - lo] for _c, a, b, _s in parts]
                j = len(jobs)
                jobs.append((idx, obj, temp))
                for (c, a, _b, s), v in zip(parts, views):
                    assert v is not None
                    per_child.setdefault(c, []).append((j, ReadRequest(piece_key(obj.key, obj.seq, c), v, a - s)))
            order = list(per_child)
            res = await asyncio.gather(*(self._child_read(c, per_child[c]) for c in order))
            ok = [True] * len(jobs)
            gone = [False] * len(jobs)
            for c, rlist in zip(order, res):
                for (j, _r), good in zip(per_child[c], rlist):
                    if good is not True:
                        ok[j] = False
                        gone[j] = gone[j] or good is False
            for j, (idx, obj, temp) in enumerate(jobs):
                r = requests[idx]
                if not ok[j]:
                    self.counters["misses"] += 1
                    if gone[j]:
                        self._invalidate(obj)
                    continue
                if temp is not None:
                    r.dest.copy_(temp.view(r.dest.dtype).view(r.dest.shape))
                results[idx] = True
                self.counters["hits"] += 1
                self.counters["bytes_read"] += nbytes_of(r.dest)
                self._touch_record(obj)
        finally:
            for obj in pinned:
                self._unpin(obj)
        return results

    async def _child_read(self, c: int, reqs: list[tuple[int, ReadRequest]]) -> list[bool | None]:
        """A child's results: True (read), False (missing or corrupt), None (the child failed)."""
        child = self.children[c]
        try:
            got = await child.read_many([r for _j, r in reqs])
            return [bool(x) for x in got]
        except ValueError:
            # a piece shorter than its record says: the object is damaged
            return [False] * len(reqs)
        except Exception as exc:  # noqa: BLE001 - a failing child's reads are misses
            if _device_failure(exc):  # only the device's own failures take it out of placement
                self._child_error(c, exc, "read")
            return [None] * len(reqs)

    def _touch_record(self, obj: StripedObject) -> None:
        """Keep a record as recent as its pieces in its child's eviction order (children that declare
        ``eviction_hints``), so that a hot object's record is not evicted before its pieces."""
        child = self.children[obj.meta_child]
        if child.capabilities.eviction_hints:
            try:
                child.hint_touch(meta_key(obj.key, obj.seq))
            except Exception:  # noqa: BLE001 - a hint only
                pass

    # --- membership --------------------------------------------------------------------------------------
    async def _present(self, objs: Sequence[StripedObject]) -> list[bool]:
        """Whether every piece of each object is still in its child (an evicted piece invalidates it)."""
        per_child: dict[int, list[tuple[int, bytes]]] = {}
        for j, obj in enumerate(objs):
            for c, _s, _n in obj.pieces:
                per_child.setdefault(c, []).append((j, piece_key(obj.key, obj.seq, c)))
        order = list(per_child)

        async def one(c: int) -> list[bool | None]:
            try:
                got = await self.children[c].contains_many([k for _j, k in per_child[c]])
                return [bool(x) for x in got]
            except Exception as exc:  # noqa: BLE001
                if _device_failure(exc):
                    self._child_error(c, exc, "contains")
                return [None] * len(per_child[c])

        res = await asyncio.gather(*(one(c) for c in order))
        out = [True] * len(objs)
        for c, rl in zip(order, res):
            for (j, _k), good in zip(per_child[c], rl):
                if good is not True:
                    out[j] = False
                    if good is False:
                        self._invalidate(objs[j])
        return out

    async def contains(self, key: bytes) -> bool:
        return (await self.contains_many([key]))[0]

    async def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        self._check_open()
        found = [(i, self._index[k]) for i, k in enumerate(keys) if k in self._index]
        out = [False] * len(keys)
        if found:
            for (i, _o), ok in zip(found, await self._present([o for _i, o in found])):
                out[i] = ok
        return out

    async def delete(self, key: bytes) -> bool:
        self._check_open()
        obj = self._index.pop(key, None)
        if obj is None:
            return False
        await self._retire(obj)
        return True

    async def keys(self) -> AsyncIterator[bytes]:
        self._check_open()
        snapshot = list(self._index.values())
        for i in range(0, len(snapshot), 1024):
            batch = snapshot[i : i + 1024]
            for obj, ok in zip(batch, await self._present(batch)):
                if ok:
                    yield obj.key

    # --- recovery ----------------------------------------------------------------------------------------
    async def _recover(self) -> None:
        """Rebuild the index from the records in the children; collect leftovers."""
        n = len(self.children)
        child_keys: list[list[bytes]] = []
        for child in self.children:
            child_keys.append([k async for k in child.keys()])
        records: list[tuple[int, bytes, StripedObject]] = []  # (child, record key, object)
        for ci, ks in enumerate(child_keys):
            mkeys = [k for k in ks if k[:8] == META_MAGIC]
            if not mkeys:
                continue
            sizes = await asyncio.gather(*(self.children[ci].object_size(k) for k in mkeys))
            mkeys = [k for k, s in zip(mkeys, sizes) if s is None or s == META_NBYTES]
            bufs = [torch.empty(META_NBYTES, dtype=torch.uint8) for _ in mkeys]
            try:
                got = await self.children[ci].read_many([ReadRequest(k, b) for k, b in zip(mkeys, bufs)])
            except ValueError:  # some object of that key prefix is smaller: read one by one
                got = []
                for k, b in zip(mkeys, bufs):
                    try:
                        got.append(await self.children[ci].read_into(k, b))
                    except ValueError:
                        got.append(False)
            for k, b, ok in zip(mkeys, bufs, got):
                if not ok:
                    continue
                obj = unpack_record(bytes(b.numpy()), n)
                if obj is not None and obj.meta_child == ci and meta_key(obj.key, obj.seq) == k:
                    records.append((ci, k, obj))
        # which pieces exist, with which sizes
        wanted: dict[int, set[bytes]] = {}
        for _ci, _k, obj in records:
            for c, _s, _n in obj.pieces:
                wanted.setdefault(c, set()).add(piece_key(obj.key, obj.seq, c))
        have: dict[tuple[int, bytes], int | None] = {}
        for c, want in wanted.items():
            present = set(child_keys[c])
            kl = [k for k in want if k in present]
            sizes = await asyncio.gather(*(self.children[c].object_size(k) for k in kl))
            for k, s in zip(kl, sizes):
                have[(c, k)] = s
        best: dict[bytes, StripedObject] = {}
        for _ci, _k, obj in sorted(records, key=lambda r: r[2].seq, reverse=True):
            if obj.key in best:
                continue
            complete = True
            for c, _s, sz in obj.pieces:
                pk = (c, piece_key(obj.key, obj.seq, c))
                if pk not in have or have[pk] not in (None, sz):
                    complete = False
                    break
            if complete:
                best[obj.key] = obj
        self._index = {}
        for obj in sorted(best.values(), key=lambda o: o.seq):
            self._index[obj.key] = obj
        self._last_seq = max([o.seq for _c, _k, o in records] + [self._last_seq])
        self.counters["recovered_objects"] = len(self._index)
        self.counters["dropped_on_recovery"] = len({o.key for _c, _k, o in records} - set(best))
        if not self._gc:
            return
        keep: set[tuple[int, bytes]] = set()
        for obj in self._index.values():
            keep.add((obj.meta_child, meta_key(obj.key, obj.seq)))
            for c, _s, _n in obj.pieces:
                keep.add((c, piece_key(obj.key, obj.seq, c)))
        leftovers = [(c, k) for c, ks in enumerate(child_keys) for k in ks if (c, k) not in keep]
        if leftovers:
            log.info("striped: deleting %d leftover child objects at open", len(leftovers))
            await self._delete_child_keys(leftovers)
            self.counters["gc_deleted"] = len(leftovers)

    # --- observability -----------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            **super().stats(),
            "objects": len(self._index),
            "weights": list(self.weights),
            "weight_sources": list(self.weight_sources),
            "shares": [w / sum(self.weights) for w in self.weights] if sum(self.weights) > 0 else [],
            "down": [now < t for t in self._down_until],
            **self.counters,
            "children": [c.stats() for c in self.children],
        }

    def __repr__(self) -> str:
        return f"<StripedBackend {len(self.children)} children {'open' if self._is_open else 'closed'}>"
