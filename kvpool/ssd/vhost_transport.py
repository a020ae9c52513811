"""asyncio block transport over a vhost-user-blk target (SPDK's vhost, qemu-storage-daemon).

The process shares one memfd *region* with the target, and optionally more memory the caller owns
(:meth:`VhostBlkTransport.add_memory`: the pool's staging arena, so reads land where the pool wants
them); I/O buffers must lie in that memory (the target DMAs straight into them).  Requests travel as descriptor chains in split virtqueues that live in a
second, per-connection shared region.  The data path makes no syscall except one eventfd write per
batch and queue (the kick, skipped when the target says it is polling) and, in eventfd mode, one
eventfd read per completion wake-up.

Completion delivery
-------------------
``poll=False`` (default)
    Each queue's call eventfd is watched with ``loop.add_reader``: no thread per I/O, the loop
    sleeps while I/O is in flight.
``poll=True``
    The target is asked not to signal; while anything is in flight the loop busy-polls the used
    rings in slices of ``poll_slice_us`` (GIL released), yielding to other callbacks between
    slices.  Lowest latency, one core spinning while I/O is outstanding.

Memory-safety contract
----------------------
*A call that returns or is cancelled has finished touching the caller's memory*, as far as a
live, well-behaved target is concerned:

* A cancelled :meth:`VhostBlkTransport.submit` stops staging the rest of the batch, then **waits
  for the descriptors already handed to the target to complete** before ``CancelledError``
  propagates (further cancellations during that wait are absorbed and re-raised at the end).
  That wait is bounded by the batch deadline.
* If the deadline passes or the connection breaks, the target might still be running and might
  still touch buffers it was given.  The transport then drops the connection, raises
  :class:`VhostTimeoutError` / :class:`VhostDisconnectedError`, and *quarantines* the spans of
  every unfinished request: the region allocator will not hand them out again until
  :meth:`VhostBlkTransport.release_quarantine` is called by someone who knows the old target is
  gone (for instance after its process was reaped).  Data read into a quarantined span is
  garbage; a write that failed this way left its blocks undefined.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import errno
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple, Protocol, Self, cast

import torch

import kvpool._vhost as _vhost  # noqa: PLR0402  (mypy cannot see the compiled submodule otherwise)

__all__ = [
    "MAX_EXTRA_REGIONS",
    "OP_FLUSH",
    "OP_READ",
    "OP_WRITE",
    "RegionBuffer",
    "VhostBlkTransport",
    "VhostDisconnectedError",
    "VhostError",
    "VhostOp",
    "VhostTimeoutError",
    "parse_vhost_spec",
]

OP_READ: Final[int] = int(_vhost.OP_READ)
OP_WRITE: Final[int] = int(_vhost.OP_WRITE)
OP_FLUSH: Final[int] = int(_vhost.OP_FLUSH)

_S_OK: Final[int] = int(_vhost.S_OK)
_S_UNSUPP: Final[int] = int(_vhost.S_UNSUPP)
_F_BLK_RO: Final[int] = int(_vhost.F_BLK_RO)
_F_BLK_FLUSH: Final[int] = int(_vhost.F_BLK_FLUSH)
_SECTOR: Final = 512
_ALIGN: Final = 4096
#: caller-owned regions one connection's memory table takes beside the data and ring regions
MAX_EXTRA_REGIONS: Final = 6


#: Raised by the native layer for handshake/protocol failures (an :class:`OSError`).
VhostError: type[OSError] = cast(type[OSError], _vhost.VhostError)


class VhostDisconnectedError(VhostError, ConnectionError):  # type: ignore[misc,valid-type]
    """The target closed or reset the connection while requests were outstanding.

    Attributes
    ----------
    results
        Per-op results of the failed batch: bytes / ``-errno`` for ops that completed before the
        failure, ``None`` for those that did not.
    """

    results: list[int | None]


class VhostTimeoutError(VhostError, TimeoutError):  # type: ignore[misc,valid-type]
    """A request missed its deadline; the target is treated as hung and the connection dropped.

    Attributes
    ----------
    results
        As for :class:`VhostDisconnectedError`.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.results: list[int | None] = []


class VhostOp(NamedTuple):
    """One block request.

    Attributes
    ----------
    kind
        :data:`OP_READ`, :data:`OP_WRITE` or :data:`OP_FLUSH`.
    offset
        Byte offset on the device (a multiple of 512).
    iovs
        ``(address, length)`` pairs inside the transport's region; lengths are non-zero multiples
        of 512.  Empty for a flush.
    """

    kind: int
    offset: int
    iovs: Sequence[tuple[int, int]]

    @staticmethod
    def read(offset: int, iovs: Sequence[tuple[int, int]]) -> VhostOp:
        """A read of ``sum(len)`` bytes at ``offset`` scattered into ``iovs``."""
        return VhostOp(OP_READ, offset, iovs)

    @staticmethod
    def write(offset: int, iovs: Sequence[tuple[int, int]]) -> VhostOp:
        """A write of ``sum(len)`` bytes at ``offset`` gathered from ``iovs``."""
        return VhostOp(OP_WRITE, offset, iovs)

    @staticmethod
    def flush() -> VhostOp:
        """Make every completed write durable (a no-op result 0 if the target is write-through)."""
        return VhostOp(OP_FLUSH, 0, ())


