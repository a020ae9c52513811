"""Opening the ``uring://`` store: what is at the path decides between recover, format and refuse (the
rules are in :mod:`kvpool.ssd.store`'s docstring); locking, preallocation, teardown."""

from __future__ import annotations

import asyncio
import errno as errno_mod
import fcntl
import os
import random
import stat

from ..errors import ConfigError, PoolLockedError
from ..storage.allocator import ExtentAllocator
from . import format as fmt
from .errors import NotAPoolError, PoolDamagedError
from .journal import JournalLayer
from .space import Bounce
from .state import BLOCK, log
from .uring_transport import UringTransport

__all__ = ["OpenLayer"]

_LOCK_WAIT_S = 2.0


class OpenLayer(JournalLayer):
    """Open, format, recover-or-refuse, and release everything on failure or close."""

    async def _open_inner(self) -> None:
        size, exists = await self._attach()
        assert self._transport is not None
        self._bounce = Bounce(self._transport, self._bounce_bytes)
        self._max_io = max(BLOCK, min(self._max_io, self._transport.max_request_bytes) // BLOCK * BLOCK)
        await self._load_or_format(size, exists=exists)
        # probed once block 0 holds a superblock (an O_DIRECT read at EOF checks no alignment)
        await self._transport.probe()
        self._mem_align = self._transport.mem_align

    async def _attach(self) -> tuple[int, bool]:
        """Reach the device: here an O_DIRECT descriptor (locked) under an io_uring transport. Returns the
        device's size and whether something existed at the path. Other transports override this."""
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
            raise ConfigError(f"{self.scheme}://{path} is neither a regular file nor a block device")
        if not exists and ro:
            raise self._oserror(errno_mod.ENOENT, f"{path} does not exist")
        flags = (os.O_RDONLY if ro else os.O_RDWR) | os.O_CLOEXEC | getattr(os, "O_DIRECT", 0)
        if self.is_block_device and not ro:
            flags |= os.O_EXCL  # refuses a device that is mounted or held by another O_EXCL opener
        elif not exists:
            if self._req_capacity is None:
                raise ConfigError(f"{self.scheme}://{path}: a new pool file needs ?capacity=SIZE")
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

        self._transport = UringTransport(self._fd, path, entries=self._entries, sqpoll=self._sqpoll,
                                         is_block_device=self.is_block_device)
        return size, exists

    async def _load_or_format(self, size: int, *, exists: bool) -> None:
        """Recover the pool at the path, or format it if it is new (or the user asked): see the module doc."""
        path, ro = self.path, self._readonly
        fresh = not exists or (not self.is_block_device and size == 0)  # nothing there that could be lost
        if fresh:
            if ro:
                raise NotAPoolError(errno_mod.ENODATA, f"{path} is empty: not a kvpool pool", path)
            await self._format(self._total_for(self._req_capacity, size), created=not exists)
            return
        head = await self._read_head(min(fmt.SNIFF_BYTES, size))
        kind, what = fmt.identify(head)
        if kind == "pool":
            geo = fmt.Geometry.unpack_superblock(head)
            assert geo is not None
            want = None if self._req_capacity is None else self._total_for(self._req_capacity, size)
            if want is not None and want != geo.total and self._format_ok and not ro:
                log.warning("%s: reformatting a pool of %d bytes to %d (format=1)", path, geo.total, want)
                await self._format(want, created=False)
                return
            if want is not None and want != geo.total:
                raise ConfigError(
                    f"{self.scheme}://{path} holds a kvpool pool of {geo.total} bytes; opening it with capacity={want} "
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
        if self._format_ok and not ro:
            log.warning("%s: formatting it (format=1); it held %s", path, what)
            await self._format(self._total_for(self._req_capacity, size), created=False)
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
                raise ConfigError(f"{self.scheme}://{self.path}: capacity {total} exceeds the device's {size} bytes")
        else:
            if capacity is None:
                if size == 0:
                    raise ConfigError(f"{self.scheme}://{self.path}: a new pool file needs ?capacity=SIZE")
                capacity = size
            total = capacity
        total -= total % BLOCK
        if total < 4 * fmt.BLOCK + 3 * 64 * 1024 + (1 << 20):
            raise ConfigError(f"{self.scheme}://{self.path}: capacity {total} is too small (at least 2 MiB)")
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

    async def _teardown(self) -> None:
        if self._jtask is not None:
            try:
                await self._jtask
            except Exception:
                pass
            self._jtask = None
        if self._transport is not None:
            await self._transport.aclose()
            self._transport = None
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
        self._staging = None  # the pool's arena is attached again by the pool that reopens us
