"""Backend wrappers that inject latency, bandwidth limits and faults, for testing schedulers and failure paths.

They wrap a real backend (the bytes really are stored); only time and failures are made up.
"""

from __future__ import annotations

import asyncio
import errno
import random
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import attrs
import torch

from ..storage.backend import Backend, Capabilities, ReadRequest, nbytes_of
from ..storage.staging import StagingArena
from ..errors import BackendError, CapacityError

__all__ = ["ForwardingBackend", "LatencyBackend", "FaultyBackend", "FAULTS"]


class ForwardingBackend(Backend):
    """A backend that forwards everything, optional surfaces included, to ``inner``: the base for wrappers
    that observe or alter some calls (a wrapped tier stays exactly as durable and as hinted as it was)."""

    def __init__(self, inner: Backend) -> None:
        super().__init__()
        self.inner = inner
        self.wrapped_scheme = inner.scheme

    @property
    def capabilities(self) -> Capabilities:
        return self.inner.capabilities

    async def _open(self) -> None:
        await self.inner.open()

    async def _close(self) -> None:
        await self.inner.close()

    async def delete(self, key: bytes) -> bool:
        return await self.inner.delete(key)

    async def contains(self, key: bytes) -> bool:
        return await self.inner.contains(key)

    async def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        return await self.inner.contains_many(keys)

    async def keys(self) -> AsyncIterator[bytes]:
        async for k in self.inner.keys():
            yield k

    @property
    def capacity(self) -> int | None:
        return self.inner.capacity

    @property
    def used_bytes(self) -> int:
        return self.inner.used_bytes

    # the optional surfaces, forwarded: a wrapped tier stays as durable and as hinted as it was
    async def flush(self) -> None:
        await self.inner.flush()

    def hint_prefix(self, parent: bytes, child: bytes) -> None:
        self.inner.hint_prefix(parent, child)

    def hint_attention(self, key: bytes, mass: float) -> None:
        self.inner.hint_attention(key, mass)

    def hint_touch(self, key: bytes) -> None:
        self.inner.hint_touch(key)

    async def attach_staging(self, arena: StagingArena) -> None:
        await self.inner.attach_staging(arena)

    @property
    def device_path(self) -> str | None:
        return self.inner.device_path

    async def object_size(self, key: bytes) -> int | None:
        return await self.inner.object_size(key)

    def stats(self) -> dict[str, Any]:
        return self.inner.stats()


_Wrapper = ForwardingBackend


class LatencyBackend(_Wrapper):
    """Adds ``latency`` seconds per operation plus ``nbytes / bandwidth``, served by a device with
    ``channels`` parallel channels (so concurrent operations queue like on a real device). Records the
    order in which operations were served (``log``: ("r"|"w", key, nbytes))."""

    def __init__(self, inner: Backend, *, latency: float = 0.0, bandwidth: float | None = None,
                 channels: int = 1) -> None:
        super().__init__(inner)
        self.latency, self.bandwidth = latency, bandwidth
        self._device = asyncio.Semaphore(channels)
        self.log: list[tuple[str, bytes, int]] = []

    @property
    def capabilities(self) -> Capabilities:
        return attrs.evolve(self.inner.capabilities, queued_io=True)  # it simulates a device

    async def _serve(self, kind: str, key: bytes, n: int) -> None:
        async with self._device:
            self.log.append((kind, key, n))
            await asyncio.sleep(self.latency + (n / self.bandwidth if self.bandwidth else 0.0))

    async def write(self, key: bytes, src: torch.Tensor) -> None:
        await self._serve("w", key, nbytes_of(src))
        await self.inner.write(key, src)

    async def read_into(self, key: bytes, dest: torch.Tensor, offset: int = 0) -> bool:
        await self._serve("r", key, nbytes_of(dest))
        return await self.inner.read_into(key, dest, offset)

    async def write_many(self, items: Sequence[tuple[bytes, torch.Tensor]]) -> None:
        for k, s in items:
            await self.write(k, s)

    async def read_many(self, requests: Sequence[ReadRequest]) -> list[bool]:
        return [await self.read_into(r.key, r.dest, r.offset) for r in requests]


