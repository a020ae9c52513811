"""Memory for I/O: page- and huge-page-aligned buffers, and tensors over them.

O_DIRECT needs aligned memory, and on devices whose requests are bounded by memory segments (virtio, many
NVMe drives) the physical contiguity of a buffer sets the request size: 2 MiB transparent huge pages make a
restore run at the device's speed where 4 KiB pages halve it. Every aligned allocation in kvpool comes from
here.
"""

from __future__ import annotations

import ctypes
import itertools
import mmap
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any, Final, cast, overload

import torch

__all__ = [
    "OFFLOAD_BYTES",
    "alloc_aligned", "alloc_shared", "is_hugetlb", "buffer_address", "tensor_runs", "aligned_empty", "RecyclingArena", "PAGE", "HUGE_PAGE",
]

PAGE: Final = 4096
HUGE_PAGE: Final = 2 * 1024 * 1024
# Copies (and checksum passes) of at least this many bytes run in a worker thread (torch and xxhash release the
# GIL), so the event loop keeps submitting I/O meanwhile; smaller ones are cheaper inline than a thread hop.
OFFLOAD_BYTES: Final = 4 << 20
_HUGE_2M: Final = HUGE_PAGE
_MAP_HUGETLB: Final = 0x40000


def _hugepages_free_bytes() -> int:
    """Free 2 MiB hugetlb pages, in bytes (0 if unknown or another default size)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = dict(line.split(":", 1) for line in f if ":" in line)
        size_kb = int(info["Hugepagesize"].split()[0])
        free = int(info["HugePages_Free"].split()[0])
    except (OSError, KeyError, ValueError, IndexError):
        return 0
    if size_kb * 1024 != _HUGE_2M:
        return 0
    return free * _HUGE_2M


def alloc_aligned(nbytes: int, *, hugepages: bool = True) -> mmap.mmap:
    """Anonymous, page-aligned, writable memory suitable for O_DIRECT and fixed buffers.

    With ``hugepages`` and ``nbytes`` a multiple of 2 MiB, hugetlb pages are
    used when enough are free; otherwise a normal mapping is returned, advised
    with ``MADV_HUGEPAGE`` (transparent huge pages) when available.
    """
    if nbytes <= 0:
        raise ValueError(f"nbytes must be positive, got {nbytes}")
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    if hugepages and nbytes % _HUGE_2M == 0:
        try:
            with open("/proc/sys/vm/nr_hugepages", encoding="ascii") as f:
                nr = int(f.read().strip() or 0)
        except (OSError, ValueError):
            nr = 0
        if nr > 0 and _hugepages_free_bytes() >= nbytes:
            try:
                huge = mmap.mmap(-1, nbytes, flags=flags | _MAP_HUGETLB, prot=prot)
                _HUGETLB.add(huge)
                return huge
            except OSError:
                pass  # raced with another allocator, or no reservation: fall back
    buf = mmap.mmap(-1, nbytes, flags=flags, prot=prot)
    madv = getattr(mmap, "MADV_HUGEPAGE", None)
    if hugepages and madv is not None and nbytes >= _HUGE_2M:
        try:
            buf.madvise(madv)
        except OSError:
            pass  # THP disabled: advisory only
    return buf

_HUGETLB: weakref.WeakSet[mmap.mmap] = weakref.WeakSet()


def is_hugetlb(buf: mmap.mmap) -> bool:
    """Whether ``buf`` (from :func:`alloc_aligned` or :func:`alloc_shared`) is made of hugetlb pages."""
    return buf in _HUGETLB


def alloc_shared(nbytes: int, name: str = "kvpool-staging") -> tuple[mmap.mmap, int, bool]:
    """Shareable memory: ``(mapping, memfd, hugetlb)`` for ``nbytes`` (a multiple of 2 MiB).

    The memfd is what another process maps to reach the same pages (a vhost-user target takes it with
    ``SET_MEM_TABLE``); the caller owns it and closes it. 2 MiB hugetlb pages when enough are free (SPDK
    needs them in iova=pa mode; a target's O_DIRECT requests then take one segment per 2 MiB), else shmem,
    advised for transparent huge pages (which the kernel honours only when ``shmem_enabled`` allows it).
    """
    if nbytes <= 0 or nbytes % _HUGE_2M:
        raise ValueError(f"shared memory is allocated in 2 MiB multiples, got {nbytes}")
    if _hugepages_free_bytes() >= nbytes:
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_HUGETLB | getattr(os, "MFD_HUGE_2MB", 21 << 26))
        try:
            os.ftruncate(fd, nbytes)
            huge = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            _HUGETLB.add(huge)
            return huge, fd, True
        except OSError:
            os.close(fd)  # raced with another allocator for the reserved pages: ordinary shmem below
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, nbytes)
        buf = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError:
        os.close(fd)
        raise
    madv = getattr(mmap, "MADV_HUGEPAGE", None)
    if madv is not None:
        try:
            buf.madvise(madv)
        except OSError:
            pass  # advisory only
    return buf, fd, False


def buffer_address(buf: object) -> int:
    """Address of the first byte of a writable, non-empty buffer.

    The caller must keep ``buf`` alive (and un-resized) while the kernel uses
    the address.
    """
    return ctypes.addressof(ctypes.c_char.from_buffer(cast(Any, buf)))


@overload
def tensor_runs(t: torch.Tensor, limit: None = None) -> list[tuple[int, int]]: ...
@overload
def tensor_runs(t: torch.Tensor, limit: int) -> list[tuple[int, int]] | None: ...
def tensor_runs(t: torch.Tensor, limit: int | None = None) -> list[tuple[int, int]] | None:
    """(address, nbytes) of the contiguous runs of a CPU tensor, in row-major order.

    None if there are more than ``limit`` runs (never with ``limit`` None). The caller must keep ``t`` alive
    while the addresses are used.
    """
    if t.numel() == 0:
        return []
    isz = t.element_size()
    shape, strides = list(t.shape), list(t.stride())
    # merge trailing dims while they are contiguous
    inner = 1
    d = len(shape)
    while d > 0 and (shape[d - 1] == 1 or strides[d - 1] == inner):
        inner *= shape[d - 1]
        d -= 1
    if limit is not None:
        count = 1
        for s in shape[:d]:
            count *= s
        if count > limit:
            return None
    base = t.data_ptr()
    block = inner * isz
    if d == 0:
        return [(base, block)]
    lead = strides[:d]
    return [
        (base + sum(i * s for i, s in zip(idx, lead)) * isz, block)
        for idx in itertools.product(*(range(s) for s in shape[:d]))
    ]


def aligned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A contiguous tensor whose memory SSD tiers can DMA into efficiently.

    Tensors of 2 MiB or more get their own anonymous mapping advised for transparent huge pages: page faults
    (and the kernel's zeroing) come 512 pages at a time, and the device sees physically contiguous 2 MiB
    runs. Smaller ones are page-aligned slices of an ordinary allocation.
    """
    n = torch.empty((), dtype=dtype).element_size()
    for d in shape:
        n *= d
    if n >= HUGE_PAGE:
        buf = alloc_aligned(-(-n // HUGE_PAGE) * HUGE_PAGE)
        return torch.frombuffer(buf, dtype=torch.uint8, count=n).view(dtype).view(shape)
    raw = torch.empty(n + PAGE, dtype=torch.uint8)
    shift = (-raw.data_ptr()) % PAGE
    return raw[shift : shift + n].view(dtype).view(shape)


class RecyclingArena:
    """Result memory that is faulted in once and reused: tensors handed out here come back when the caller drops them.

    A fresh 256 MiB result costs the kernel ~0.75 CPU-s/GB to provide (zeroing and, for huge pages, compaction)
    — more than the SSD read itself. This arena keeps up to ``limit`` bytes of THP-backed mappings and hands
    out slices; a finalizer on each slice's buffer object returns the extent when the last tensor (or view)
    over it is garbage, from whichever thread drops it. Beyond the limit it falls back to :func:`aligned_empty`.
    """

    def __init__(self, limit: int, segment: int = 256 << 20,
                 on_new_segment: Callable[[mmap.mmap], object] | None = None) -> None:
        from .allocator import ExtentAllocator

        self._alloc_cls = ExtentAllocator
        self.limit = limit
        self.segment = -(-segment // HUGE_PAGE) * HUGE_PAGE
        self._segments: list[tuple[mmap.mmap, Any]] = []
        self._lock = threading.Lock()
        self._on_new_segment = on_new_segment  # e.g. cudaHostRegister, so results are pinned for H2D copies
        self.reused = 0
        self.fallbacks = 0

    @property
    def reserved(self) -> int:
        return sum(len(m) for m, _ in self._segments)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        t = self.try_empty(shape, dtype)
        if t is None:
            self.fallbacks += 1
            return aligned_empty(shape, dtype)
        return t

    def try_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """Like :meth:`empty`, but ``None`` instead of fresh memory when the arena is at its limit."""
        n = torch.empty((), dtype=dtype).element_size()
        for d in shape:
            n *= d
        if n < HUGE_PAGE or self.limit <= 0:
            return aligned_empty(shape, dtype)
        with self._lock:
            for seg, alloc in self._segments:
                off = alloc.alloc(n)
                if off is not None:
                    self.reused += 1
                    return self._hand_out(seg, alloc, off, n, shape, dtype)
            size = max(self.segment, -(-n // HUGE_PAGE) * HUGE_PAGE)
            if self.reserved + size > self.limit:
                return None
            seg = alloc_aligned(size)
            if self._on_new_segment is not None:
                self._on_new_segment(seg)
            alloc = self._alloc_cls(size, HUGE_PAGE)
            self._segments.append((seg, alloc))
            off = alloc.alloc(n)
            assert off is not None
            return self._hand_out(seg, alloc, off, n, shape, dtype)

    def _hand_out(self, seg: mmap.mmap, alloc: Any, off: int, n: int, shape: tuple[int, ...],
                  dtype: torch.dtype) -> torch.Tensor:
        holder = (ctypes.c_char * n).from_buffer(seg, off)
        weakref.finalize(holder, self._give_back, alloc, off, n)
        return torch.frombuffer(holder, dtype=torch.uint8).view(dtype).view(shape)

    def _give_back(self, alloc: Any, off: int, n: int) -> None:
        with self._lock:
            alloc.free(off, n)
