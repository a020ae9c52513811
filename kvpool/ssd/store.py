"""``uring://PATH?capacity=SIZE`` -- the SSD tier: io_uring, O_DIRECT, no filesystem on the data path.

PATH is a regular file (created and preallocated; ``capacity`` bounds its size) or a raw block device
(no filesystem at all). kvpool manages the space itself (see :mod:`._uring_format` for the on-disk format
and the commit protocol): extents aligned to 4 KiB, free-space reuse, a journal and two checkpoint slots,
no per-object files and no filesystem metadata call on the data path.

Data path. A read of an object range becomes one READV straight into the caller's tensor when its memory is
aligned for O_DIRECT (the strided chunk view of a ``[L, 2, T, H, D]`` tensor is 2L runs = 2L iovecs, one
SQE); otherwise it goes through registered bounce buffers (READ_FIXED) and one ``copy_``. Every request of a
batch is queued before a single ``io_uring_enter``; completions arrive on the event loop through an eventfd.
Each object carries per-part xxh3 checksums seeded with its key, verified after every read: a mismatch or an
I/O error is a miss (counted), never data.

What opening does with what is at PATH (kvpool never formats what it cannot recognise as its own):

- nothing there, or an empty file: a new pool is formatted (a new file needs ``capacity``);
- a kvpool pool: it is recovered. ``capacity`` may be left out (the pool's own size is used); a different
  ``capacity`` is refused (ConfigError), since reformatting would lose the pool's objects;
- anything else -- a filesystem, a partition table, zeros, unknown bytes, a pool of an older format -- is
  refused with :class:`~kvpool.ssd.errors.NotAPoolError` naming the path and what its first bytes look like;
  a kvpool superblock that does not check out with :class:`~kvpool.ssd.errors.PoolDamagedError`;
- ``?format=1`` (``UringBackend(..., format=True)``) formats PATH at every open, whatever it holds
  (destroying it): for a new pool on a used device, or to change a pool's ``capacity``.

:meth:`UringBackend.open_readonly` (used by ``kvpool inspect``/``fsck``) never writes, locks or formats, and
works on a pool another process holds open. A block device of size 0 (a detached loop device) is reported as
such.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno as errno_mod
import fcntl
import logging
import os
import random
import stat
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import xxhash

from ..storage.allocator import ExtentAllocator
from ..errors import BackendError, CapacityError, ConfigError, PoolLockedError
from .errors import NotAPoolError, PoolDamagedError
from ..storage.eviction import EvictionPolicy, PolicyHints, make_policy
from ..storage.buffers import OFFLOAD_BYTES, aligned_empty, alloc_aligned, buffer_address, tensor_runs
from .settle import gather_settled, wait_uncancellable
from .uring_engine import OP_FSYNC, OP_READ, OP_WRITE, UringEngine
from . import format as fmt
from ..storage.backend import Backend, Capabilities, ReadRequest, nbytes_of

if TYPE_CHECKING:
    from typing import Self

    from ..config import BackendSpec

__all__ = ["UringBackend"]

log = logging.getLogger("kvpool.uring")

BLOCK = fmt.BLOCK
_IOV_MAX = 512  # iovecs per SQE (the kernel's limit is 1024)
_MAX_IO = 8 << 20  # upper bound of one request; lowered to the device's max_sectors_kb at open
_LOCK_WAIT_S = 2.0


#: records of one put/delete, the future its caller waits on, and what to publish once they are durable
_JournalItem = tuple[list[bytes], "asyncio.Future[None]", "Callable[[], None] | None"]


def _mem(addr: int, n: int) -> memoryview:
    return memoryview((ctypes.c_char * n).from_address(addr)).cast("B")


def _device_max_io(st: os.stat_result, is_block: bool) -> int:
    """Largest request worth issuing: the device's max_sectors_kb (the block layer splits anything larger,
    and some devices -- throttled loop devices among them -- then serve the pieces at a fraction of the rate)."""
    dev = st.st_rdev if is_block else st.st_dev
    base = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
    for q in (f"{base}/queue/max_sectors_kb", f"{base}/../queue/max_sectors_kb"):  # disk, or a partition's disk
        try:
            with open(q) as f:
                kb = int(f.read().strip())
            return max(128 << 10, min(_MAX_IO, kb * 1024 // BLOCK * BLOCK))
        except (OSError, ValueError):
            continue
    return _MAX_IO


def _op_len(op: tuple[Any, ...]) -> int:
    """Bytes a read or write op moves when it completes in full."""
    spec = op[4]
    return int(spec[3]) if spec[0] == "fixed" else sum(n for _, n in spec[1])


def _part_seed(key: bytes, part: int) -> int:
    return (fmt.key_seed(key) + part * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF


def _part_hashes(runs: list[tuple[int, int]], key: bytes, first_part: int, sizes: list[int]) -> list[int]:
    """xxh3 of consecutive parts laid end to end over ``runs``, walking the runs once."""
    out = []
    ri, rpos = 0, 0  # current run, bytes of it consumed
    for j, size in enumerate(sizes):
        seed = _part_seed(key, first_part + j)
        addr, n = runs[ri]
        if n - rpos >= size:  # the part lies in one run: one call, no streaming state
            out.append(xxhash.xxh3_64_intdigest(_mem(addr + rpos, size), seed))
            rpos += size
        else:
            h = xxhash.xxh3_64(seed=seed)
            need = size
            while need:
                addr, n = runs[ri]
                take = min(need, n - rpos)
                h.update(_mem(addr + rpos, take))
                rpos += take
                need -= take
                if rpos == n and need:
                    ri, rpos = ri + 1, 0
            out.append(h.intdigest())
        if rpos == runs[ri][1] and ri + 1 < len(runs):
            ri, rpos = ri + 1, 0
    return out


def _part_sizes(length: int, part_size: int, first: int, stop: int) -> list[int]:
    return [min(part_size, length - p * part_size) for p in range(first, stop)]


def _checksums(runs: list[tuple[int, int]], key: bytes, length: int, part_size: int) -> tuple[int, ...]:
    return tuple(_part_hashes(runs, key, 0, _part_sizes(length, part_size, 0, -(-length // part_size))))


class _Bounce:
    """Registered, page-aligned staging memory, handed out in extents; waiters queue when it is full."""

    def __init__(self, nbytes: int) -> None:
        self.buf = alloc_aligned(nbytes)
        self.addr = buffer_address(self.buf)
        self.alloc = ExtentAllocator(nbytes, BLOCK)
        self.tensor = torch.frombuffer(self.buf, dtype=torch.uint8)
        self._cond = asyncio.Condition()

    async def get(self, n: int) -> int:
        async with self._cond:
            while True:
                off = self.alloc.alloc(n)
                if off is not None:
                    return off
                await self._cond.wait()

    async def put(self, off: int, n: int) -> None:
        async with self._cond:
            self.alloc.free(off, n)
            self._cond.notify_all()


class UringBackend(PolicyHints, Backend):
    """SSD tier on a file or raw block device through io_uring.

    Parameters
    ----------
    path
        A regular file (created if missing) or a block device.
    capacity
        Bytes of the file (required to create one); for a device, defaults to the device's size.
    entries
        io_uring submission queue depth.
    bounce
        Bytes of registered staging memory for unaligned caller buffers.
    sqpoll
        Use a kernel submission-polling thread (IORING_SETUP_SQPOLL).
    policy
        Eviction policy name or object.
    direct
        Read straight into caller memory when it is aligned (default); ``False`` forces bounce buffers.
    format
        Format whatever is at ``path`` (``?format=1``), destroying it, on this open. Without it, only a missing
        or empty file is formatted; anything else that is not a kvpool pool is refused (:class:`NotAPoolError`).
    readonly
        Open without writing, locking or formatting (see :meth:`open_readonly`).
    """

    scheme = "uring"
    # survives restarts and crashes; flush() is an fdatasync; policy-ordered; reads any range
    capabilities = Capabilities(
        persistent=True, durable=True, device_memory=False, partial_reads=True, remote=False, queued_io=True,
        eviction_hints=True, read_bandwidth=None,
    )

    def __init__(
        self,
        path: str | os.PathLike[str],
        capacity: int | None = None,
        *,
        entries: int = 256,
        bounce: int = 256 << 20,
        sqpoll: bool = False,
        policy: str | EvictionPolicy = "lru",
        direct: bool = True,
        format: bool = False,  # noqa: A002  (the spec option's name)
        readonly: bool = False,
    ) -> None:
        super().__init__()
        self.path = os.fspath(path)
        if not self.path:
            raise ConfigError("uring:// needs a path, e.g. uring:///var/cache/kv.pool?capacity=100GiB")
        self._req_capacity = capacity
        self._entries = entries
        self._bounce_bytes = max(bounce, 4 << 20) // (2 << 20) * (2 << 20)
        self._sqpoll = sqpoll
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        self._policy_name = policy if isinstance(policy, str) else None
        self._direct = direct
        self._format_ok = format
        self._readonly = readonly
        if format and readonly:
            raise ConfigError(f"uring://{self.path}: format and readonly exclude each other")
        self._fd = -1
        self._engine: UringEngine | None = None
        self._bounce: _Bounce | None = None
        self._geo: fmt.Geometry | None = None
        self._alloc: ExtentAllocator | None = None
        self._index: dict[bytes, fmt.Entry] = {}
        self._meta_bytes = 0
        self._epoch = 0
        self._seq = 0
        self._jpos = 0  # next journal block
        self._jpending: list[_JournalItem] = []
        self._jtask: asyncio.Task[None] | None = None
        self._mem_align = BLOCK
        self._max_io = _MAX_IO
        self.is_block_device = False
        self.counters = {
            "hits": 0,
            "misses": 0,
            "corrupt": 0,
            "read_errors": 0,
            "evictions": 0,
            "bytes_read": 0,
            "bytes_written": 0,
            "direct_reads": 0,
            "bounce_reads": 0,
            "checkpoints": 0,
            "recovered_objects": 0,
            "dropped_on_recovery": 0,
        }

    @classmethod
    def from_spec(cls, spec: BackendSpec) -> Self:
        spec.check_known(("capacity", "entries", "bounce", "sqpoll", "policy", "direct", "format"))
        return cls(
            spec.location,
            spec.size("capacity"),
            entries=spec.integer("entries", 256),
            bounce=spec.size("bounce", 256 << 20) or (256 << 20),
            sqpoll=spec.flag("sqpoll"),
            policy=spec.params.get("policy", "lru"),
            direct=spec.flag("direct", True),
            format=spec.flag("format"),
        )

    @classmethod
    def open_readonly(cls, path: str | os.PathLike[str], **kwargs: Any) -> Self:
        """A view of the pool at ``path`` that never writes, locks or formats: ``async with`` it to read.

        It recovers the index the way an open does (checkpoint, then the journal) but writes no checkpoint,
        takes no lock and does not open a device exclusively, so it works on a pool another process holds
        open (and sees that pool as of its last journal block). Writes and deletes raise BackendError.
        """
        return cls(path, readonly=True, **kwargs)

    # --- sizes -------------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int | None:
        return self._geo.d_len if self._geo else self._req_capacity

    @property
    def used_bytes(self) -> int:
        return self._alloc.used if self._alloc else 0

    def __len__(self) -> int:
        return len(self._index)

    async def object_size(self, key: bytes) -> int | None:
        e = self._index.get(key)
        return e.length if e else None

    # --- errors ------------------------------------------------------------------------------------------
    def _oserror(self, err: int, what: str) -> BackendError:
        return BackendError(err, f"{what}: {os.strerror(err)}", self.path)

    # --- open / close ------------------------------------------------------------------------------------
    async def _open(self) -> None:
        try:
            await self._open_inner()
        except BaseException:
            await self._teardown()  # a failed open holds nothing: no ring, no descriptor, no lock
            self._geo = None
            self._alloc = None
            self._index.clear()
            raise

    async def _open_inner(self) -> None:
        path = self.path
        ro = self._readonly
        try:
            st: os.stat_result | None = os.stat(path)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise self._oserror(exc.errno or errno_mod.EIO, f"cannot stat {path}") from exc
        exists = st is not None
        self.is_block_device = bool(st and stat.S_ISBLK(st.st_mode))
        if st is not None and not (self.is_block_device or stat.S_ISREG(st.st_mode)):
            raise ConfigError(f"uring://{path} is neither a regular file nor a block device")
        if not exists and ro:
            raise self._oserror(errno_mod.ENOENT, f"{path} does not exist")
        flags = (os.O_RDONLY if ro else os.O_RDWR) | os.O_CLOEXEC | getattr(os, "O_DIRECT", 0)
        if self.is_block_device and not ro:
            flags |= os.O_EXCL  # refuses a device that is mounted or held by another O_EXCL opener
        elif not exists:
            if self._req_capacity is None:
                raise ConfigError(f"uring://{path}: a new pool file needs ?capacity=SIZE")
            flags |= os.O_CREAT | os.O_EXCL  # we create it, or we treat it as something already there
        deadline = asyncio.get_running_loop().time() + _LOCK_WAIT_S
        err: OSError | None = None
        while True:
            try:
                self._fd = os.open(path, flags, 0o600)
                break
            except OSError as exc:
                # EBUSY: mounted, or held exclusively -- perhaps by the ring of a pool closed a moment ago
                if exc.errno != errno_mod.EBUSY or asyncio.get_running_loop().time() >= deadline:
                    err = exc
                    break
                await asyncio.sleep(0.02)
        if self._fd < 0:
            assert err is not None
            if err.errno == errno_mod.EBUSY:
                raise PoolLockedError(err.errno, f"{path} is in use (mounted or opened exclusively)", path) from err
            if err.errno == errno_mod.EINVAL:
                raise self._oserror(err.errno, f"{path}: the filesystem does not support O_DIRECT") from err
            if err.errno == errno_mod.EEXIST:
                raise self._oserror(err.errno, f"{path} appeared while the pool was being created") from err
            raise self._oserror(err.errno or errno_mod.EIO, f"cannot open {path}") from err
        if not ro:
            await self._lock(deadline)

        if self.is_block_device:
            size = os.lseek(self._fd, 0, os.SEEK_END)
            if size == 0:
                raise self._oserror(errno_mod.ENXIO, f"{path} is a block device of size 0 "
                                    "(a loop device with no backing file, or a removed disk?)")
        else:
            size = os.fstat(self._fd).st_size

        self._engine = UringEngine(entries=self._entries, sqpoll=self._sqpoll)
        self._engine.register_files([self._fd])
        self._bounce = _Bounce(self._bounce_bytes)
        self._engine.register_buffers([self._bounce.buf])
        self._max_io = _device_max_io(os.fstat(self._fd), self.is_block_device)
        await self._load_or_format(size, exists=exists)
        # probed once block 0 holds a superblock (an O_DIRECT read at EOF checks no alignment)
        self._mem_align = await self._probe_mem_align()

    async def _load_or_format(self, size: int, *, exists: bool) -> None:
        """Recover the pool at the path, or format it if it is new (or the user asked): see the module doc."""
        path, ro = self.path, self._readonly
        fresh = not exists or (not self.is_block_device and size == 0)  # nothing there that could be lost
        if fresh or self._format_ok:
            if ro:
                raise NotAPoolError(errno_mod.ENODATA, f"{path} is empty: not a kvpool pool", path)
            if not fresh:
                log.warning("%s: formatting it (format=1), whatever it held", path)
            await self._format(self._total_for(self._req_capacity, size), created=not exists)
            return
        head = await self._read_head(min(fmt.SNIFF_BYTES, size))
        kind, what = fmt.identify(head)
        if kind == "pool":
            geo = fmt.Geometry.unpack_superblock(head)
            assert geo is not None
            want = None if self._req_capacity is None else self._total_for(self._req_capacity, size)
            if want is not None and want != geo.total:
                raise ConfigError(
                    f"uring://{path} holds a kvpool pool of {geo.total} bytes; opening it with capacity={want} "
                    f"would destroy it. Open it with capacity={geo.total} (or none) to keep its data, or add "
                    "?format=1 to reformat it (its objects are lost)"
                )
            if geo.total > size and self.is_block_device:
                raise PoolDamagedError(errno_mod.EIO, f"{path}: the pool is {geo.total} bytes but the device "
                                       f"only {size} (was the device shrunk?)", path)
            if geo.total > size and not ro:  # a pool file someone truncated: it is ours, grow it back
                await asyncio.to_thread(self._preallocate, geo.total, created=False)
            self._geo = geo
            await self._recover()
            return
        if kind == "damaged-pool":
            raise PoolDamagedError(errno_mod.EUCLEAN, f"{path}: {what}. Nothing was changed; `kvpool fsck {path}` "
                                   "shows what is left, ?format=1 reformats it (its objects are lost)", path)
        raise NotAPoolError(
            errno_mod.EEXIST,
            f"{path} is not a kvpool pool: it holds {what}. kvpool never formats what it does not recognise as "
            "its own; add ?format=1 (UringBackend(..., format=True)) to format it, destroying what is there",
            path,
        )

    def _total_for(self, capacity: int | None, size: int) -> int:
        """The pool size to format: the requested capacity (a device's size by default), whole blocks."""
        if self.is_block_device:
            total = capacity or size
            if total > size:
                raise ConfigError(f"uring://{self.path}: capacity {total} exceeds the device's {size} bytes")
        else:
            if capacity is None:
                if size == 0:
                    raise ConfigError(f"uring://{self.path}: a new pool file needs ?capacity=SIZE")
                capacity = size
            total = capacity
        total -= total % BLOCK
        if total < 4 * fmt.BLOCK + 3 * 64 * 1024 + (1 << 20):
            raise ConfigError(f"uring://{self.path}: capacity {total} is too small (at least 2 MiB)")
        return total

    async def _lock(self, deadline: float) -> None:
        # A process killed a moment ago still holds the lock until the kernel tears its ring down (the ring's
        # registered-file reference keeps the open file alive): wait a little before calling the file taken.
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno not in (errno_mod.EWOULDBLOCK, errno_mod.EAGAIN):
                    raise self._oserror(exc.errno or errno_mod.EIO, f"cannot lock {self.path}") from exc
                if asyncio.get_running_loop().time() >= deadline:
                    raise PoolLockedError(exc.errno, f"{self.path} is already used by another open pool",
                                          self.path) from exc
                await asyncio.sleep(0.02)

    def _preallocate(self, total: int, *, created: bool) -> None:
        """Reserve the file's blocks up front (no ENOSPC mid-put); on failure leave no half-grown file."""
        st = os.fstat(self._fd)
        have = st.st_blocks * 512
        vfs = os.fstatvfs(self._fd)
        free = vfs.f_bavail * vfs.f_frsize
        if total - have > free:
            if created:
                os.unlink(self.path)
            raise self._oserror(
                errno_mod.ENOSPC, f"cannot preallocate {total} bytes for {self.path} ({free} bytes free)"
            )
        old_size = st.st_size
        try:
            if old_size != total:
                os.ftruncate(self._fd, total)
            os.posix_fallocate(self._fd, 0, total)
        except OSError as exc:
            try:
                if created:
                    os.unlink(self.path)
                else:
                    os.ftruncate(self._fd, old_size)
            except OSError:
                pass
            raise self._oserror(exc.errno or errno_mod.EIO, f"cannot preallocate {total} bytes") from exc

    async def _teardown(self) -> None:
        if self._jtask is not None:
            try:
                await self._jtask
            except Exception:
                pass
            self._jtask = None
        if self._engine is not None:
            await self._engine.aclose()
            self._engine = None
        if self._fd >= 0:
            # Unlock explicitly: a ring's registered-file reference can outlive close() for a moment, and
            # the flock belongs to the open file, not to this descriptor.
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = -1
        self._bounce = None

    async def _close(self) -> None:
        try:
            if not self._readonly:
                await self._drain_journal()
                await self._checkpoint()  # next open replays nothing
        finally:
            await self._teardown()
            self._index.clear()
            self._alloc = None
            self._geo = None
            self.policy = make_policy(self._policy_name) if self._policy_name else self.policy

    @property
    def device_path(self) -> str | None:
        """The pool file or block device (what a bandwidth probe measures and its cache is keyed by)."""
        return self.path

    async def flush(self) -> None:
        """Make every completed put durable against power loss (fdatasync of the file or device)."""
        self._check_open()
        if self._readonly:
            return
        await self._drain_journal()
        assert self._engine is not None
        (res,) = await self._engine.submit([(OP_FSYNC, 0, 0, 0, None)])
        if res < 0:
            raise self._oserror(-res, "fdatasync failed")

    # --- raw metadata I/O --------------------------------------------------------------------------------
    async def _probe_mem_align(self) -> int:
        """Smallest memory alignment O_DIRECT accepts here (512 on most devices, 4096 on some)."""
        assert self._bounce is not None and self._engine is not None
        for align in (512, BLOCK):
            (res,) = await self._engine.submit([(OP_READ, 0, 0, 0, ("iov", [(self._bounce.addr + align, BLOCK)]))])
            if res >= 0:
                return align
        return BLOCK

    async def _read_head(self, n: int) -> bytes:
        """The first ``n`` bytes (fewer if the file is shorter), zero-padded to ``n``."""
        assert self._engine is not None
        size = fmt.align_up(max(n, BLOCK))
        buf = alloc_aligned(size, hugepages=False)
        try:
            (res,) = await self._engine.submit([(OP_READ, 0, 0, 0, ("iov", [(buffer_address(buf), size)]))])
            if res < 0:
                raise self._oserror(-res, f"cannot read the start of {self.path}")
            return bytes(buf[:res]).ljust(n, b"\0")[:n]
        finally:
            buf.close()

    async def _read_meta(self, offset: int, n: int) -> bytes | None:
        assert self._engine is not None
        buf = alloc_aligned(fmt.align_up(n), hugepages=False)
        try:
            (res,) = await self._engine.submit([(OP_READ, 0, 0, offset, ("iov", [(buffer_address(buf), fmt.align_up(n))]))])
            if res < n:
                return None
            return bytes(buf[:n])
        finally:
            buf.close()

    async def _write_meta(self, offset: int, data: bytes) -> None:
        assert self._engine is not None
        n = fmt.align_up(len(data))
        buf = alloc_aligned(n, hugepages=False)
        try:
            buf[: len(data)] = data
            (res,) = await self._engine.submit([(OP_WRITE, 0, 0, offset, ("iov", [(buffer_address(buf), n)]))])
        finally:
            buf.close()
        if res < 0:
            raise self._oserror(-res, f"metadata write at {offset} failed")
        if res != n:
            raise self._oserror(errno_mod.EIO, f"short metadata write at {offset}")

    # --- format and recovery -----------------------------------------------------------------------------
    async def _format(self, total: int, *, created: bool) -> None:
        """Lay out an empty pool of ``total`` bytes under a new format uuid.

        The superblock goes first: from that moment only checkpoints of the new uuid count, so a crash at any
        later point leaves an empty pool, never the previous format's objects. Both checkpoint slots are then
        cleared as well (older kvpool versions did not bind checkpoints to a format).
        """
        geo = fmt.Geometry.for_size(total, os.urandom(16))
        self._geo = geo
        self._alloc = ExtentAllocator(geo.d_len, BLOCK)
        self._index.clear()
        self._meta_bytes = 0
        self._epoch = random.getrandbits(62)  # stale journal blocks of an earlier format never match
        await self._write_meta(0, geo.pack_superblock())
        if not self.is_block_device:
            await asyncio.to_thread(self._preallocate, total, created=created)
        await self._write_meta(geo.ckpt_a, b"\0" * BLOCK)
        await self._write_meta(geo.ckpt_b, b"\0" * BLOCK)
        await self._checkpoint()

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

    # --- journal (group commit) --------------------------------------------------------------------------
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

    async def _checkpoint_with(self, batch: list[_JournalItem]) -> None:
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

    # --- space -------------------------------------------------------------------------------------------
    def _release(self, e: fmt.Entry) -> None:
        e.dead = True
        self._meta_bytes -= e.packed_size
        if e.pins == 0:
            assert self._alloc is not None
            self._alloc.free(e.offset, e.extent)

    def _unpin(self, e: fmt.Entry) -> None:
        e.pins -= 1
        if e.dead and e.pins == 0:
            assert self._alloc is not None
            self._alloc.free(e.offset, e.extent)

    def _allocate(self, length: int, meta: int, dels: list[bytes]) -> int:
        assert self._alloc is not None and self._geo is not None
        if fmt.align_up(length) > self._alloc.capacity:
            raise CapacityError(f"an object of {length} bytes cannot fit in uring://{self.path} "
                                f"({self._alloc.capacity} bytes of data space)")
        meta_room = self._geo.ckpt_len - BLOCK
        while True:
            if self._meta_bytes + meta <= meta_room:
                off = self._alloc.alloc(length)
                if off is not None:
                    return off
            victim = next((k for k in self.policy.candidates() if self._index[k].pins == 0), None)
            if victim is None:
                raise CapacityError(f"uring://{self.path} is full and every object is in use")
            e = self._index.pop(victim)
            self.policy.remove(victim)
            self._release(e)
            dels.append(fmt.del_record(victim))
            self.counters["evictions"] += 1

    # --- writes ------------------------------------------------------------------------------------------
    def _aligned(self, runs: list[tuple[int, int]]) -> bool:
        a = self._mem_align
        return self._direct and all(addr % a == 0 and n % 512 == 0 for addr, n in runs)

    async def write(self, key: bytes, src: torch.Tensor) -> None:
        await self.write_many([(key, src)])

    def _groups(self, sizes: list[int]) -> list[range]:
        """Split a batch so that each group's staging memory fits in half the bounce buffer."""
        assert self._bounce is not None
        cap = self._bounce.alloc.capacity // 2
        groups, start, acc = [], 0, 0
        for i, n in enumerate(sizes):
            n = n if n <= self._bounce.alloc.capacity else 0  # larger ones use private staging memory
            if acc + n > cap and i > start:
                groups.append(range(start, i))
                start, acc = i, 0
            acc += n
        groups.append(range(start, len(sizes)))
        return groups

    def _check_writable(self) -> None:
        self._check_open()
        if self._readonly:
            raise self._oserror(errno_mod.EROFS, f"{self.path} is open read-only")

    async def write_many(self, items: Sequence[tuple[bytes, torch.Tensor]]) -> None:
        self._check_writable()
        for _, src in items:
            if nbytes_of(src) == 0:
                raise ValueError("cannot store an empty object")
        if not items:
            return
        groups = self._groups([fmt.align_up(nbytes_of(s)) for _, s in items])
        if len(groups) == 1:
            await self._write_group(items)
        else:
            await gather_settled(*(self._write_group([items[i] for i in g]) for g in groups))

    async def _write_group(self, items: Sequence[tuple[bytes, torch.Tensor]]) -> None:
        assert self._engine is not None and self._bounce is not None
        # One reservation of staging memory per group, taken atomically: groups never deadlock on it.
        need = sum(fmt.align_up(nbytes_of(s)) for _, s in items)
        need = need if need <= self._bounce.alloc.capacity else 0
        res_base = await self._bounce.get(need) if need else 0
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
                sums = _checksums(runs, key, n, ps)
                self._seq += 1
                e = fmt.Entry(key, 0, n, ps, sums, self._seq)
                e.offset = self._allocate(n, e.packed_size, dels)
                e.pins = 1  # not visible yet; eviction cannot pick it, and a failure frees it
                self._meta_bytes += e.packed_size
                if n % BLOCK == 0 and self._aligned(runs):
                    staged.append((key, e, runs, None))
                else:
                    ext = e.extent
                    if not need or cursor + ext > need:
                        # too large to stage at once: a contiguous aligned copy of our own
                        tmp = aligned_empty((ext,), torch.uint8)
                        tmp[n:].zero_()
                        tmp[:n].view(src.dtype).view(src.shape).copy_(src)
                        keep.append(tmp)
                        staged.append((key, e, [(tmp.data_ptr(), ext)], None))
                    else:
                        boff = res_base + cursor
                        cursor += ext
                        view = self._bounce.tensor[boff : boff + ext]
                        view[:n].view(src.dtype).view(src.shape).copy_(src)
                        if ext > n:
                            view[n:].zero_()
                        staged.append((key, e, [], (boff, ext)))
            ops = []
            for _key, e, runs, b in staged:
                file_off = self._geo.d_off + e.offset if self._geo else 0
                if b is not None:
                    for o in range(0, b[1], self._max_io):
                        ln = min(self._max_io, b[1] - o)
                        ops.append((OP_WRITE, 0, 0, file_off + o, ("fixed", 0, b[0] + o, ln)))
                else:
                    ops.extend(self._iov_ops(OP_WRITE, runs, file_off))
            results = await self._engine.submit(ops)
            for op, r in zip(ops, results):
                if r < 0:
                    raise self._oserror(-r, "write failed")
                if r != _op_len(op):  # a short write (e.g. past a shrunk device's end) is a failed write
                    raise self._oserror(errno_mod.EIO, f"short write at {op[3]}: {r} of {_op_len(op)} bytes")
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
            if need:
                await self._bounce.put(res_base, need)

    def _iov_ops(self, op: int, runs: list[tuple[int, int]], file_off: int) -> list[tuple[Any, ...]]:
        """Ops covering ``runs`` laid end to end at ``file_off``: <= _IOV_MAX iovecs and <= max_io bytes each."""
        max_io = self._max_io
        ops: list[tuple[Any, ...]] = []
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
                    ops.append((op, 0, 0, pos, ("iov", cur)))
                    pos += cur_n
                    cur, cur_n = [], 0
        if cur:
            ops.append((op, 0, 0, pos, ("iov", cur)))
        return ops

    # --- reads -------------------------------------------------------------------------------------------
    async def read_into(self, key: bytes, dest: torch.Tensor, offset: int = 0) -> bool:
        return (await self.read_many([ReadRequest(key, dest, offset)]))[0]

    def _span(self, r: ReadRequest) -> int:
        """Bytes a read stages at most: the covering checksum parts (0 for a missing key)."""
        e = self._index.get(r.key)
        if e is None:
            return 0
        n = nbytes_of(r.dest)
        parts = fmt.parts_covering(e, r.offset, min(r.offset + n, e.length))
        return fmt.align_up(min(parts.stop * e.part_size, e.length)) - parts.start * e.part_size

    def _bounce_need(self, r: ReadRequest) -> int:
        """Staging bytes a read needs: 0 when it goes straight into the caller's aligned memory."""
        span = self._span(r)
        if span == 0 or r.dest.device.type != "cpu":
            return span
        e = self._index[r.key]
        r0 = (r.offset // e.part_size) * e.part_size
        if r0 == r.offset and span == nbytes_of(r.dest) and self._aligned(tensor_runs(r.dest)):
            return 0
        return span

    async def read_many(self, requests: Sequence[ReadRequest]) -> list[bool]:
        self._check_open()
        if not requests:
            return []
        groups = self._groups([self._bounce_need(r) for r in requests])
        if len(groups) == 1:
            return await self._read_group(requests)
        parts = await gather_settled(*(self._read_group([requests[i] for i in g]) for g in groups))
        return [ok for part in parts for ok in part]

    async def _read_group(self, requests: Sequence[ReadRequest]) -> list[bool]:
        assert self._engine is not None and self._bounce is not None and self._geo is not None
        # reserve staging only for reads that will not go straight into the caller's memory
        need = sum(sp for sp in map(self._bounce_need, requests) if sp <= self._bounce.alloc.capacity)
        need = need if need <= self._bounce.alloc.capacity else 0
        res_base = await self._bounce.get(need) if need else 0
        cursor = 0
        results = [False] * len(requests)
        plans: list[tuple[int, fmt.Entry, int, int, list[tuple[int, int]], tuple[int, int] | None, torch.Tensor]] = []
        pinned: list[fmt.Entry] = []
        ops: list[tuple[Any, ...]] = []
        op_owner: list[int] = []
        try:
            for i, r in enumerate(requests):
                e = self._index.get(r.key)
                n = nbytes_of(r.dest)
                if e is None:
                    self.counters["misses"] += 1
                    continue
                if r.offset < 0 or r.offset + n > e.length:
                    raise ValueError(f"range [{r.offset}, {r.offset + n}) is outside an object of {e.length} bytes")
                if n == 0:
                    results[i] = True
                    continue
                if r.offset % r.dest.element_size():
                    raise ValueError("offset is not a multiple of the destination's itemsize")
                e.pins += 1
                pinned.append(e)
                parts = fmt.parts_covering(e, r.offset, r.offset + n)
                r0 = parts.start * e.part_size
                r1 = min(parts.stop * e.part_size, e.length)
                span = fmt.align_up(r1) - r0
                file_off = self._geo.d_off + e.offset + r0
                dest = r.dest
                runs = tensor_runs(dest) if dest.device.type == "cpu" else []
                if dest.device.type == "cpu" and r0 == r.offset and span == n and self._aligned(runs):
                    plans.append((i, e, r0, r1, runs, None, dest))
                    for op in self._iov_ops(OP_READ, runs, file_off):
                        ops.append(op)
                        op_owner.append(len(plans) - 1)
                    self.counters["direct_reads"] += 1
                else:
                    if cursor + span > need:
                        tmp = aligned_empty((span,), torch.uint8)
                        plans.append((i, e, r0, r1, [(tmp.data_ptr(), span)], None, tmp))
                        for op in self._iov_ops(OP_READ, [(tmp.data_ptr(), span)], file_off):
                            ops.append(op)
                            op_owner.append(len(plans) - 1)
                    else:
                        boff = res_base + cursor
                        cursor += span
                        plans.append((i, e, r0, r1, [(self._bounce.addr + boff, span)], (boff, span), dest))
                        for o in range(0, span, self._max_io):
                            ops.append((OP_READ, 0, 0, file_off + o, ("fixed", 0, boff + o, min(self._max_io, span - o))))
                            op_owner.append(len(plans) - 1)
                    self.counters["bounce_reads"] += 1
            res = await self._engine.submit(ops) if ops else []
            failed = set()
            for owner, rv, op in zip(op_owner, res, ops):
                if rv != _op_len(op):
                    failed.add(owner)
            bounce_t = self._bounce.tensor

            def finish(plan: tuple[int, fmt.Entry, int, int, list[tuple[int, int]], tuple[int, int] | None,
                                   torch.Tensor]) -> bool:
                """Verify a completed read and copy it out of staging; safe to run in a worker thread."""
                i, e, r0, r1, runs, b, dest = plan
                r = requests[i]
                cover = fmt.parts_covering(e, r0, r1)
                sums = _part_hashes(runs, e.key, cover.start, _part_sizes(e.length, e.part_size, cover.start, cover.stop))
                if sums != list(e.checksums[cover.start : cover.stop]):
                    return False
                if b is not None or dest is not r.dest:
                    n = nbytes_of(r.dest)
                    base = bounce_t[b[0] : b[0] + b[1]] if b is not None else dest
                    src = base[r.offset - r0 : r.offset - r0 + n]
                    r.dest.copy_(src.view(r.dest.dtype).view(r.dest.shape))
                return True

            todo = [p for p in range(len(plans)) if p not in failed]
            for p in failed:
                self.counters["read_errors"] += 1
                self.counters["misses"] += 1
            # Large verifications and copy-outs run in worker threads (xxhash and torch release the GIL), so the
            # event loop keeps submitting I/O for other requests meanwhile; small ones are cheaper inline.
            big = {p for p in todo if plans[p][3] - plans[p][2] >= OFFLOAD_BYTES}
            verdict = {p: finish(plans[p]) for p in todo if p not in big}
            if big:
                order = sorted(big)
                oks = await gather_settled(*(asyncio.to_thread(finish, plans[p]) for p in order))
                verdict.update(zip(order, oks))
            for p in todo:
                i, e = plans[p][0], plans[p][1]
                r = requests[i]
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
            if need:
                await self._bounce.put(res_base, need)
            for e in pinned:
                self._unpin(e)
        return results

    # --- the rest of the core ----------------------------------------------------------------------------
    async def delete(self, key: bytes) -> bool:
        self._check_writable()
        e = self._index.pop(key, None)
        if e is None:
            return False
        self.policy.remove(key)
        self._release(e)
        await self._log([fmt.del_record(key)])
        return True

    async def contains(self, key: bytes) -> bool:
        self._check_open()
        return key in self._index

    async def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        self._check_open()
        index = self._index
        return [k in index for k in keys]

    async def keys(self) -> AsyncIterator[bytes]:
        self._check_open()
        for k in list(self._index):
            yield k

    def stats(self) -> dict[str, Any]:
        return {
            **super().stats(),
            "path": self.path,
            "block_device": self.is_block_device,
            "objects": len(self._index),
            "mem_align": self._mem_align,
            "max_io": self._max_io,
            "policy": self.policy.name,
            **self.counters,
        }
