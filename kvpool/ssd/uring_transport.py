"""The io_uring block transport: O_DIRECT on a file or raw block device, the bounce buffer registered.

Direct-read rule (issue 10): the memory alignment O_DIRECT needs is the device's own, not a guess. It is
read from ``statx(STATX_DIOALIGN)`` (``stx_dio_mem_align``; files on ext4/xfs and block devices on Linux
6.1+), else from ``/sys/dev/block/M:m/queue/dma_alignment`` (+1) of the device (a file's backing device), and
then confirmed with one real O_DIRECT read at that alignment (a wrong value would turn every direct read
into EINVAL, i.e. a miss). NVMe drives usually accept 4-byte aligned memory, so plain ``torch.empty``
tensors go straight to the device; a virtio disk with ``dma_alignment`` 511 needs 512.

Fixed buffers (issue 10). The ring holds a *sparse* table of buffer slots (IORING_REGISTER_BUFFERS2 with
IORING_RSRC_REGISTER_SPARSE, Linux 5.19+), filled one slot at a time with IORING_REGISTER_BUFFERS_UPDATE while
I/O runs, so nothing is ever quiesced:

- the pool's staging arena (:meth:`UringTransport.attach_memory`), once populated, in pieces of at most 1 GiB
  (the kernel's limit per buffer), each pinned in a worker thread with the GIL released; an op whose memory is
  one segment inside a registered piece is submitted as READ_FIXED / WRITE_FIXED (``stats()['fixed_ops']``),
  so the store keeps building plain ``Op.read_iov`` ops and never learns which memory is registered;
- the store's own bounce buffer (:meth:`UringTransport.register`): its slot is filled only when the bounce is
  first used and no arena is attached -- pinning faults in every page, and with an arena the bounce is a
  rarely used fallback whose memory should stay untouched. Until then its fixed ops go out as READV.

A kernel that refuses a registration (RLIMIT_MEMLOCK for an unprivileged process: ENOMEM; no sparse tables:
EINVAL) costs the fixed ops only: logged once, counted (``register_failures``), plain READV/WRITEV carry on.
Where the sparse table itself is refused, the bounce buffer is registered the old way (IORING_REGISTER_BUFFERS).
``KVPOOL_URING_FIXED=0`` in the environment leaves the arena unregistered (to measure what fixed ops save).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import torch

from ..storage.buffers import alloc_aligned, buffer_address
from ..storage.settle import wait_uncancellable
from .errors import ssd_errors
from .ops import Kind, Op
from .state import log
from .transport import BlockTransport, DeviceBuffer
from .uring_engine import UringEngine

if TYPE_CHECKING:
    from ..storage.staging import StagingArena

__all__ = ["UringTransport", "dio_mem_align"]

_T = TypeVar("_T")

#: slots of the sparse buffer table: the bounce buffer and the arena's pieces (63 GiB of arena at most)
_SLOTS = 64
#: the kernel's limit per registered buffer (io_uring/rsrc.c: SZ_1G)
_PIECE = 1 << 30

_MAX_IO = 8 << 20
_IOV_MAX = 512
_SECTOR = 512
_AT_EMPTY_PATH = 0x1000
_STATX_DIOALIGN = 0x2000
_STX_DIO_MEM_ALIGN = 152  # offset of stx_dio_mem_align in struct statx (uapi linux/stat.h)


def _statx_dio_mem_align(fd: int) -> int | None:
    """``stx_dio_mem_align`` of ``fd``, or None where the kernel or filesystem does not report it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.statx
    except (OSError, AttributeError):
        return None
    buf = ctypes.create_string_buffer(256)
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
    if fn(fd, b"", _AT_EMPTY_PATH, _STATX_DIOALIGN, buf) != 0:
        return None
    mask = int.from_bytes(buf.raw[0:4], "little")
    align = int.from_bytes(buf.raw[_STX_DIO_MEM_ALIGN : _STX_DIO_MEM_ALIGN + 4], "little")
    return align if mask & _STATX_DIOALIGN and align > 0 else None


