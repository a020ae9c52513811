"""Independent channels to the local backends' stored bytes (DRAM, GPU, SSD), for the conformance suite's raw hooks.

Each function reaches an object without the backend's read path: the memory tiers' arena tensor, the SSD
tier's pool file or block device through plain ``os.pread``/``os.pwrite`` at the object's offset (from the
index, the one piece of backend state used: where the object is, never what it holds).
"""

from __future__ import annotations

import os

from kvpool.memory.arena import ArenaTier
from kvpool.ssd.store import UringBackend
from kvpool.storage.backend import Backend


def arena_get_raw(backend: Backend, key: bytes) -> bytes | None:
    """The bytes of ``key`` in a DRAM or GPU tier's arena, copied out with a plain tensor slice."""
    assert isinstance(backend, ArenaTier)
    ext = backend._index.get(key)
    if ext is None:
        return None
    assert backend._arena is not None
    return bytes(backend._arena[ext.start : ext.start + ext.nbytes].cpu().numpy().tobytes())


def uring_where(backend: Backend, key: bytes) -> tuple[int, int] | None:
    """(absolute offset, length) of ``key``'s bytes in the pool file or device."""
    assert isinstance(backend, UringBackend)
    e = backend._index.get(key)
    if e is None or e.dead:
        return None
    assert backend._geo is not None
    return backend._geo.d_off + e.offset, e.length


def uring_get_raw(backend: Backend, key: bytes) -> bytes | None:
    """The bytes of ``key`` read with ``os.pread`` from the pool file or block device (buffered, so
    unaffected by the backend's O_DIRECT, registered-buffer and bounce paths)."""
    where = uring_where(backend, key)
    if where is None:
        return None
    off, n = where
    assert isinstance(backend, UringBackend)
    fd = os.open(backend.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, n, off)
    finally:
        os.close(fd)


def uring_corrupt_raw(backend: Backend, key: bytes) -> None:
    """Flip one byte in the middle of ``key``'s bytes on the file or device, and sync it there (so the
    backend's direct reads see it)."""
    where = uring_where(backend, key)
    assert where is not None, "corrupt_raw of an object that is not stored"
    off, n = where
    assert isinstance(backend, UringBackend)
    fd = os.open(backend.path, os.O_RDWR | os.O_CLOEXEC)
    try:
        pos = off + n // 2
        (b,) = os.pread(fd, 1, pos)
        os.pwrite(fd, bytes([b ^ 0xFF]), pos)
        os.fsync(fd)
    finally:
        os.close(fd)


class ArenaRawHooks:
    """Raw hooks (``get_raw``) of the conformance suite for DRAM and GPU tiers; put before ``BackendTests``."""

    async def get_raw(self, backend: Backend, key: bytes) -> bytes | None:
        return arena_get_raw(backend, key)


class UringRawHooks:
    """Raw hooks (``get_raw``, ``corrupt_raw``) for the SSD tier on a file or a block device."""

    async def get_raw(self, backend: Backend, key: bytes) -> bytes | None:
        return uring_get_raw(backend, key)

    async def corrupt_raw(self, backend: Backend, key: bytes) -> None:
        uring_corrupt_raw(backend, key)
