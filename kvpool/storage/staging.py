"""StagingArena: pool-owned host memory, faulted in before the first request and reused by every restore.

A fresh anonymous mapping costs the kernel ~0.75 CPU-s/GB the first time it is touched (zeroing and, for huge
pages, compaction): more than the SSD read itself. A restore that lands in fresh memory therefore runs at a
fraction of the device's speed, and the block layer splits requests built from freshly faulted, fragmented
memory. The arena is one mapping of a fixed size, advised for transparent huge pages (hugetlb pages when they
are reserved), populated by a background thread right after it is made (``MADV_POPULATE_WRITE``, which the
kernel serves a huge page at a time), optionally page-locked once for CUDA, and then carved into tensors:

- only memory that is already populated is handed out, so no request pays first-touch faults;
- a tensor handed out comes back when the caller drops it (a finalizer, from whichever thread drops it);
- beyond the arena, an optional bounded *overflow* (:class:`~kvpool.storage.buffers.RecyclingArena`: faulted
  in on first use, then reused) serves restores larger than the arena was sized for, so an undersized arena
  costs first-touch faults once, not on every request;
- when both are exhausted, :meth:`acquire` waits for memory to come back (back-pressure). Two cases
  are served from a fresh aligned mapping instead, each counted and logged once naming the setting to raise:
  a request larger than the whole arena (``oversize``: it could never fit), and a wait longer than
  ``wait_s`` (``fallbacks``: the guard against a caller that holds results while it asks for more, which
  would otherwise wait for itself forever).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import mmap
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Final

import torch

from ..errors import ConfigError
from ..layout import KVLayout
from ..units import parse_size
from .allocator import ExtentAllocator
from .buffers import HUGE_PAGE, RecyclingArena, aligned_empty, alloc_aligned, alloc_shared, is_hugetlb

__all__ = ["StagingArena", "default_staging_bytes"]

log = logging.getLogger("kvpool.staging")

_MADV_POPULATE_WRITE: Final = 23  # Linux 5.14+
_STEP: Final = 64 << 20  # populated (and made available) this much at a time

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int


def _mem_total() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 16 << 30


def default_staging_bytes(layout: KVLayout, mem_total: int | None = None) -> int:
    """``KVPOOL_STAGING_BYTES`` when set (a size, e.g. ``512MiB``: the default of every pool in the process,
    for hosts that run many pools); else an eighth of the machine's memory, at most 4 GiB, at least 16 chunks of ``layout`` (and 64 MiB), never
    more than a quarter of the memory; in 2 MiB units.

    Why this much: every restore that does not fit lands in memory faulted on its data path (~1 CPU-s/GB of
    page zeroing, a third of the device's speed), so the arena must hold what a server restores at once --
    several prompts of a long context (an 8B model's 16K-token prompt is 2 GiB of fp16 KV). Peers size their
    pools the same way (LMCache preallocates 5 GB of host memory by default)."""
    env = os.environ.get("KVPOOL_STAGING_BYTES", "").strip()
    if env:
        n = parse_size(env, what="KVPOOL_STAGING_BYTES")
        if n <= 0:
            raise ConfigError(f"KVPOOL_STAGING_BYTES must be positive, got {env!r}")
        return -(-n // HUGE_PAGE) * HUGE_PAGE
    mem = mem_total if mem_total is not None else _mem_total()
    n = max(64 << 20, 16 * layout.chunk_nbytes, min(4 << 30, mem // 8))
    n = min(n, max(64 << 20, mem // 4))
    return -(-n // HUGE_PAGE) * HUGE_PAGE


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for d in shape:
        n *= d
    return n


class StagingArena:
    """A bounded, pre-faulted host arena handing out tensors that return when dropped.

    Parameters
    ----------
    nbytes
        Size of the arena (rounded up to 2 MiB).
    overflow_bytes
        Bytes of the recycled overflow used beyond the arena (0: none).
    on_ready
        Called once with the whole mapping after it is populated (e.g. ``cudaHostRegister``), in the
        populating thread.
    shared
        Back the arena with a memfd (:attr:`fd`) another process can map -- a vhost-user target that reads
        and writes it directly -- instead of anonymous memory. hugetlb pages when enough are reserved.

    Attributes
    ----------
    address, nbytes
        The mapping (2 MiB multiple). Device registrations (io_uring fixed buffers) cover exactly this span.
    buffer
        The writable mapping itself (buffer protocol), for registrations that take a buffer object.
    fd
        The memfd when ``shared``, else ``None``; open until :meth:`close`.
    hugetlb
        Whether the mapping is made of reserved 2 MiB huge pages.
    """

    def __init__(self, nbytes: int, *, overflow_bytes: int = 0,
                 on_ready: Callable[[mmap.mmap], object] | None = None, shared: bool = False) -> None:
        if nbytes <= 0:
            raise ValueError(f"a staging arena needs a positive size, got {nbytes}")
        self.nbytes = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
        self.fd: int | None = None
        if shared:
            self._buf, self.fd, self.hugetlb = alloc_shared(self.nbytes)
        else:
            self._buf = alloc_aligned(self.nbytes)
            self.hugetlb = is_hugetlb(self._buf)
        self._ready_callbacks: list[Callable[[], object]] = []
        self._setups: set[asyncio.Future[object]] = set()
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self._buf))
        self._alloc = ExtentAllocator(self.nbytes, HUGE_PAGE)
        # everything not yet populated is held "in use" and given to the allocator step by step
        whole = self._alloc.alloc(self.nbytes)
        assert whole == 0
        self._populated = 0
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._on_ready = on_ready
        self._overflow = (RecyclingArena(overflow_bytes, segment=min(256 << 20, overflow_bytes), on_new_segment=on_ready)
                          if overflow_bytes > 0 else None)
        self.overflowed = 0
        self._ready = threading.Event()
        self._closed = False
        self.populate_seconds: float | None = None
        self.populate_error: str | None = None
        self.acquired = 0
        self.waits = 0
        self.oversize = 0
        self.fallbacks = 0
        self._warned: set[str] = set()
        self._thread = threading.Thread(target=self._populate, name="kvpool-staging", daemon=True)
        self._thread.start()

    @property
    def buffer(self) -> mmap.mmap:
        """The writable mapping (buffer protocol), for registrations that take a buffer object."""
        return self._buf

    # --- readiness ---------------------------------------------------------------------------------------
    def _populate(self) -> None:
        t0 = time.monotonic()
        off = 0
        while off < self.nbytes and not self._closed:
            n = min(_STEP, self.nbytes - off)
            if _libc.madvise(self.address + off, n, _MADV_POPULATE_WRITE) != 0:
                # older kernels: touch one byte per 4 KiB page (a write fault populates the page, THP if it can)
                self.populate_error = f"MADV_POPULATE_WRITE: errno {ctypes.get_errno()}; touched pages instead"
                view = memoryview(self._buf)[off : off + n]
                for p in range(0, n, mmap.PAGESIZE):
                    view[p] = 0
                view.release()
            off += n
            with self._lock:
                self._alloc.free(off - n, n)
                self._populated = off
            self._wake()
        if self._on_ready is not None and not self._closed:
            try:
                self._on_ready(self._buf)
            except Exception as exc:  # page-locking is an optimisation: the arena works without it
                log.warning("staging arena: could not page-lock %d bytes: %s", self.nbytes, exc)
        self.populate_seconds = time.monotonic() - t0
        with self._lock:
            self._ready.set()
            callbacks, self._ready_callbacks = self._ready_callbacks, []
        for cb in callbacks:
            cb()
        log.info("staging arena ready: %.0f MiB populated in %.2f s", self.nbytes / 2**20, self.populate_seconds)

    @property
    def ready(self) -> bool:
        """Whether the whole arena is populated."""
        return self._ready.is_set()

    def when_ready(self, callback: Callable[[], object]) -> None:
        """Call ``callback()`` once the whole arena is populated: at once if it is, else from the populating
        thread (so it must be thread-safe, e.g. ``loop.call_soon_threadsafe``)."""
        with self._lock:
            if not self._ready.is_set():
                self._ready_callbacks.append(callback)
                return
        callback()

    @property
    def populated(self) -> int:
        """Bytes populated so far (available to hand out)."""
        return self._populated

    async def wait_ready(self) -> float:
        """Wait until the whole arena is populated and every device setup tracked with :meth:`track` (io_uring
        registration) has finished; return the seconds population took."""
        if not self._ready.is_set():
            await asyncio.to_thread(self._ready.wait)
        while self._setups:  # (each leaves the set when done; a setup may start while we wait)
            await asyncio.gather(*self._setups, return_exceptions=True)  # their owners log and count failures
        assert self.populate_seconds is not None
        return self.populate_seconds

    def track(self, setup: asyncio.Future[object]) -> None:
        """Count ``setup`` (a tier making the arena reachable by its device once populated) as part of being
        ready, so :meth:`wait_ready` -- ``pool.ready()`` -- means the first request pays none of it."""
        self._setups.add(setup)
        setup.add_done_callback(self._setups.discard)

    # --- hand-out ----------------------------------------------------------------------------------------
    @property
    def free_bytes(self) -> int:
        with self._lock:
            return self._alloc.free_bytes

    def contains(self, addr: int, n: int) -> bool:
        """Whether ``[addr, addr + n)`` lies inside the arena (e.g. memory registered as fixed buffers)."""
        return self.address <= addr and addr + n <= self.address + self.nbytes

    def try_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """A tensor from populated arena memory, or ``None`` if none is free now (never blocks)."""
        n = _nbytes(shape, dtype)
        if n == 0:
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            off = self._alloc.alloc(n)
        if off is None:
            return None
        self.acquired += 1
        holder = (ctypes.c_char * n).from_buffer(self._buf, off)
        weakref.finalize(holder, self._give_back, off, n)
        return torch.frombuffer(holder, dtype=torch.uint8).view(dtype).view(shape)

    async def acquire(self, shape: tuple[int, ...], dtype: torch.dtype, *, wait_s: float | None = None) -> torch.Tensor:
        """A tensor from the arena, waiting for memory to come back when it is exhausted.

        A request larger than the whole arena cannot ever fit, and one that waited ``wait_s`` seconds
        (``None``: forever) in vain: both are served from a fresh aligned mapping, counted (``oversize``,
        ``fallbacks``) and logged once.
        """
        n = _nbytes(shape, dtype)
        if -(-n // HUGE_PAGE) * HUGE_PAGE > self.nbytes:
            if self._overflow is not None:
                t = self._overflow.try_empty(shape, dtype)
                if t is not None:
                    self.overflowed += 1
                    return t
            self.oversize += 1
            self._warn_once("oversize", f"a {n >> 20} MiB request exceeds the {self.nbytes >> 20} MiB staging arena")
            return aligned_empty(shape, dtype)
        if wait_s is None:
            return await self._acquire(shape, dtype)
        try:
            return await asyncio.wait_for(self._acquire(shape, dtype), wait_s)
        except TimeoutError:
            self.fallbacks += 1
            self._warn_once("fallback", f"no {n >> 20} MiB of the {self.nbytes >> 20} MiB staging arena came back "
                            f"within {wait_s:g} s (callers hold their results)")
            return aligned_empty(shape, dtype)

    def _warn_once(self, what: str, msg: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning("%s: served from fresh memory (slow first touch); raise PoolConfig.staging_bytes or "
                        "restore with get_into/stream into memory you keep", msg)

    def _try_any(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        t = self.try_empty(shape, dtype)
        if t is None and self._overflow is not None:
            t = self._overflow.try_empty(shape, dtype)
            if t is not None:
                self.overflowed += 1
        return t

    async def _acquire(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        while True:
            t = self._try_any(shape, dtype)
            if t is not None:
                return t
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[None] = loop.create_future()
            with self._lock:
                self._waiters.append((loop, fut))
            self.waits += 1
            # memory may have come back between the failed try and registering: try once more before waiting
            t = self._try_any(shape, dtype)
            if t is not None:
                with self._lock:
                    if (loop, fut) in self._waiters:
                        self._waiters.remove((loop, fut))
                return t
            try:
                await fut
            except asyncio.CancelledError:
                with self._lock:
                    if (loop, fut) in self._waiters:
                        self._waiters.remove((loop, fut))
                raise

    def _give_back(self, off: int, n: int) -> None:
        with self._lock:
            self._alloc.free(off, n)
        self._wake()

    def _wake(self) -> None:
        with self._lock:
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            if not loop.is_closed():
                loop.call_soon_threadsafe(_resolve, fut)

    def close(self) -> None:
        """Stop populating and close the memfd; the mapping itself lives until the last tensor over it is
        dropped (the tiers that shared or registered it have been closed first)."""
        self._closed = True
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def stats(self) -> dict[str, object]:
        return {
            "bytes": self.nbytes,
            "shared": self.fd is not None,
            "hugetlb": self.hugetlb,
            "populated": self._populated,
            "free": self.free_bytes,
            "ready": self.ready,
            "populate_seconds": self.populate_seconds,
            "acquired": self.acquired,
            "waits": self.waits,
            "oversize": self.oversize,
            "fallbacks": self.fallbacks,
            "overflowed": self.overflowed,
            "overflow_bytes": self._overflow.reserved if self._overflow is not None else 0,
        }

    def __repr__(self) -> str:
        return (f"StagingArena({self.nbytes >> 20} MiB, populated {self._populated >> 20} MiB, "
                f"free {self.free_bytes >> 20} MiB)")


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