def _sysfs_queue(st: os.stat_result, is_block: bool, name: str) -> int | None:
    dev = st.st_rdev if is_block else st.st_dev
    base = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
    for q in (f"{base}/queue/{name}", f"{base}/../queue/{name}"):  # a disk, or a partition's disk
        try:
            with open(q) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            continue
    return None


def dio_mem_align(fd: int) -> tuple[int, str]:
    """(memory alignment O_DIRECT needs on ``fd``, where it came from: ``statx``/``sysfs``/``default``)."""
    a = _statx_dio_mem_align(fd)
    if a is not None:
        return a, "statx"
    st = os.fstat(fd)
    import stat as stat_mod

    dma = _sysfs_queue(st, stat_mod.S_ISBLK(st.st_mode), "dma_alignment")
    if dma is not None:
        return dma + 1, "sysfs"
    return _SECTOR, "default"


@attrs.define(slots=True, eq=False)
class _Slot:
    """One slot of the ring's buffer table: memory the transport may name in fixed ops once ``pinned``."""

    addr: int
    nbytes: int
    obj: Any  # what the kernel is handed (a buffer object); exported by the ring while registered
    arena: bool = False
    #: "empty" (fixed ops naming it go out as READV/WRITEV), "pinning" (in a worker thread), "pinned" (ops
    #: may name it), "refused" (the kernel said no: never tried again)
    state: str = "empty"

    @property
    def pinned(self) -> bool:
        return self.state == "pinned"


