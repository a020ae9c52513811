"""The transfer buffer: one page-aligned (page-locked when CUDA is there) buffer per backend, registered with
the transfer engine, that zero-copy values move through, cut into regions by an extent allocator.

A region is freed once its owner released it *and* no client call that was given its address is still
running: a call abandoned at its deadline may yet write into it. While the buffer is full, an acquirer waits
(until its deadline) for a region to be freed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ...storage.allocator import ExtentAllocator
from ...storage.buffers import alloc_aligned
from ..base import Value
from .options import REGION_ALIGN, round_up

__all__ = ["BufferBusy", "Region", "TransferBuffer", "batches"]


class BufferBusy(Exception):
    """No room in the transfer buffer before the deadline."""


class Region:
    """An extent of a :class:`TransferBuffer`."""

    __slots__ = ("buf", "start", "nbytes", "ptr", "busy", "released")

    def __init__(self, buf: TransferBuffer, start: int, nbytes: int) -> None:
        self.buf = buf
        self.start = start
        self.nbytes = nbytes
        self.ptr = buf.ptr + start
        self.busy = 0  # client calls running with this region's address
        self.released = False

    def unbusy(self) -> None:
        self.busy -= 1
        if self.released and self.busy == 0:
            self.buf.free(self)


class TransferBuffer:
    """``size`` bytes of host memory in regions. ``on_wait`` is called once per acquire that had to wait."""

    def __init__(self, size: int, on_wait: Any = None) -> None:
        self.mapping: Any = None
        if torch.cuda.is_available():
            self.arena = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        else:
            self.mapping = alloc_aligned(size)
            self.arena = torch.frombuffer(self.mapping, dtype=torch.uint8, count=size)
        self.size = size
        self.ptr = self.arena.data_ptr()
        self.mv = self.arena.numpy().data.cast("B")
        self._alloc: ExtentAllocator | None = ExtentAllocator(size, REGION_ALIGN)
        self._freed = asyncio.Event()
        self._on_wait = on_wait

    @property
    def free_bytes(self) -> int:
        return self._alloc.free_bytes if self._alloc is not None else 0

    def close(self) -> None:
        """Stop handing out regions; frees after this are ignored (the memory goes with the buffer)."""
        self._alloc = None

    async def acquire(self, nbytes: int, deadline: float) -> Region:
        """A region of ``nbytes``, waiting for room until ``deadline`` (loop time), else :class:`BufferBusy`."""
        if self._alloc is None:
            raise BufferBusy("the transfer buffer is closed")
        if nbytes > self._alloc.capacity:
            raise BufferBusy(f"{nbytes} bytes do not fit a {self._alloc.capacity}-byte buffer")
        loop = asyncio.get_running_loop()
        waited = False
        while True:
            start = self._alloc.alloc(max(nbytes, 1)) if self._alloc is not None else None
            if start is not None:
                return Region(self, start, max(nbytes, 1))
            remaining = deadline - loop.time()
            if remaining <= 0 or self._alloc is None:
                raise BufferBusy(f"no room for {nbytes} bytes in the transfer buffer")
            if not waited and self._on_wait is not None:
                self._on_wait()
                waited = True
            ev = self._freed
            try:
                async with asyncio.timeout(remaining):
                    await ev.wait()
            except TimeoutError:
                raise BufferBusy(f"no room for {nbytes} bytes in the transfer buffer") from None

    def release(self, region: Region | None) -> None:
        """The owner is done with ``region`` (freed now, or when the last call using it returns)."""
        if region is None or region.released:
            return
        region.released = True
        if region.busy == 0:
            self.free(region)

    def free(self, region: Region) -> None:
        if self._alloc is None:
            return
        self._alloc.free(region.start, region.nbytes)
        self._freed.set()
        self._freed = asyncio.Event()

    def view(self, region: Region, off: int, n: int) -> Value:
        a = region.start + off
        return Value(self.mv[a : a + n], self.ptr + a)

    def tensor(self, region: Region, off: int, n: int) -> torch.Tensor:
        a = region.start + off
        return self.arena[a : a + n]


def batches(sizes: Sequence[int], limit: int) -> Iterator[list[int]]:
    """Indices of ``sizes`` cut into runs whose slots fit ``limit`` bytes."""
    cur: list[int] = []
    total = 0
    for i, n in enumerate(sizes):
        s = round_up(n)
        if cur and total + s > limit:
            yield cur
            cur, total = [], 0
        cur.append(i)
        total += s
    if cur:
        yield cur
