"""``vhost:///run/spdk/vhost.0`` -- the SSD object store over a vhost-user-blk target (SPDK, qemu-storage-daemon).

The very same store as ``uring://`` (superblock, journal, checkpoints, extents, checksums, recovery; the
store's offsets are device offsets), reached through :class:`VhostTransport` instead of io_uring. So a device
formatted through one transport opens through the other: ``uring://`` on the image file (or a loop device
over it) reads what ``vhost://`` wrote, and back.

Options: ``capacity`` (bounds the device's size from its virtio config lower), ``queues`` (0 = all the target
offers), ``poll=1`` (busy-poll completions), ``region`` (bytes of memory shared with the target; default the
bounce buffer plus 2 MiB, and 4 MiB of metadata staging on top), ``bounce`` (default 32 MiB), ``timeout``
(seconds: every request's deadline), ``format=1``, ``policy``, ``direct``, ``hugetlb`` (``1`` requires 2 MiB
huge pages for the region and the staging arena, ``0`` never for the region).

Memory. Under a :class:`~kvpool.KVPool` the pool's staging arena is shared with the target as well
(:meth:`VhostTransport.attach_memory`): ``get`` results and ``pool.empty()`` tensors are read straight from the
device, and puts of arena tensors written straight to it. The region itself then serves only memory outside the
arena -- ``get_into`` a caller's own tensor, puts of a caller's tensors, unaligned range reads -- which is why
its default bounce buffer is modest; raise ``bounce`` when puts of private tensors dominate.

Faults. The target dying, restarting or missing a deadline fails the batch in flight: reads become misses,
writes raise :class:`~kvpool.errors.BackendError`, and ``faults`` counts it. The next call reconnects when the
socket is back (attempts spaced by a back-off from 50 ms to 2 s, each bounded by ``reconnect_timeout``); a
call made while the target is down fails at once, it never waits for it. Bytes of every acknowledged put were
on the target's device before the put returned, so they read back intact after the reconnect.
"""

from __future__ import annotations

import asyncio
import errno as errno_mod
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs

from ..errors import BackendError, ConfigError
from ..storage.eviction import EvictionPolicy
from .ops import Kind, Op
from .store import UringBackend
from .transport import BlockTransport, DeviceBuffer
from .vhost_transport import (
    OP_FLUSH,
    OP_READ,
    OP_WRITE,
    RegionBuffer,
    VhostBlkTransport,
    VhostDisconnectedError,
    VhostError,
    VhostOp,
    VhostTimeoutError,
)

if TYPE_CHECKING:
    from typing import Self

    from ..config import BackendSpec
    from ..storage.staging import StagingArena

__all__ = ["VhostBackend", "VhostTransport"]

log = logging.getLogger("kvpool.ssd.vhost")

# Bounce buffer default: only memory outside the shared staging arena is staged through it (a caller's own
# tensors, unaligned range reads), so it is modest; the arena is what restores land in.
_BOUNCE = 32 << 20
_STAGE = 4 << 20  # region bytes for ops whose memory the target cannot reach (metadata, private staging)
_MAX_IO = 8 << 20
_BACKOFF_MIN, _BACKOFF_MAX = 0.05, 2.0
_KIND = {Kind.READ: OP_READ, Kind.WRITE: OP_WRITE, Kind.FSYNC: OP_FLUSH}