class UringTransport(BlockTransport):
    """io_uring on an O_DIRECT descriptor (opened and locked by the store, which owns ``fd``)."""

    def __init__(self, fd: int, name: str, *, entries: int = 256, sqpoll: bool = False,
                 is_block_device: bool = False) -> None:
        self.name = name
        self._fd = fd
        self._is_block = is_block_device
        self._engine = UringEngine(entries=entries, sqpoll=sqpoll)
        self._engine.register_files([fd])
        self._slots: list[_Slot] = []
        # the sparse table, where the kernel has one; else the bounce buffer is registered the old way
        try:
            self._engine.register_buffers_sparse(_SLOTS)
            self._sparse = True
        except OSError as exc:
            self._sparse = False
            log.info("%s: no sparse io_uring buffer table (%s); the staging arena is not registered", name, exc)
        self._arena: StagingArena | None = None
        self._arena_slots: list[int | None] = []  # per 1 GiB piece of the arena: its slot once pinned
        self._tasks: set[asyncio.Task[Any]] = set()  # registrations running in worker threads
        self._warned = False
        self.counters = {"fixed_ops": 0, "registered_bytes": 0, "register_failures": 0}
        st = os.fstat(fd)
        kb = _sysfs_queue(st, is_block_device, "max_sectors_kb")
        # the device's max_sectors_kb: the block layer splits anything larger, and some devices -- throttled
        # loop devices among them -- then serve the pieces at a fraction of the rate
        self._max_io = _MAX_IO if kb is None else max(128 << 10, min(_MAX_IO, kb * 1024 // 4096 * 4096))
        segs = _sysfs_queue(st, is_block_device, "max_segments")
        self._max_segs = min(_IOV_MAX, segs) if segs else _IOV_MAX
        self._align, self._align_source = dio_mem_align(fd)
        self._align = max(self._align, 1)

    # --- geometry ----------------------------------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int:
        if self._is_block:
            return os.lseek(self._fd, 0, os.SEEK_END)
        return os.fstat(self._fd).st_size

    @property
    def block_size(self) -> int:
        return _SECTOR

    @property
    def max_request_bytes(self) -> int:
        return self._max_io

    @property
    def max_segments(self) -> int:
        return self._max_segs

    @property
    def mem_align(self) -> int:
        return self._align

    @property
    def is_block_device(self) -> bool:
        return self._is_block

    # --- memory ------------------------------------------------------------------------------------------
    def mem_ok(self, addr: int, n: int) -> bool:
        # the kernel checks each segment's address against the DMA alignment and its length against the
        # logical block size (iov_iter_is_aligned in blkdev_dio_unaligned / iomap_dio_bio_iter)
        return addr % self._align == 0 and n % _SECTOR == 0

    def alloc(self, nbytes: int) -> DeviceBuffer:
        buf = alloc_aligned(nbytes)
        return DeviceBuffer(buffer_address(buf), nbytes, torch.frombuffer(buf, dtype=torch.uint8), buf)

    def free(self, buf: DeviceBuffer) -> None:
        # the mmap closes when the last view of it goes (a tensor over it may outlive this call)
        pass

    def register(self, buf: DeviceBuffer) -> int:
        if self._sparse:
            # pinned on first use (see the module docstring); a slot index now, so ops can name it
            if len(self._slots) >= _SLOTS:
                with ssd_errors(self.name, "cannot register the bounce buffer"):
                    raise self._no_slot()
            self._slots.append(_Slot(buf.addr, buf.nbytes, buf.handle))
            return len(self._slots) - 1
        with ssd_errors(self.name, "cannot register the bounce buffer"):
            if self._slots:
                self._engine.unregister_buffers()
            try:
                self._engine.register_buffers([s.obj for s in self._slots] + [buf.handle])
            except BaseException:
                if self._slots:  # put the previous table back
                    self._engine.register_buffers([s.obj for s in self._slots])
                raise
            self._slots.append(_Slot(buf.addr, buf.nbytes, buf.handle, state="pinned"))
            self.counters["registered_bytes"] += buf.nbytes
        return len(self._slots) - 1

    def _no_slot(self) -> OSError:
        return OSError(errno.ENOSPC, f"all {_SLOTS} io_uring buffer slots are in use")

    async def attach_memory(self, arena: StagingArena) -> None:
        """Register ``arena`` as fixed buffers once it is populated, in a background task (open does not
        wait: pinning unpopulated memory would fault it in here, on the caller's time)."""
        if self._arena is not None:
            return
        self._arena = arena
        if os.environ.get("KVPOOL_URING_FIXED", "1") == "0":  # benchmarks: the same run without fixed ops
            log.info("%s: KVPOOL_URING_FIXED=0: the staging arena is not registered", self.name)
            return
        if not self._sparse:
            self._refused("the kernel has no sparse buffer table (Linux 5.19+)")
            return
        arena.track(self._spawn(self._register_arena(arena)))  # pool.ready() includes the registration

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._refused(f"registration failed: {task.exception()!r}")

    def _refused(self, why: str) -> None:
        self.counters["register_failures"] += 1
        if not self._warned:
            self._warned = True
            log.warning("%s: cannot register memory with io_uring as fixed buffers (%s); plain READV/WRITEV "
                        "instead (a little more CPU per request)", self.name, why)

    async def _in_thread(self, fn: Callable[..., _T], *args: Any) -> _T:
        # the syscall cannot be interrupted: a cancelled caller still waits for it, so close never tears the
        # ring down under a registration in progress
        return await wait_uncancellable(asyncio.ensure_future(asyncio.to_thread(fn, *args)))

    async def _register_arena(self, arena: StagingArena) -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def settle() -> None:
            if not ready.done():
                ready.set_result(None)

        def on_ready() -> None:  # in the arena's populating thread (or here, at once)
            try:
                loop.call_soon_threadsafe(settle)
            except RuntimeError:  # the loop is gone: nobody waits any more
                pass

        arena.when_ready(on_ready)
        await ready
        whole = memoryview(arena.buffer)
        self._arena_slots = [None] * (-(-arena.nbytes // _PIECE))
        for p in range(len(self._arena_slots)):
            off = p * _PIECE
            n = min(_PIECE, arena.nbytes - off)
            if len(self._slots) >= _SLOTS:
                self._refused(f"{_SLOTS} slots hold {off >> 30} GiB of the {arena.nbytes >> 20} MiB arena")
                return
            self._slots.append(_Slot(arena.address + off, n, whole[off : off + n], arena=True))
            idx = len(self._slots) - 1
            if not await self._pin(idx):
                return
            self._arena_slots[p] = idx  # only now may an op name it

    async def _pin(self, idx: int) -> bool:
        """Fill slot ``idx`` (pinning its pages, in a worker thread); whether the kernel took it."""
        slot = self._slots[idx]
        slot.state = "pinning"
        try:
            await self._in_thread(self._engine.update_buffers, idx, slot.obj)
        except (OSError, ValueError) as exc:
            slot.state = "refused"
            what = "arena piece" if slot.arena else "bounce buffer"
            self._refused(f"IORING_REGISTER_BUFFERS_UPDATE of a {slot.nbytes >> 20} MiB {what}: {exc}")
            return False
        except BaseException:
            slot.state = "refused"  # cancelled (closing): the ring goes away with whatever it holds
            raise
        slot.state = "pinned"
        self.counters["registered_bytes"] += slot.nbytes
        return True

    @property
    def arena_registered(self) -> bool:
        """Whether every piece of the attached arena is registered (fixed ops into it)."""
        return bool(self._arena_slots) and all(s is not None for s in self._arena_slots)

    async def wait_registered(self) -> None:
        """Wait for the registrations in progress (the arena's, once it is populated). Tests and benchmarks."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    def _rewrite(self, op: Op) -> Op:
        """The op as the ring should see it: fixed where its memory is pinned, iovecs where it is not."""
        if op.fixed is not None:
            idx, off, n = op.fixed
            if idx < len(self._slots) and not self._slots[idx].pinned:
                slot = self._slots[idx]
                if slot.state == "empty" and self._arena is None:
                    # the bounce buffer's first use, with no arena to take its place: pin it for the next ops
                    slot.state = "pinning"
                    self._spawn(self._pin(idx))
                return Op(op.kind, op.file_offset, iov=((slot.addr + off, n),), file_index=op.file_index)
            self.counters["fixed_ops"] += 1
            return op
        iov = op.iov
        arena = self._arena
        if iov is None or len(iov) != 1 or arena is None or not self._arena_slots:
            return op
        addr, n = iov[0]
        rel = addr - arena.address
        if rel < 0 or rel + n > arena.nbytes or n == 0:
            return op
        p = rel // _PIECE
        piece = self._arena_slots[p]
        if piece is None or (rel + n - 1) // _PIECE != p:
            return op
        self.counters["fixed_ops"] += 1
        if op.kind == Kind.READ:
            return Op.read_fixed(op.file_offset, piece, rel - p * _PIECE, n)
        return Op.write_fixed(op.file_offset, piece, rel - p * _PIECE, n)

    # --- I/O ---------------------------------------------------------------------------------------------
    async def submit(self, ops: Sequence[Op]) -> list[int]:
        with ssd_errors(self.name, "io_uring"):
            return await self._engine.submit([self._rewrite(op) for op in ops])

    async def probe(self) -> None:
        """Confirm the reported alignment with a real O_DIRECT read of block 0 (it must hold a block: a read
        at EOF checks no alignment); step up to 512 and 4096 if the device refuses it."""
        buf = self.alloc(3 * 4096)
        try:
            for align in sorted({self._align, _SECTOR, 4096}):
                if align < self._align:
                    continue
                # an address that is a multiple of ``align`` and of nothing larger up to a page
                (res,) = await self.submit([Op.read_iov(0, [(buf.addr + 4096 + align % 4096, 4096)])])
                if res >= 0:
                    self._align = align
                    return
            self._align = 4096
        finally:
            self.free(buf)

    async def aclose(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        while self._tasks:  # a registration in a worker thread is waited out (it cannot be interrupted)
            await asyncio.wait(set(self._tasks))
        await self._engine.aclose()  # closing the ring unregisters and releases the exported buffers
        self._slots.clear()
        self._arena_slots = []
        self._arena = None

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "mem_align_source": self._align_source, "transport": "uring",
                "arena_registered": self.arena_registered, **self.counters}
