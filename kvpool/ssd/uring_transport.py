"""The io_uring block transport: O_DIRECT on a file or raw block device, the bounce buffer registered.

Direct-read rule (issue 10): the memory alignment O_DIRECT needs is the device's own, not a guess. It is
read from ``statx(STATX_DIOALIGN)`` (``stx_dio_mem_align``; files on ext4/xfs and block devices on Linux
6.1+), else from ``/sys/dev/block/M:m/queue/dma_alignment`` (+1) of the device (a file's backing device), and
then confirmed with one real O_DIRECT read at that alignment (a wrong value would turn every direct read
into EINVAL, i.e. a miss). NVMe drives usually accept 4-byte aligned memory, so plain ``torch.empty``
tensors go straight to the device; a virtio disk with ``dma_alignment`` 511 needs 512.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Sequence
from typing import Any

from ..storage.buffers import alloc_aligned, buffer_address
from .errors import ssd_errors
from .ops import Op
from .transport import BlockTransport, DeviceBuffer
from .uring_engine import UringEngine

import torch

__all__ = ["UringTransport", "dio_mem_align"]

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


class UringTransport(BlockTransport):
    """io_uring on an O_DIRECT descriptor (opened and locked by the store, which owns ``fd``)."""

    def __init__(self, fd: int, name: str, *, entries: int = 256, sqpoll: bool = False,
                 is_block_device: bool = False) -> None:
        self.name = name
        self._fd = fd
        self._is_block = is_block_device
        self._engine = UringEngine(entries=entries, sqpoll=sqpoll)
        self._engine.register_files([fd])
        self._registered: list[DeviceBuffer] = []
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
        with ssd_errors(self.name, "cannot register the bounce buffer"):
            self._registered.append(buf)
            if len(self._registered) > 1:
                self._engine.unregister_buffers()
            self._engine.register_buffers([b.handle for b in self._registered])
        return len(self._registered) - 1

    # --- I/O ---------------------------------------------------------------------------------------------
    async def submit(self, ops: Sequence[Op]) -> list[int]:
        with ssd_errors(self.name, "io_uring"):
            return await self._engine.submit(ops)

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
        await self._engine.aclose()

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "mem_align_source": self._align_source, "transport": "uring"}
