"""Backend wrappers that inject latency, bandwidth limits and faults, for testing schedulers and failure paths.

They wrap a real backend (the bytes really are stored); only time and failures are made up.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence
from typing import Any

import attrs
import torch

from ..storage.backend import Backend, ReadRequest, nbytes_of
from ..errors import BackendError

__all__ = ["LatencyBackend", "FaultyBackend"]


class _Wrapper(Backend):
    def __init__(self, inner: Backend) -> None:
        super().__init__()
        self.inner = inner
        self.capabilities = inner.capabilities
        self.wrapped_scheme = inner.scheme

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

    @property
    def policy(self) -> Any:
        return getattr(self.inner, "policy", None)

    def stats(self) -> dict[str, Any]:
        return self.inner.stats()


class LatencyBackend(_Wrapper):
    """Adds ``latency`` seconds per operation plus ``nbytes / bandwidth``, served by a device with
    ``channels`` parallel channels (so concurrent operations queue like on a real device). Records the
    order in which operations were served (``log``: ("r"|"w", key, nbytes))."""

    def __init__(self, inner: Backend, *, latency: float = 0.0, bandwidth: float | None = None,
                 channels: int = 1) -> None:
        super().__init__(inner)
        self.capabilities = attrs.evolve(inner.capabilities, queued_io=True)  # it simulates a device
        self.latency, self.bandwidth = latency, bandwidth
        self._device = asyncio.Semaphore(channels)
        self.log: list[tuple[str, bytes, int]] = []

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


class FaultyBackend(_Wrapper):
    """Fails reads (a miss, as a backend reports faults) and writes (``BackendError``) with given
    probabilities, or always while ``broken`` is set."""

    def __init__(self, inner: Backend, *, read_fail: float = 0.0, write_fail: float = 0.0, seed: int = 0) -> None:
        super().__init__(inner)
        self.read_fail, self.write_fail = read_fail, write_fail
        self.broken = False
        self._rng = random.Random(seed)
        self.injected = 0

    def _fail(self, p: float) -> bool:
        if self.broken or self._rng.random() < p:
            self.injected += 1
            return True
        return False

    async def write(self, key: bytes, src: torch.Tensor) -> None:
        if self._fail(self.write_fail):
            raise BackendError(5, "injected write fault")
        await self.inner.write(key, src)

    async def read_into(self, key: bytes, dest: torch.Tensor, offset: int = 0) -> bool:
        if self._fail(self.read_fail):
            return False
        return await self.inner.read_into(key, dest, offset)
