"""What every remote tier shares, whatever its transport: options, object naming, the circuit breaker and the
error policy, deadlines, read planning over parts, verification of checksummed parts, write bookkeeping.

A transport subclass (``redis.py``, ``mooncake/``) moves values; this base decides what they mean. The error
policy, in one place (:meth:`RemoteBackend._boundary`):

- read side (``read_into``, ``read_many``, ``contains``, ``contains_many``, ``object_size``): a fault is a miss,
  counted; never an exception;
- ``delete``: a fault is ``False``, counted (``delete_errors``); the object, if it is still there, is still a
  valid, verified object, so the cache does not lie;
- writes and ``keys``: a fault raises :class:`~kvpool.BackendError` (errno ``ETIMEDOUT``, ``ECONNREFUSED``,
  ``EBUSY``...), so the pool can skip the tier;
- an outage (timeout, refused connection, RPC failure) opens the breaker: for ``retry_after`` seconds every call
  answers at once (reads miss, deletes return ``False``, writes raise ``EAGAIN``), so a dead server costs the
  serving path one timeout, not one per call.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import errno as errno_mod
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
import xxhash

from ..errors import BackendError, ConfigError
from ..storage.backend import Backend, Capabilities, ReadRequest, nbytes_of
from ..storage.buffers import OFFLOAD_BYTES
from .boundary import ExceptionMap, Fault, backend_error, map_exceptions
from .format import Filler, Header, RemoteFormat, part_seed, seconds
from .objects import Family, Item, Plan, Value, flat_bytes

if TYPE_CHECKING:
    from ..config import BackendSpec

__all__ = ["RemoteBackend", "Family", "Plan", "Value", "Item", "Ident", "Fixed", "KEY_LEN", "flat_bytes"]

KiB = 1 << 10
MiB = 1 << 20
KEY_LEN = 16
DEFAULT_PART = 4 * MiB
MIN_PART = 4 * KiB
MAX_PART = 256 * MiB
# Deadline allowance for bulk transfers: timeout + bytes / this (a large batch is not cut off by a slow link).
SLOW_BPS = 256 * MiB
# The options every remote spec takes.
COMMON_OPTIONS = ("timeout", "part_size", "prefix", "retry_after")

_T = TypeVar("_T")
# one part of one version of one object
Ident = tuple[bytes, int, int]
# (part_size, nparts, length, version, inline) of a header's fixed part
Fixed = tuple[int, int, int, int, bool]


class _Attempt:
    """What a :meth:`RemoteBackend._boundary` block ended with: ``fault`` is set when it failed."""

    __slots__ = ("fault",)

    def __init__(self) -> None:
        self.fault: Fault | None = None


class RemoteBackend(Backend):
    """Base of the remote tiers: a server holds the objects, in the format of :mod:`kvpool.remote.format`."""

    # a cache shared over the network: lost with the server, no flush, eviction is the server's own
    capabilities = Capabilities(
        persistent=False, durable=False, device_memory=False, partial_reads=True, remote=True, queued_io=True,
        eviction_hints=False, host_memory="none", read_bandwidth=None,
    )
    # set by each transport; the rest follows from it (__init_subclass__)
    family: ClassVar[Family]
    wire: ClassVar[RemoteFormat]
    exception_map: ClassVar[ExceptionMap]
    tier_name: ClassVar[str]
    log: ClassVar[logging.Logger]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        fam = cls.__dict__.get("family")
        if fam is not None:
            cls.wire = RemoteFormat(fam.magic, fam.salt)
            cls.exception_map = fam.exceptions
            cls.tier_name = fam.name
            cls.log = logging.getLogger(f"kvpool.{fam.name}")

    def __init__(self, *, timeout: float, part_size: int, prefix: str, retry_after: float) -> None:
        super().__init__()
        if not (isinstance(timeout, (int, float)) and timeout > 0 and math.isfinite(timeout)):
            raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if not (isinstance(part_size, int) and MIN_PART <= part_size <= MAX_PART):
            raise ConfigError(f"part_size must be in [{MIN_PART}, {MAX_PART}] bytes, got {part_size!r}")
        if not (isinstance(retry_after, (int, float)) and retry_after >= 0):
            raise ConfigError(f"retry_after must be >= 0 seconds, got {retry_after!r}")
        if not isinstance(prefix, str):
            raise ConfigError(f"prefix must be a str, got {prefix!r}")
        self.timeout = float(timeout)
        self.part_size = part_size
        self.prefix = prefix
        self.retry_after = float(retry_after)
        self.address = ""
        # old parts outlive the header that replaced them by this much: a reader that fetched the old header
        # an instant before still finds them
        self.grace = max(5.0, 4 * self.timeout)
        self._down_until = 0.0
        self.counters: dict[str, int] = {
            "hits": 0,
            "misses": 0,  # every read that returned False, whatever the reason below
            "absent": 0,  # no header: never written, deleted, expired or evicted
            "missing_parts": 0,  # header found but a part is gone (evicted or expired underneath)
            "corrupt": 0,  # a header or part failed verification
            "timeouts": 0,
            "errors": 0,  # refused/reset connections, server and client errors
            "unavailable": 0,  # calls answered at once while the tier is skipped after a failure
            "bytes_read": 0,
            "bytes_written": 0,
            "writes": 0,
            "write_errors": 0,
            "delete_errors": 0,  # deletes that could not reach the server (they returned False)
            "cleanup_errors": 0,
        }

    @staticmethod
    def common_options(spec: BackendSpec) -> dict[str, Any]:
        """The options every remote spec takes, parsed."""
        return {
            "timeout": seconds(spec, "timeout", 2.0) or 2.0,
            "part_size": spec.size("part_size", DEFAULT_PART) or DEFAULT_PART,
            "prefix": spec.params.get("prefix", "kvpool:"),
            "retry_after": seconds(spec, "retry_after", 1.0, zero=True) or 0.0,
        }

    @staticmethod
    def naming_spec(spec: BackendSpec, build: Callable[[], _T]) -> _T:
        """``build()``, with any :class:`~kvpool.ConfigError` it raises naming the spec string."""
        try:
            return build()
        except ConfigError as exc:
            if spec.text and spec.text not in str(exc):
                raise ConfigError(f"{spec.text}: {exc}") from None
            raise

    # --- names -------------------------------------------------------------------------------------------
    def _name(self, key: bytes) -> str:
        """The name of the header (or inline object) of ``key``."""
        if not isinstance(key, bytes) or len(key) != KEY_LEN:
            raise ValueError(f"keys are {KEY_LEN} bytes, got {key!r}")
        return self._name_of_hex(key.hex())

    def _name_of_hex(self, hexkey: str) -> str:
        return f"{self.prefix}{hexkey}"

    @staticmethod
    def _part_name(name: str, version: int, part: int) -> str:
        return f"{name}:{version:016x}:{part}"

    def _old_parts(self, name: str, fixed: Fixed | None, new_version: int | None = None) -> list[str]:
        """Names of the parts of the version ``fixed`` describes (none for an inline or the same version)."""
        if fixed is None:
            return []
        _ps, n, _len, version, inline = fixed
        if inline or version == new_version:
            return []
        return [self._part_name(name, version, p) for p in range(n)]

    # --- deadlines, the breaker and the error policy -------------------------------------------------------
    def _deadline(self, nbytes: int) -> float:
        """Seconds a call moving ``nbytes`` may take."""
        return self.timeout + nbytes / SLOW_BPS

    def _available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _on_outage(self) -> None:
        """Called when a call met an unreachable server (before the breaker opens)."""

    def _record(self, fault: Fault) -> None:
        """Count a failed call; an outage opens the breaker for ``retry_after``."""
        self.counters["timeouts" if fault.kind.value == "timeout" else "errors"] += 1
        if fault.kind.outage:
            self._on_outage()
            if self._available():
                self.log.warning(
                    "%s tier %s failed (%s); skipping it for %.1f s", self.tier_name, self.address, fault,
                    self.retry_after,
                )
            self._down_until = time.monotonic() + self.retry_after

    @contextlib.contextmanager
    def _boundary(self, what: str, *, raises: bool) -> Iterator[_Attempt]:
        """The family's error boundary around server calls: native errors become a :class:`Fault`, which is
        counted (and opens the breaker on an outage); then ``raises`` re-raises it as a
        :class:`~kvpool.BackendError` naming ``what``, else the block ends with ``attempt.fault`` set."""
        attempt = _Attempt()
        try:
            with map_exceptions(self.exception_map):
                yield attempt
        except Fault as fault:
            self._record(fault)
            if raises:
                raise backend_error(fault, what, self.address) from fault.__cause__
            attempt.fault = fault

    def _skipped(self, *counters: str) -> bool:
        """Whether the breaker is open, so the call is answered at once (counted in ``unavailable`` and
        ``counters``)."""
        if self._available():
            return False
        self.counters["unavailable"] += 1
        for c in counters:
            self.counters[c] += 1
        return True

    def _unavailable_error(self) -> BackendError:
        return BackendError(
            errno_mod.EAGAIN, f"the {self.tier_name} tier {self.address} failed recently; retrying in under "
            f"{self.retry_after:.1f} s",
        )

    async def _cpu(self, work: int, fn: Callable[..., _T], *args: Any) -> _T:
        """Pure CPU work (verification, copies) inline, or in a worker thread when large (xxhash and memmove
        release the GIL). The thread is waited for even if the caller is cancelled: it may be writing into
        the caller's tensor."""
        if work < OFFLOAD_BYTES:
            return fn(*args)
        task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            await asyncio.wait({task})
            raise

    # --- the public surface: the policy is here, the transport's moves in the abstract hooks ---------------
    async def read_into(self, key: bytes, dest: torch.Tensor, offset: int = 0) -> bool:
        return (await self._read([ReadRequest(key, dest, offset)]))[0]

    async def read_many(self, requests: Sequence[ReadRequest]) -> list[bool]:
        if not requests:
            return []
        return await self._read(requests)

    async def _read(self, reqs: Sequence[ReadRequest]) -> list[bool]:
        names, sizes = self._check_reads(reqs)
        status: list[str | None] = [None] * len(reqs)
        if not self._skipped():
            with self._boundary("reading", raises=False):
                await self._read_statuses(reqs, names, sizes, status)
        return self._tally(sizes, status)

    @abc.abstractmethod
    async def _read_statuses(
        self, reqs: Sequence[ReadRequest], names: list[str], sizes: list[int], status: list[str | None]
    ) -> None:
        """Serve ``reqs``, setting ``status[i]`` (``ok`` or a miss counter) as each read ends; a native
        exception ends them all (those still ``None`` are misses)."""

    async def object_size(self, key: bytes) -> int | None:
        self._check_open()
        name = self._name(key)
        fixed: Fixed | None = None
        if not self._skipped():
            with self._boundary("measuring an object", raises=False):
                fixed = await self._fixed_header(key, name)
        return fixed[2] if fixed is not None else None

    @abc.abstractmethod
    async def _fixed_header(self, key: bytes, name: str) -> Fixed | None:
        """The fixed part of the header stored under ``name``; None when absent or not ours."""

    async def contains(self, key: bytes) -> bool:
        return (await self.contains_many([key]))[0]

    async def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        self._check_open()
        if not keys:
            return []
        names = [self._name(k) for k in keys]
        found: list[bool] | None = None
        if not self._skipped():
            with self._boundary("looking keys up", raises=False):
                found = await self._exists(names)
        return found if found is not None else [False] * len(keys)

    @abc.abstractmethod
    async def _exists(self, names: list[str]) -> list[bool]:
        """Whether a header is stored under each name."""

    async def write(self, key: bytes, src: torch.Tensor) -> None:
        await self.write_many([(key, src)])

    async def write_many(self, items: Sequence[tuple[bytes, torch.Tensor]]) -> None:
        if not items:
            return
        names, total = self._check_writes(items)
        objs = await self._cpu(total, self._items, items, names)
        try:
            with self._boundary(f"writing {len(items)} object(s)", raises=True):
                await self._write_items(objs, total)
        except BackendError:
            self.counters["write_errors"] += 1
            raise
        self.counters["writes"] += len(objs)
        self.counters["bytes_written"] += total

    @abc.abstractmethod
    async def _write_items(self, objs: list[Item], total: int) -> None:
        """Store ``objs`` (``total`` bytes), each replacing what was there atomically for readers."""

    async def delete(self, key: bytes) -> bool:
        self._check_open()
        name = self._name(key)
        if self._skipped("delete_errors"):
            return False
        found = False
        with self._boundary("deleting an object", raises=False) as attempt:
            found = await self._delete(key, name)
        if attempt.fault is not None:
            self.counters["delete_errors"] += 1
        return found

    @abc.abstractmethod
    async def _delete(self, key: bytes, name: str) -> bool:
        """Remove the object under ``name`` and its parts; whether it was there."""

    # --- reads -------------------------------------------------------------------------------------------
    def _check_reads(self, reqs: Sequence[ReadRequest]) -> tuple[list[str], list[int]]:
        """The header names and byte counts of ``reqs``; ``ValueError`` for a bad key or offset."""
        self._check_open()
        names = [self._name(r.key) for r in reqs]
        for r in reqs:
            if r.offset < 0:
                raise ValueError(f"offset {r.offset} is negative")
            if r.offset % r.dest.element_size():
                raise ValueError(f"offset {r.offset} is not a multiple of the destination's itemsize")
        return names, [nbytes_of(r.dest) for r in reqs]

    def _plan(
        self, index: int, req: ReadRequest, name: str, nbytes: int, value: Value | str,
        hdrs: dict[str, Header | None],
    ) -> Plan | str:
        """The plan of one read from its header value, or the status of its miss (``value`` may already be
        one). ``hdrs`` caches parsed headers by name (several ranges of one object)."""
        if isinstance(value, str):
            return value
        if name not in hdrs:
            hdrs[name] = self.wire.parse_header(value.mv, req.key)
        hdr = hdrs[name]
        if hdr is None:
            return "corrupt"
        if req.offset + nbytes > hdr.length:
            raise ValueError(f"range [{req.offset}, {req.offset + nbytes}) is outside an object of {hdr.length} bytes")
        return Plan(index, req.key, name, hdr, req.offset, nbytes, req.dest, value)

    def _part_wants(self, plans: Sequence[Plan]) -> tuple[list[Ident], list[str], list[int], dict[Ident, list[Plan]]]:
        """The parts multi-part ``plans`` need, each once: idents, names, lengths and the plans using each."""
        want: list[Ident] = []
        names: list[str] = []
        lens: list[int] = []
        users: dict[Ident, list[Plan]] = {}
        for pl in plans:
            for p in pl.parts:
                ident = (pl.key, pl.hdr.version, p)
                if ident not in users:
                    users[ident] = []
                    want.append(ident)
                    names.append(self._part_name(pl.name, pl.hdr.version, p))
                    lens.append(pl.hdr.part_len(p))
                users[ident].append(pl)
            if pl.nbytes:
                pl.filler = Filler(pl.dest)
        return want, names, lens, users

    @staticmethod
    def _finish_inline(plans: Sequence[Plan]) -> None:
        """Verify inline objects and copy their ranges into their destinations. Pure CPU work."""
        for pl in plans:
            hdr, v = pl.hdr, pl.value
            if xxhash.xxh3_64_intdigest(v.mv[hdr.data_off :], part_seed(pl.key, 0)) != hdr.sums[0]:
                pl.status = "corrupt"
                continue
            if pl.nbytes:
                filler = Filler(pl.dest)
                filler.put(0, v.addr + hdr.data_off + pl.offset, pl.nbytes)
                filler.finish()

    @staticmethod
    def _apply_parts(items: Sequence[tuple[Ident, Value | str, list[Plan]]]) -> None:
        """Verify fetched parts (or take the status of a part not fetched) and copy the ranges of the plans
        that use them. Pure CPU work."""
        for (key, _version, p), v, plans in items:
            live = [pl for pl in plans if pl.status == "ok"]
            if not live:
                continue
            hdr = live[0].hdr
            if isinstance(v, str):
                st = v
            elif len(v.mv) != hdr.part_len(p) or xxhash.xxh3_64_intdigest(v.mv, part_seed(key, p)) != hdr.sums[p]:
                st = "corrupt"
            else:
                p0 = p * hdr.part_size
                for pl in live:
                    lo, hi = pl.offset, pl.offset + pl.nbytes
                    a, b = max(lo, p0), min(hi, p0 + hdr.part_len(p))
                    assert pl.filler is not None
                    pl.filler.put(a - lo, v.addr + (a - p0), b - a)
                continue
            for pl in live:
                pl.status = st

    @staticmethod
    def _finish_fillers(plans: Sequence[Plan]) -> None:
        for pl in plans:
            if pl.status == "ok" and pl.filler is not None:
                pl.filler.finish()
            pl.filler = None

    def _tally(self, sizes: Sequence[int], status: Sequence[str | None]) -> list[bool]:
        """The results of a batch of reads from their statuses, counted."""
        out = [st == "ok" for st in status]
        for st in status:
            if st is not None and st != "ok":
                self.counters[st] += 1
        hits = sum(out)
        self.counters["hits"] += hits
        self.counters["misses"] += len(out) - hits
        self.counters["bytes_read"] += sum(s for s, ok in zip(sizes, out) if ok)
        return out

    # --- writes ------------------------------------------------------------------------------------------
    def _check_writes(self, items: Sequence[tuple[bytes, torch.Tensor]]) -> tuple[list[str], int]:
        """The names and total bytes of ``items``; ``ValueError`` for a bad key or an empty object; and a
        :class:`~kvpool.BackendError` at once while the breaker is open."""
        self._check_open()
        names = [self._name(k) for k, _ in items]
        for _, s in items:
            if nbytes_of(s) == 0:
                raise ValueError("cannot store an empty object")
        if self._skipped("write_errors"):
            raise self._unavailable_error()
        return names, sum(nbytes_of(s) for _, s in items)

    def _items(self, items: Sequence[tuple[bytes, torch.Tensor]], names: Sequence[str]) -> list[Item]:
        return [Item(k, nm, flat_bytes(s), self.part_size) for (k, s), nm in zip(items, names)]

    # --- observability -----------------------------------------------------------------------------------
    @property
    def capacity(self) -> int | None:
        return None  # the server's memory bounds the tier

    def stats(self) -> dict[str, Any]:
        return {
            **super().stats(),
            "address": self.address,
            "prefix": self.prefix,
            "part_size": self.part_size,
            "timeout": self.timeout,
            "available": self._available(),
            **self.counters,
        }