class VhostTransport(BlockTransport):
    """:class:`BlockTransport` over :class:`~kvpool.ssd.vhost_transport.VhostBlkTransport`.

    Zero-copy only for memory inside the shared region (:meth:`mem_ok`); an op on other memory is staged
    through a small region buffer, one piece at a time (metadata I/O, rare). Reconnects on the next call after
    a fault (module docstring of :mod:`kvpool.ssd.vhost_store`).
    """

    def __init__(self, t: VhostBlkTransport, name: str, reconnect_timeout: float,
                 hugetlb: bool | None = None) -> None:
        self.name = name
        self._t = t
        self._hugetlb = hugetlb
        self._arena: StagingArena | None = None
        self._fixed: list[int] = []  # base address of each registered buffer
        self._stage = t.alloc(_STAGE)
        self._stage_lock = asyncio.Lock()
        self._reconnect_timeout = reconnect_timeout
        self._backoff = _BACKOFF_MIN
        self._next_try = 0.0
        self.counters = {"faults": 0, "reconnects": 0, "reconnect_failures": 0, "staged_ops": 0}
        self.arena_shared = False

    @classmethod
    async def connect(cls, socket: str, *, queues: int = 0, region_bytes: int = 64 << 20, poll: bool = False,
                      timeout: float = 10.0, hugetlb: bool | None = None) -> VhostTransport:
        try:
            t = await VhostBlkTransport.connect(socket, queues=queues, region_bytes=region_bytes + _STAGE,
                                                poll=poll, timeout=timeout, hugetlb=hugetlb)
        except OSError as exc:
            raise BackendError(exc.errno or errno_mod.EIO, f"cannot connect to vhost target {socket}: {exc}",
                               socket) from exc
        return cls(t, socket, reconnect_timeout=min(timeout, 1.0), hugetlb=hugetlb)

    @property
    def raw(self) -> VhostBlkTransport:
        """The underlying vhost-user-blk connection (tests and benchmarks read its counters)."""
        return self._t

    # --- geometry ----------------------------------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int:
        return self._t.capacity_bytes

    @property
    def block_size(self) -> int:
        return self._t.block_size

    @property
    def max_request_bytes(self) -> int:
        # the transport splits at seg_max/size_max itself; 8 MiB bounds the share of one request in a queue
        return _MAX_IO

    @property
    def max_segments(self) -> int:
        return self._t.seg_max or 1

    @property
    def mem_align(self) -> int:
        return 4  # NVMe PRPs need dword-aligned memory; placement in the region is what matters

    # --- memory ------------------------------------------------------------------------------------------
    def mem_ok(self, addr: int, n: int) -> bool:
        return addr % 4 == 0 and n % 512 == 0 and self._t.contains(addr, n)

    async def attach_memory(self, arena: StagingArena) -> None:
        """Add the pool's staging arena (its memfd) to the memory table shared with the target, now and on
        every reconnect, so ``get`` results and ``pool.empty`` tensors are read into with no copy.

        Not shared (reads into it keep going through the bounce buffer, logged once): an arena that is not a
        memfd, and a 4 KiB-page arena when ``hugetlb=1`` asked for huge pages (SPDK in ``iova=pa`` mode cannot
        DMA into memory that is not physically contiguous per 2 MiB, and refuses to register it).
        """
        if arena.fd is None:
            log.warning("vhost target %s: the staging arena is not shared memory (no memfd); reads into it are "
                        "copied through the bounce buffer", self.name)
            return
        if self._hugetlb and not arena.hugetlb:
            log.warning("vhost target %s: hugetlb=1 but the %d MiB staging arena got 4 KiB pages (reserve more "
                        "vm.nr_hugepages); not shared with the target, reads into it are copied through the "
                        "bounce buffer", self.name, arena.nbytes >> 20)
            return
        self._arena = arena
        try:
            await self._t.add_memory(arena.fd, arena.address, arena.nbytes)
        except (VhostDisconnectedError, VhostTimeoutError) as exc:
            # the connection was dropped mid-update; the arena stays in the table the next connection sends
            self.counters["faults"] += 1
            self._next_try = 0.0
            log.warning("vhost target %s: %s; the staging arena is shared from the next connection on",
                        self.name, exc)
        except (VhostError, OSError, ValueError) as exc:
            raise BackendError(getattr(exc, "errno", None) or errno_mod.EIO,
                               f"vhost target {self.name}: cannot share the staging arena: {exc}", self.name) from exc
        self.arena_shared = True

    def alloc(self, nbytes: int) -> DeviceBuffer:
        b = self._t.alloc(nbytes)
        return DeviceBuffer(b.addr, nbytes, b.tensor[:nbytes], b)

    def free(self, buf: DeviceBuffer) -> None:
        assert isinstance(buf.handle, RegionBuffer)
        self._t.free(buf.handle)

    def register(self, buf: DeviceBuffer) -> int:
        self._fixed.append(buf.addr)
        return len(self._fixed) - 1

    # --- I/O ---------------------------------------------------------------------------------------------
    def _encode(self, op: Op) -> VhostOp:
        if op.fixed is not None:
            idx, off, n = op.fixed
            return VhostOp(_KIND[op.kind], op.file_offset, [(self._fixed[idx] + off, n)])
        return VhostOp(_KIND[op.kind], op.file_offset, list(op.iov or ()))

    async def _ensure_connected(self) -> None:
        if self._t.connected:
            return
        now = time.monotonic()
        if now < self._next_try:
            raise BackendError(errno_mod.ENOTCONN, f"vhost target {self.name} is down "
                               f"({self._t.last_error}); next reconnect attempt in {self._next_try - now:.2f} s",
                               self.name)
        try:
            await self._t.reconnect(timeout=self._reconnect_timeout)
        except OSError as exc:
            self.counters["reconnect_failures"] += 1
            self._next_try = time.monotonic() + self._backoff
            self._backoff = min(_BACKOFF_MAX, self._backoff * 2)
            raise BackendError(exc.errno or errno_mod.ENOTCONN,
                               f"vhost target {self.name} is down: reconnect failed: {exc}", self.name) from exc
        # The connection that failed was aborted and a new target answers on the socket: the spans the old
        # one was given are no longer its to touch (a target that hung but lives on is the case this cannot
        # rule out; every request's deadline is what bounds it).
        self._t.release_quarantine()
        self._backoff = _BACKOFF_MIN
        self.counters["reconnects"] += 1

    async def _run(self, vops: list[VhostOp]) -> list[int]:
        try:
            return await self._t.submit(vops)
        except (VhostDisconnectedError, VhostTimeoutError) as exc:
            self.counters["faults"] += 1
            self._next_try = 0.0  # the next call tries to reconnect at once
            raise BackendError(exc.errno or errno_mod.EIO, f"vhost target {self.name}: {exc}", self.name) from exc
        except (VhostError, OSError, ValueError, RuntimeError) as exc:
            raise BackendError(getattr(exc, "errno", None) or errno_mod.EIO, f"vhost {self.name}: {exc}",
                               self.name) from exc

    async def submit(self, ops: Sequence[Op]) -> list[int]:
        await self._ensure_connected()
        vops = [self._encode(op) for op in ops]
        direct = [i for i, v in enumerate(vops) if v.kind == OP_FLUSH or all(self.mem_ok(a, n) for a, n in v.iovs)]
        results = [0] * len(vops)
        if len(direct) == len(vops):
            return await self._run(vops)
        if direct:
            for i, r in zip(direct, await self._run([vops[i] for i in direct])):
                results[i] = r
        ds = set(direct)
        for i in (i for i in range(len(vops)) if i not in ds):
            results[i] = await self._staged(vops[i])
        return results

    async def _staged(self, op: VhostOp) -> int:
        """One op on memory outside the region, through the staging buffer in pieces (copy in / copy out)."""
        import ctypes

        self.counters["staged_ops"] += 1
        stage = self._stage
        done = 0
        async with self._stage_lock:
            pos = op.offset
            for addr, n in op.iovs:
                o = 0
                while o < n:
                    take = min(n - o, stage.nbytes)
                    if op.kind == OP_WRITE:
                        ctypes.memmove(stage.addr, addr + o, take)
                    (res,) = await self._run([VhostOp(op.kind, pos, [(stage.addr, take)])])
                    if res < 0:
                        return res
                    if op.kind == OP_READ:
                        ctypes.memmove(addr + o, stage.addr, res)
                    done += res
                    if res != take:
                        return done
                    o += take
                    pos += take
        return done

    async def aclose(self) -> None:
        await self._t.aclose()

    def stats(self) -> dict[str, Any]:
        t = self._t
        return {**super().stats(), "transport": "vhost", "queues": t.num_queues if t.connected else 0,
                "poll": t.poll_mode, "connected": t.connected, "region_hugetlb": t.region_hugetlb,
                "arena_shared": self.arena_shared, "mem_table_updates": t.stats["mem_table_updates"],
                **self.counters}