# The failures a real tier reports, by name (what ``FaultyBackend.error`` may be set to).
FAULTS: dict[str, Callable[[], BaseException]] = {
    "eio": lambda: BackendError(errno.EIO, "injected I/O error"),
    "enospc": lambda: BackendError(errno.ENOSPC, "injected: no space left on device"),
    "down": lambda: BackendError(errno.ECONNREFUSED, "injected: tier down"),
    "timeout": lambda: BackendError(errno.ETIMEDOUT, "injected: timed out"),
    "full": lambda: CapacityError("injected: tier full"),
}


class FaultyBackend(_Wrapper):
    """A real tier that fails, stalls or corrupts on command.

    - Writes fail (raising ``FAULTS[error]``: EIO by default) with probability ``write_fail``, or always
      while ``broken`` is set; ``fail_keys`` limits the failures to some keys.
    - Reads fail with probability ``read_fail`` (a miss, as a backend reports a read fault), or while
      ``broken``; ``contains``/``delete`` raise while ``broken`` (a tier that is down answers nothing).
    - :meth:`stall` makes every operation (or, with ``keys``, writes of those keys) wait until
      :meth:`resume`: a hung device or a paused server.
    - ``corrupt_reads``: a read returns flipped bytes *and reports a miss*, as a checksumming tier does
      (a corrupt object is a miss, never data); the destination has been scribbled on, which a caller
      must tolerate for a read that reported failure.

    ``injected`` counts the faults injected.
    """

    def __init__(self, inner: Backend, *, read_fail: float = 0.0, write_fail: float = 0.0, seed: int = 0,
                 error: str = "eio") -> None:
        super().__init__(inner)
        if error not in FAULTS:
            raise ValueError(f"error must be one of {', '.join(FAULTS)}, got {error!r}")
        self.read_fail, self.write_fail = read_fail, write_fail
        self.error = error
        self.broken = False
        self.corrupt_reads = False
        self.fail_keys: set[bytes] | None = None
        self._rng = random.Random(seed)
        self.injected = 0
        self._go = asyncio.Event()
        self._go.set()
        self._stall_keys: set[bytes] | None = None
        self.stalled = 0  # operations waiting in a stall now

    # --- commands ----------------------------------------------------------------------------------------
    def stall(self, keys: Sequence[bytes] | None = None) -> None:
        """Hold operations (writes of ``keys`` only, when given) until :meth:`resume`."""
        self._stall_keys = set(keys) if keys is not None else None
        self._go.clear()

    def resume(self) -> None:
        self._go.set()

    async def _gate(self, key: bytes | None, writing: bool) -> None:
        if self._go.is_set():
            return
        if self._stall_keys is not None and not (writing and key in self._stall_keys):
            return
        self.stalled += 1
        try:
            await self._go.wait()
        finally:
            self.stalled -= 1

    def _fail(self, p: float, key: bytes | None = None) -> bool:
        if self.fail_keys is not None and key not in self.fail_keys:
            return False
        if self.broken or (p and self._rng.random() < p):
            self.injected += 1
            return True
        return False

    # --- the data path -----------------------------------------------------------------------------------
    async def write(self, key: bytes, src: torch.Tensor) -> None:
        await self._gate(key, True)
        if self._fail(self.write_fail, key):
            raise FAULTS[self.error]()
        await self.inner.write(key, src)

    async def write_many(self, items: Sequence[tuple[bytes, torch.Tensor]]) -> None:
        for k, s in items:  # one by one: a fault part-way leaves the first items stored, as on a device
            await self.write(k, s)

    async def read_into(self, key: bytes, dest: torch.Tensor, offset: int = 0) -> bool:
        await self._gate(key, False)
        if self._fail(self.read_fail, key):
            return False
        ok = await self.inner.read_into(key, dest, offset)
        if ok and self.corrupt_reads:
            self.injected += 1
            flat = dest.view(-1).view(torch.uint8) if dest.is_contiguous() else None
            if flat is not None and flat.numel():
                flat[0] ^= 0xFF
            return False
        return ok

    async def read_many(self, requests: Sequence[ReadRequest]) -> list[bool]:
        return list(await asyncio.gather(*(self.read_into(r.key, r.dest, r.offset) for r in requests)))

    async def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        await self._gate(None, False)
        if self.broken:
            self.injected += 1
            raise FAULTS[self.error]()
        return await self.inner.contains_many(keys)

    async def contains(self, key: bytes) -> bool:
        return (await self.contains_many([key]))[0]

    async def delete(self, key: bytes) -> bool:
        await self._gate(None, False)
        if self.broken:
            self.injected += 1
            raise FAULTS[self.error]()
        return await self.inner.delete(key)