def parse_vhost_spec(spec: str) -> tuple[str, dict[str, str]]:
    """Split ``vhost:///path/to/socket?key=value`` into the socket path and its options.

    Parameters
    ----------
    spec
        A ``vhost://`` URL; the path is absolute (three slashes).

    Returns
    -------
    tuple
        ``(socket_path, options)``.
    """
    import urllib.parse

    u = urllib.parse.urlsplit(spec)
    if u.scheme != "vhost" or u.netloc or not u.path.startswith("/"):
        raise ValueError(f"expected vhost:///absolute/socket/path, got {spec!r}")
    return urllib.parse.unquote(u.path), dict(urllib.parse.parse_qsl(u.query, strict_parsing=False))


# --- typed views of the native objects ---------------------------------------------------------------


class _Region(Protocol):
    @property
    def address(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def fd(self) -> int: ...
    @property
    def hugetlb(self) -> bool: ...
    def contains(self, addr: int, length: int) -> bool: ...
    def close(self) -> None: ...


class _Device(Protocol):
    @property
    def config(self) -> dict[str, Any]: ...
    @property
    def features(self) -> int: ...
    @property
    def protocol_features(self) -> int: ...
    @property
    def num_queues(self) -> int: ...
    @property
    def queue_size(self) -> int: ...
    @property
    def seg_max(self) -> int: ...
    @property
    def size_max(self) -> int: ...
    @property
    def sock_fd(self) -> int: ...
    @property
    def call_fds(self) -> list[int]: ...
    @property
    def event_idx(self) -> bool: ...
    @property
    def error(self) -> str: ...
    def enqueue(
        self, q: int, kind: int, offset: int, iovs: Sequence[tuple[int, int]], token: int, cursor: int
    ) -> tuple[int, int, bool]: ...
    def publish(self, q: int) -> bool: ...
    def reap(self, q: int, drain: bool = True) -> list[tuple[int, int, int, int]]: ...
    def poll(self, spin_ns: int) -> int: ...
    def set_memory(self, extra: Sequence[tuple[int, int, int]]) -> None: ...
    def check_alive(self) -> int: ...
    def shutdown(self) -> None: ...
    def abort(self) -> None: ...
    def queue_info(self, q: int) -> dict[str, int]: ...


# --- region allocator ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegionBuffer:
    """A span of the shared region handed out by :meth:`VhostBlkTransport.alloc`.

    Attributes
    ----------
    addr
        Virtual address of the first byte (also what the target sees).
    nbytes
        Length in bytes (a multiple of 4096).
    offset
        Offset from the start of the region.
    tensor
        ``uint8`` view of the span (shares memory with the region).
    """

    addr: int
    nbytes: int
    offset: int
    tensor: torch.Tensor = field(repr=False, compare=False)

    def iov(self, start: int = 0, length: int | None = None) -> list[tuple[int, int]]:
        """``[(addr + start, length)]``, the iovec list for an op on (part of) this buffer."""
        n = self.nbytes - start if length is None else length
        if start < 0 or n <= 0 or start + n > self.nbytes:
            raise ValueError(f"span [{start}, {start + n}) outside a {self.nbytes}-byte buffer")
        return [(self.addr + start, n)]


class _Allocator:
    """First-fit over ``[0, size)`` in 4 KiB units with coalescing; small and O(free extents)."""

    def __init__(self, size: int) -> None:
        self._starts: list[int] = [0] if size else []
        self._len: dict[int, int] = {0: size} if size else {}
        self.used = 0

    def alloc(self, n: int) -> int | None:
        for s in self._starts:
            ln = self._len[s]
            if ln >= n:
                i = bisect.bisect_left(self._starts, s)
                del self._starts[i]
                del self._len[s]
                if ln > n:
                    bisect.insort(self._starts, s + n)
                    self._len[s + n] = ln - n
                self.used += n
                return s
        return None

    def free(self, s: int, n: int) -> None:
        self.used -= n
        i = bisect.bisect_left(self._starts, s)
        if i < len(self._starts) and self._starts[i] == s + n:  # merge with the next extent
            n += self._len.pop(s + n)
            del self._starts[i]
        if i > 0:
            p = self._starts[i - 1]
            if p + self._len[p] == s:  # merge with the previous extent
                self._len[p] += n
                return
        self._starts.insert(i, s)
        self._len[s] = n


# --- in-flight bookkeeping -----------------------------------------------------------------------------------


class _Batch:
    __slots__ = ("deadline", "drained", "future", "outstanding", "remaining", "results")

    def __init__(self, n: int, future: asyncio.Future[list[int]], deadline: float) -> None:
        self.results: list[int | None] = [None] * n
        self.remaining = n  # ops without a final result
        self.outstanding = 0  # virtio requests handed to the target and not yet completed
        self.future = future
        self.deadline = deadline
        self.drained: asyncio.Future[None] | None = None


class _OpState:
    __slots__ = ("batch", "bytes", "cursor", "done", "err", "index", "op", "staged", "staged_all", "token")

    def __init__(self, batch: _Batch, index: int, op: VhostOp, token: int) -> None:
        self.batch = batch
        self.index = index
        self.op = op
        self.token = token
        self.cursor = 0
        self.staged = 0  # virtio requests staged so far
        self.done = 0  # of those, completed
        self.staged_all = False
        self.bytes = 0
        self.err = 0


def _status_errno(status: int) -> int:
    if status == _S_UNSUPP:
        return -errno.EOPNOTSUPP
    return -errno.EIO  # VIRTIO_BLK_S_IOERR, or a status byte the target never wrote


class VhostBlkTransport:
    """Block I/O on a vhost-user-blk target through shared-memory virtqueues.

    Create with :meth:`connect`.  All methods run on the event loop that connected it.
    """

    def __init__(self, socket_path: str, region: _Region, *, queues: int, queue_size: int, poll: bool,
                 timeout: float, event_idx: bool, poll_slice_us: int) -> None:
        self._path = socket_path
        self._region = region
        self._tensor = torch.frombuffer(cast(Any, region), dtype=torch.uint8)
        self._alloc = _Allocator(region.size)
        # caller-owned memory in the memory table too: (our dup of its fd, address, size)
        self._extra: list[tuple[int, int, int]] = []
        # (start, end) of all of it, the region first: what contains() scans
        self._spans: tuple[tuple[int, int], ...] = ((region.address, region.address + region.size),)
        self._paused = 0  # > 0 while the memory table is being replaced: nothing new is staged
        self._quarantine: list[tuple[int, int]] = []
        self._withheld: list[RegionBuffer] = []
        self._want_queues = queues
        self._queue_size = queue_size
        self._poll = poll
        self._timeout = timeout
        self._event_idx = event_idx
        self._poll_ns = poll_slice_us * 1000
        self._dev: _Device | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inflight: dict[int, _OpState] = {}
        self._waiting: collections.deque[_OpState] = collections.deque()
        self._next_token = 1
        self._rr = 0
        self._poll_scheduled = False
        # One watchdog timer for all batches instead of a TimerHandle per submit (the per-batch
        # timer was a measurable share of the per-op CPU): it fires at the earliest deadline.
        self._active: set[_Batch] = set()
        self._watchdog: asyncio.TimerHandle | None = None
        self._watchdog_at = 0.0
        self._closed = False
        self._last_error: str | None = None
        self._capacity = 0
        self._block = _SECTOR
        self._features = 0
        self.stats: dict[str, int] = collections.Counter()

    # -- construction ---------------------------------------------------------------------------------

    @classmethod
    async def connect(cls, socket_path: str, *, queues: int = 0, region_bytes: int = 64 << 20,
                      poll: bool = False, timeout: float = 10.0, queue_size: int = 256,
                      hugetlb: bool | None = None, event_idx: bool = True,
                      poll_slice_us: int = 50) -> VhostBlkTransport:
        """Connect to the target listening on ``socket_path`` and start its queues.

        Parameters
        ----------
        socket_path
            The target's Unix socket (``vhost:///path`` specs: see :func:`parse_vhost_spec`).
        queues
            Virtqueues to use; 0 takes all the target offers.
        region_bytes
            Size of the shared data region (rounded up to 2 MiB).
        poll
            Busy-poll completions instead of waiting on the call eventfds.
        timeout
            Seconds: the handshake's limit and every request's deadline (``submit`` may override).
        queue_size
            Descriptors per virtqueue (power of two).
        hugetlb
            ``True`` requires 2 MiB huge pages for the region, ``False`` never uses them, ``None``
            uses them when the kernel can supply them.
        event_idx
            Negotiate ``VIRTIO_RING_F_EVENT_IDX`` when offered (fewer kicks and interrupts).
        poll_slice_us
            Poll mode: microseconds spun per loop callback before yielding.

        Returns
        -------
        VhostBlkTransport
            Connected, queues enabled.

        Raises
        ------
        VhostError
            Handshake failure (message says which step), including a timeout.
        """
        region = cast(_Region, await asyncio.to_thread(_vhost.Region, region_bytes, hugetlb))
        t = cls(socket_path, region, queues=queues, queue_size=queue_size, poll=poll, timeout=timeout,
                event_idx=event_idx, poll_slice_us=poll_slice_us)
        try:
            await t._open(deadline=time.monotonic() + timeout, retry=False)
        except BaseException:
            region.close()
            raise
        return t

    async def _open(self, *, deadline: float, retry: bool) -> None:
        loop = asyncio.get_running_loop()
        while True:
            left = deadline - time.monotonic()
            try:
                dev = cast(_Device, await asyncio.to_thread(
                    _vhost.Device, self._path, self._region, self._want_queues, self._queue_size,
                    self._poll, self._event_idx, max(1, int(min(left, self._timeout) * 1000)),
                    list(self._extra)))
                break
            except OSError as e:
                # The socket not being there yet (target restarting) is worth waiting for.
                if not retry or e.errno not in (errno.ENOENT, errno.ECONNREFUSED, errno.ECONNRESET) \
                        or time.monotonic() + 0.05 >= deadline:
                    raise
                await asyncio.sleep(0.05)
        cfg = dev.config
        capacity = int(cfg["capacity"]) * _SECTOR if cfg["valid"] else 0
        if self._capacity and capacity != self._capacity:
            dev.abort()
            raise VhostError(errno.EINVAL, f"target {self._path} changed capacity from {self._capacity} to "
                             f"{capacity} bytes across a reconnect; refusing to use it")
        self._capacity = capacity
        self._block = int(cfg["blk_size"]) if cfg["valid"] and cfg["blk_size"] else _SECTOR
        self._features = dev.features
        self._dev = dev
        self._loop = loop
        self._last_error = None
        loop.add_reader(dev.sock_fd, self._on_socket)
        if not self._poll:
            for q, fd in enumerate(dev.call_fds):
                loop.add_reader(fd, self._on_call, q)

    # -- properties -----------------------------------------------------------------------------------

    @property
    def capacity_bytes(self) -> int:
        """Device size from ``virtio_blk_config.capacity`` (512-byte sectors)."""
        return self._capacity

    @property
    def block_size(self) -> int:
        """Logical block size (``blk_size``); offsets and lengths should be multiples of it."""
        return self._block

    @property
    def seg_max(self) -> int:
        """Data segments the transport puts in one virtio request (target's ``seg_max``)."""
        return self._dev.seg_max if self._dev else 0

    @property
    def max_segment(self) -> int:
        """Bytes per segment (target's ``size_max``, capped at 4 MiB; longer iovecs are split)."""
        return self._dev.size_max if self._dev else 0

    @property
    def num_queues(self) -> int:
        """Virtqueues in use."""
        return self._dev.num_queues if self._dev else 0

    @property
    def read_only(self) -> bool:
        """The target exported the device read-only (``VIRTIO_BLK_F_RO``)."""
        return bool(self._features >> _F_BLK_RO & 1)

    @property
    def connected(self) -> bool:
        """True while a connection is up."""
        return self._dev is not None

    @property
    def last_error(self) -> str | None:
        """Why the last connection was dropped, if it was."""
        return self._last_error

    @property
    def poll_mode(self) -> bool:
        return self._poll

    @property
    def region(self) -> torch.Tensor:
        """The whole shared region as a ``uint8`` tensor (the target can read and write all of it)."""
        return self._tensor

    @property
    def region_address(self) -> int:
        return self._region.address

    @property
    def region_hugetlb(self) -> bool:
        """The region is backed by 2 MiB huge pages (what SPDK in iova=pa mode needs)."""
        return self._region.hugetlb

    @property
    def in_flight(self) -> int:
        """Ops submitted and not finished."""
        return len(self._inflight)

    @property
    def quarantined(self) -> list[tuple[int, int]]:
        """``(addr, len)`` spans a possibly-alive target may still touch (see module docs)."""
        return list(self._quarantine)

    def queue_info(self, q: int) -> dict[str, int]:
        """Counters of virtqueue ``q`` (free descriptors, kicks, suppressed kicks, reaped)."""
        return self._require().queue_info(q)

    # -- region memory --------------------------------------------------------------------------------

    def contains(self, addr: int, length: int) -> bool:
        """Whether ``[addr, addr + length)`` lies inside memory shared with the target: the region, or one
        span given to :meth:`add_memory`."""
        # Called for every iovec of every op (the store asks per memory run): plain comparisons over a
        # tuple of (start, end), no native call or generator.
        end = addr + length
        for a, e in self._spans:
            if a <= addr and end <= e:
                return length > 0
        return False

    @property
    def shared_memory(self) -> list[tuple[int, int]]:
        """``(address, size)`` of the memory added with :meth:`add_memory`, in table order."""
        return [(a, n) for _fd, a, n in self._extra]

    async def add_memory(self, fd: int, address: int, nbytes: int) -> None:
        """Share ``nbytes`` of the caller's memory at ``address`` with the target as well.

        ``address`` must be the start of a ``MAP_SHARED`` mapping of the memfd ``fd`` at offset 0 (the
        pool's staging arena). The transport keeps its own duplicate of ``fd`` (the caller may close
        its own), and every later connection's memory table includes the span. On a live connection
        the table is sent again (``SET_MEM_TABLE``, which every vhost-user target handles and
        qemu-storage-daemon and SPDK both implement by unmapping and remapping all regions): staging
        of new requests pauses until the requests the target holds have completed, so nothing is in
        flight while the target remaps. From then on ops may use the span (:meth:`contains`). The
        memory must stay mapped until :meth:`aclose`.

        Idempotent for a span already added. Cancelled while requests drain, it leaves nothing shared;
        cancelled once the table is on its way, it waits for the target's answer first (the span is then
        shared) and re-raises.

        Parameters
        ----------
        fd
            The memfd ``address`` maps (duplicated: the caller keeps its own).
        address
            Start of the mapping (4 KiB aligned; what descriptors will carry).
        nbytes
            Bytes of it to share (a multiple of 4 KiB).

        Raises
        ------
        ValueError
            Misaligned (4 KiB), overlapping memory already in the table, or more than
            :data:`MAX_EXTRA_REGIONS` spans.
        VhostDisconnectedError, VhostTimeoutError
            The target went away or did not finish its requests in time while the table was being
            replaced; the connection was dropped, the span is kept for the next connection.
        """
        if self._closed:
            raise VhostDisconnectedError(errno.ENOTCONN, "VhostBlkTransport is closed")
        if any(a == address and n == nbytes for _fd, a, n in self._extra):
            return
        if nbytes <= 0 or address % _ALIGN or nbytes % _ALIGN:
            raise ValueError(f"shared memory must be 4 KiB aligned and sized, got ({address:#x}, {nbytes})")
        spans = [(self._region.address, self._region.size), *self.shared_memory]
        if any(address < a + n and a < address + nbytes for a, n in spans):
            raise ValueError(f"({address:#x}, {nbytes}) overlaps memory already shared with the target")
        if len(self._extra) >= MAX_EXTRA_REGIONS:
            raise ValueError(f"at most {MAX_EXTRA_REGIONS} spans can be shared beside the region")
        own = os.dup(fd)  # non-inheritable, like every fd Python makes
        entry = (own, address, nbytes)
        dev = self._dev
        if dev is None:
            self._keep(entry)  # the next connection's first SET_MEM_TABLE carries it
            return
        kept = False
        self._paused += 1
        try:
            try:
                await self._quiesce(dev, time.monotonic() + self._timeout)
            except VhostTimeoutError:
                self._keep(entry)  # the connection was dropped: the next one carries the span
                kept = True
                raise
            if self._dev is not dev:  # dropped while draining
                self._keep(entry)
                kept = True
                raise VhostDisconnectedError(errno.ECONNRESET, f"vhost-user target {self._path}: "
                                             f"{self._last_error} (while sharing memory)")
            loop = self._loop
            assert loop is not None
            # The reply to SET_MEM_TABLE arrives on the socket: _on_socket would take it for an unsolicited
            # message, so the socket is not watched while the thread waits for it.
            loop.remove_reader(dev.sock_fd)
            fut = asyncio.ensure_future(asyncio.to_thread(dev.set_memory, [*self._extra, entry]))
            # Once the message is on its way the target may be remapping: nothing may touch the rings or the
            # socket until the thread is back, so a cancellation waits for it (bounded by the timeout the
            # native layer puts on the reply) and is re-raised afterwards.
            cancelled = False
            while not fut.done():
                try:
                    await asyncio.shield(fut)
                except asyncio.CancelledError:
                    cancelled = True
                except (OSError, ValueError):
                    break
            try:
                fut.result()
            except ValueError:
                loop.add_reader(dev.sock_fd, self._on_socket)  # refused before anything was sent
                raise
            except OSError as e:
                # The target may now hold any memory table: this connection is unusable; the next carries it.
                self._keep(entry)
                kept = True
                exc = VhostDisconnectedError(e.errno or errno.EIO, f"vhost-user target {self._path}: "
                                             f"SET_MEM_TABLE failed: {e}")
                self._fail(exc)
                raise exc from e
            self._keep(entry)
            kept = True
            self.stats["mem_table_updates"] += 1
            if self._dev is dev:
                loop.add_reader(dev.sock_fd, self._on_socket)  # an EOF meanwhile fires it at once
            if cancelled:
                raise asyncio.CancelledError
        finally:
            if not kept:
                os.close(own)  # never shared: a cancelled or refused call leaves no trace
            self._paused -= 1
            self._pump()

    def _keep(self, entry: tuple[int, int, int]) -> None:
        """Record a shared span: :meth:`contains` accepts it, every later connection's table carries it."""
        self._extra.append(entry)
        self._spans = (*self._spans, (entry[1], entry[1] + entry[2]))

    async def _quiesce(self, dev: _Device, deadline: float) -> None:
        """Wait until the target holds no request of ours (staging is paused by the caller)."""
        while self._dev is dev and any(dev.queue_info(q)["outstanding"] for q in range(dev.num_queues)):
            if time.monotonic() >= deadline:
                self.stats["timeouts"] += 1
                self._fail(VhostTimeoutError(errno.ETIMEDOUT, f"vhost-user target {self._path} did not complete "
                                             "its requests within the deadline; treating it as hung"))
                raise VhostTimeoutError(errno.ETIMEDOUT, f"vhost-user target {self._path}: requests did not "
                                        "drain before the memory table could be replaced")
            await asyncio.sleep(0.0005)

    def alloc(self, nbytes: int) -> RegionBuffer:
        """Allocate ``nbytes`` (rounded up to 4 KiB) of the shared region.

        Raises
        ------
        MemoryError
            The region has no free span that large.
        """
        n = max(_ALIGN, (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN)
        off = self._alloc.alloc(n)
        if off is None:
            raise MemoryError(f"vhost region: no free {n}-byte span ({self._alloc.used} of "
                              f"{self._region.size} bytes in use)")
        return RegionBuffer(self._region.address + off, n, off, self._tensor[off:off + n])

    def free(self, buf: RegionBuffer) -> None:
        """Return ``buf`` to the region (withheld while it overlaps a quarantined span)."""
        if any(a < buf.addr + buf.nbytes and buf.addr < a + n for a, n in self._quarantine):
            self._withheld.append(buf)
            return
        self._alloc.free(buf.offset, buf.nbytes)

    def release_quarantine(self) -> int:
        """Forget quarantined spans (the old target is known to be gone); returns buffers released."""
        self._quarantine.clear()
        bufs, self._withheld = self._withheld, []
        for b in bufs:
            self._alloc.free(b.offset, b.nbytes)
        return len(bufs)

    # -- I/O ------------------------------------------------------------------------------------------

    def _validate(self, ops: Sequence[VhostOp]) -> None:
        for i, op in enumerate(ops):
            if op.kind == OP_FLUSH:
                continue
            if op.kind not in (OP_READ, OP_WRITE):
                raise ValueError(f"op {i}: unknown kind {op.kind}")
            if op.offset < 0 or op.offset % _SECTOR:
                raise ValueError(f"op {i}: offset {op.offset} is not a multiple of {_SECTOR}")
            if not op.iovs:
                raise ValueError(f"op {i}: no iovecs")
            for a, n in op.iovs:
                if n <= 0 or n % _SECTOR:
                    raise ValueError(f"op {i}: iovec length {n} is not a positive multiple of {_SECTOR}")
                if not self.contains(a, n):
                    raise ValueError(f"op {i}: iovec ({a:#x}, {n}) is outside the shared region "
                                     f"[{self._region.address:#x}, +{self._region.size}) and the memory "
                                     "added to it; the target cannot reach it")

    async def submit(self, ops: Iterable[VhostOp], *, timeout: float | None = None) -> list[int]:
        """Run ``ops`` (any mix of reads, writes and flushes) and return per-op results.

        Ops are staged into the queues as descriptor chains, split at ``seg_max`` /
        ``max_segment``; each queue is kicked once per batch.  Ops of one batch are independent
        (no ordering between them); put a flush in a later batch to order it after writes.

        Parameters
        ----------
        ops
            The requests.
        timeout
            Seconds until the batch's deadline (default: the transport's ``timeout``).

        Returns
        -------
        list of int
            Bytes transferred, or ``-errno`` (``-EIO`` for a device error such as a read past the
            end, ``-EOPNOTSUPP``, ``-EROFS``), per op in order.

        Raises
        ------
        VhostTimeoutError
            The deadline passed; the connection was dropped (the target is treated as hung).
        VhostDisconnectedError
            The target went away before all ops completed, or the transport is not connected.
        ValueError
            A malformed op (nothing was submitted).
        asyncio.CancelledError
            After every request already handed to the target has completed (module docs).
        """
        batch_ops = list(ops)
        self._validate(batch_ops)
        dev = self._require()
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            raise RuntimeError("VhostBlkTransport used from a different event loop than it connected on")
        if not batch_ops:
            return []
        to = self._timeout if timeout is None else timeout
        batch = _Batch(len(batch_ops), loop.create_future(), loop.time() + to)
        for i, op in enumerate(batch_ops):
            if op.kind == OP_WRITE and self.read_only:
                self._finish_early(batch, i, -errno.EROFS)
            elif op.kind == OP_FLUSH and not (dev.features >> _F_BLK_FLUSH & 1):
                self._finish_early(batch, i, 0)  # no FLUSH feature: the target is write-through
            else:
                st = _OpState(batch, i, op, self._next_token)
                self._next_token += 1
                self._inflight[st.token] = st
                self._waiting.append(st)
        if batch.remaining == 0:
            return cast(list[int], batch.results)
        self._active.add(batch)
        if self._watchdog is None or batch.deadline < self._watchdog_at:
            self._arm_watchdog(batch.deadline)
        self._pump()
        try:
            return await batch.future
        except asyncio.CancelledError:
            await self._drain_cancelled(batch)
            raise

    def _finish_early(self, batch: _Batch, i: int, res: int) -> None:
        batch.results[i] = res
        batch.remaining -= 1

    async def _drain_cancelled(self, batch: _Batch) -> None:
        # Stop staging this batch, then wait until the target is done with what it was given.
        for st in list(self._waiting):
            if st.batch is batch:
                st.staged_all = True
                if st.staged == 0:
                    self._waiting.remove(st)
                    self._inflight.pop(st.token, None)
                    batch.remaining -= 1
                elif st.done == st.staged:
                    self._waiting.remove(st)
                    self._complete_op(st)
        cancelled_again = False
        while batch.outstanding > 0 and self._dev is not None:
            if batch.drained is None or batch.drained.done():
                batch.drained = asyncio.get_running_loop().create_future()
            try:
                await asyncio.shield(batch.drained)
            except asyncio.CancelledError:
                cancelled_again = True
        self.stats["cancelled_batches"] += 1
        if batch.outstanding == 0:
            self._active.discard(batch)
        del cancelled_again  # CancelledError is re-raised by the caller either way

    def _pump(self) -> None:
        """Stage waiting ops into queues with free descriptors; publish (kick) each queue once."""
        dev = self._dev
        if dev is None or self._paused:
            return
        nq = dev.num_queues
        touched = 0
        full = 0
        while self._waiting and full != (1 << nq) - 1:
            st = self._waiting[0]
            q = self._rr % nq
            if full >> q & 1:
                self._rr += 1
                continue
            staged, cursor, done = dev.enqueue(q, st.op.kind, st.op.offset, st.op.iovs, st.token, st.cursor)
            if staged == 0:
                full |= 1 << q
                self._rr += 1
                continue
            touched |= 1 << q
            st.cursor = cursor
            st.staged += staged
            st.batch.outstanding += staged
            if done:
                st.staged_all = True
                self._waiting.popleft()
                # Spread ops over queues; a big op that filled this queue continues on the next.
                self._rr += 1
            else:
                full |= 1 << q
                self._rr += 1
        for q in range(nq):
            if touched >> q & 1:
                if dev.publish(q):
                    self.stats["kicks"] += 1
                else:
                    self.stats["kicks_suppressed"] += 1
        if touched and self._poll:
            self._schedule_poll()

    def _complete(self, q: int, drain: bool) -> None:
        dev = self._dev
        if dev is None:
            return
        comps = dev.reap(q, drain)
        if not comps:
            return
        inflight = self._inflight
        for token, status, nbytes, _used_len in comps:
            st = inflight.get(token)
            if st is None:
                continue
            st.done += 1
            b = st.batch
            b.outstanding -= 1
            if status == _S_OK:
                st.bytes += nbytes
            elif not st.err:
                st.err = _status_errno(status)
            if st.staged_all and st.done == st.staged:
                self._complete_op(st)
            if b.outstanding == 0 and b.drained is not None and not b.drained.done():
                b.drained.set_result(None)
        self.stats["completions"] += len(comps)
        if self._waiting:
            self._pump()

    def _complete_op(self, st: _OpState) -> None:
        del self._inflight[st.token]
        b = st.batch
        b.results[st.index] = st.err if st.err else st.bytes
        b.remaining -= 1
        if b.remaining == 0:
            if b.outstanding == 0:
                self._active.discard(b)
            if not b.future.done():
                b.future.set_result(cast(list[int], b.results))

    # -- completion sources ---------------------------------------------------------------------------

    def _on_call(self, q: int) -> None:
        self._complete(q, True)

    def _schedule_poll(self) -> None:
        if not self._poll_scheduled and self._loop is not None:
            self._poll_scheduled = True
            self._loop.call_soon(self._poll_step)

    def _poll_step(self) -> None:
        self._poll_scheduled = False
        dev = self._dev
        if dev is None or not self._inflight:
            return
        mask = dev.poll(self._poll_ns)
        q = 0
        while mask:
            if mask & 1:
                self._complete(q, False)
            mask >>= 1
            q += 1
        if self._inflight and self._dev is not None:
            self._schedule_poll()

    def _on_socket(self) -> None:
        dev = self._dev
        if dev is None:
            return
        rc = dev.check_alive()
        if rc:
            self._fail(VhostDisconnectedError(-rc, f"vhost-user target {self._path}: {dev.error}"))

    def _arm_watchdog(self, when: float) -> None:
        assert self._loop is not None
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watchdog = self._loop.call_at(when, self._on_watchdog)
        self._watchdog_at = when

    def _on_watchdog(self) -> None:
        self._watchdog = None
        if self._loop is None:
            return
        now = self._loop.time()
        for b in list(self._active):
            if b.remaining == 0 and b.outstanding == 0:
                self._active.discard(b)
            elif b.deadline <= now:
                self._on_deadline(b)
                return
        if self._active:
            self._arm_watchdog(min(b.deadline for b in self._active))

    def _on_deadline(self, batch: _Batch) -> None:
        self.stats["timeouts"] += 1
        self._fail(VhostTimeoutError(errno.ETIMEDOUT, f"vhost-user target {self._path} did not complete "
                                     f"{batch.remaining} request(s) within the deadline; treating it as "
                                     "hung and dropping the connection"))

    def _fail(self, exc: VhostDisconnectedError | VhostTimeoutError) -> None:
        """Drop the connection and fail everything in flight with ``exc`` (a fresh copy per batch)."""
        dev = self._dev
        if dev is None:
            return
        self._dev = None
        self._last_error = str(exc)
        self.stats["disconnects"] += 1
        self._detach(dev)
        dev.abort()  # a hung target must not block us in GET_VRING_BASE
        batches: dict[int, _Batch] = {}
        for st in self._inflight.values():
            if st.staged > st.done:
                # The target was given these buffers and never said it was done with them.
                self._quarantine.extend(st.op.iovs)
            batches[id(st.batch)] = st.batch
        self._inflight.clear()
        self._waiting.clear()
        self._active.clear()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        for b in batches.values():
            b.outstanding = 0
            if b.drained is not None and not b.drained.done():
                b.drained.set_result(None)
            if not b.future.done():
                e = type(exc)(exc.errno, exc.strerror)
                e.results = list(b.results)
                b.future.set_exception(e)

    def _detach(self, dev: _Device) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.remove_reader(dev.sock_fd)
        if not self._poll:
            for fd in dev.call_fds:
                loop.remove_reader(fd)

    def _require(self) -> _Device:
        if self._closed:
            raise VhostDisconnectedError(errno.ENOTCONN, "VhostBlkTransport is closed")
        if self._dev is None:
            raise VhostDisconnectedError(errno.ENOTCONN, f"not connected to {self._path}: {self._last_error} "
                                         "(await reconnect())")
        return self._dev

    # -- lifecycle --------------------------------------------------------------------------------------

    async def _drain(self, deadline: float) -> None:
        while self._inflight and self._dev is not None:
            if time.monotonic() >= deadline:
                self._fail(VhostTimeoutError(errno.ETIMEDOUT, "in-flight requests did not finish before close"))
                return
            await asyncio.sleep(0.001)

    async def _shutdown_dev(self) -> None:
        dev = self._dev
        if dev is None:
            return
        await self._drain(time.monotonic() + self._timeout)
        dev = self._dev
        if dev is None:
            return
        self._dev = None
        self._detach(dev)
        try:
            # GET_VRING_BASE per queue: the target stops the rings and forgets our memory.
            await asyncio.to_thread(dev.shutdown)
        except OSError as e:
            self._last_error = str(e)

    async def reconnect(self, *, timeout: float | None = None) -> None:
        """(Re)establish the connection, waiting up to ``timeout`` for the socket to come back.

        The region (and every buffer in it) is kept; the rings are fresh.  Capacity must not
        change.  A live connection is shut down cleanly first.
        """
        if self._closed:
            raise VhostDisconnectedError(errno.ENOTCONN, "VhostBlkTransport is closed")
        await self._shutdown_dev()
        to = self._timeout if timeout is None else timeout
        await self._open(deadline=time.monotonic() + to, retry=True)
        self.stats["reconnects"] += 1

    async def aclose(self) -> None:
        """Wait for in-flight I/O (bounded by the timeout), stop the rings and close. Idempotent."""
        if self._closed:
            return
        await self._shutdown_dev()
        self._closed = True
        if self._watchdog is not None:
            # a pending timer references this transport (and so its region) until it fires: up to `timeout`
            self._watchdog.cancel()
            self._watchdog = None
        self._region.close()  # the mapping lives on while tensors view it
        extra, self._extra = self._extra, []
        self._spans = ()
        for fd, _a, _n in extra:
            os.close(fd)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