class VhostBackend(UringBackend):
    """The SSD object store over a vhost-user-blk target: ``vhost:///path/to/socket``.

    Parameters
    ----------
    socket
        The target's Unix socket.
    capacity
        Bytes of the pool (default: the device's size from its virtio config; may only bound it lower).
    queues
        Virtqueues to use (0: all the target offers).
    poll
        Busy-poll completions (lowest latency, a core spins while I/O is in flight).
    region
        Bytes of the transport's own region shared with the target (default: ``bounce`` + 2 MiB; the pool's
        staging arena is shared on top of it).
    timeout
        Seconds: every request's deadline and the handshake's limit.
    hugetlb
        ``True`` requires 2 MiB huge pages for the region (SPDK in iova=pa mode), ``False`` never uses them,
        ``None`` uses them where reserved. With ``True`` a staging arena that did not get huge pages is not
        shared (reads into it bounce; logged).
    bounce
        Bytes staging I/O on memory the target cannot reach (default 32 MiB: see the module docstring).
    policy, direct, format, readonly
        As for :class:`~kvpool.ssd.store.UringBackend`.
    """

    scheme = "vhost"
    # the target reads and writes the pool's staging arena itself: the pool backs it with a memfd
    capabilities = attrs.evolve(UringBackend.capabilities, host_memory="shared")

    def __init__(
        self,
        socket: str,
        capacity: int | None = None,
        *,
        queues: int = 0,
        poll: bool = False,
        region: int | None = None,
        timeout: float = 10.0,
        hugetlb: bool | None = None,
        bounce: int = _BOUNCE,
        policy: str | EvictionPolicy = "lru",
        direct: bool = True,
        format: bool = False,
        readonly: bool = False,
        verify: bool = True,
    ) -> None:
        if not socket:
            raise ConfigError("vhost:// needs the target's socket, e.g. vhost:///run/spdk/vhost.0")
        super().__init__(socket, capacity, bounce=bounce, policy=policy, direct=direct, format=format,
                         readonly=readonly, verify=verify)
        self._queues = queues
        self._poll = poll
        self._region_bytes = region if region is not None else self._bounce_bytes + (2 << 20)
        if self._region_bytes < self._bounce_bytes + (2 << 20):
            raise ConfigError(f"vhost://{socket}: region={self._region_bytes} must exceed bounce="
                              f"{self._bounce_bytes} by at least 2 MiB")
        self._timeout = timeout
        self._hugetlb = hugetlb

    @classmethod
    def from_spec(cls, spec: BackendSpec) -> Self:
        spec.check_known(("capacity", "queues", "poll", "region", "timeout", "hugetlb", "bounce", "policy",
                          "direct", "format", "verify"))
        try:
            timeout = float(spec.params.get("timeout", "10"))
        except ValueError:
            raise ConfigError(f"{spec.text}: timeout must be a number of seconds") from None
        hugetlb = spec.flag("hugetlb") if "hugetlb" in spec.params else None
        return cls(
            spec.location,
            spec.size("capacity"),
            queues=spec.integer("queues", 0),
            poll=spec.flag("poll"),
            region=spec.size("region"),
            timeout=timeout,
            hugetlb=hugetlb,
            bounce=spec.size("bounce", _BOUNCE) or _BOUNCE,
            policy=spec.params.get("policy", "lru"),
            direct=spec.flag("direct", True),
            format=spec.flag("format"),
            verify=spec.flag("verify", True),
        )

    @property
    def device_path(self) -> str | None:
        """None: a socket is nothing a file-based bandwidth probe can measure."""
        return None

    @property
    def transport(self) -> VhostTransport | None:
        """The open connection's transport (counters, the raw vhost connection); None while closed."""
        t = self._transport
        return t if isinstance(t, VhostTransport) else None

    async def _attach(self) -> tuple[int, bool]:
        t = await VhostTransport.connect(self.path, queues=self._queues, region_bytes=self._region_bytes,
                                         poll=self._poll, timeout=self._timeout, hugetlb=self._hugetlb)
        self._transport = t
        self.is_block_device = True  # a fixed-size device: never grown, never preallocated
        size = t.capacity_bytes
        if size == 0:
            raise self._oserror(errno_mod.ENXIO, f"vhost target {self.path} reports no capacity")
        if t.raw.read_only and not self._readonly:
            raise self._oserror(errno_mod.EROFS, f"vhost target {self.path} exports the device read-only")
        return size, True
