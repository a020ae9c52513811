"""The conformance suite: the contract of :class:`kvpool.storage.backend.Backend`, as tests.

Subclass :class:`BackendTests` in a test module and implement :meth:`BackendTests.make_backend`; pytest (with
pytest-asyncio in auto mode) collects every ``test_*`` method. Persistent backends are also checked across a
close and reopen. Capacity tests use :attr:`BackendTests.capacity`; a backend without a capacity of its own
(a remote server) sets ``bounded = False``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import torch

from ..storage.backend import Backend, ReadRequest, nbytes_of
from ..errors import CapacityError, PoolClosedError

__all__ = ["BackendTests"]

KiB = 1024
MiB = 1024 * 1024


def rand_key() -> bytes:
    return os.urandom(16)


def rand_bytes(n: int, seed: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)


class BackendTests:
    """Every backend passes these. Override :meth:`make_backend`; set the class attributes to taste."""

    #: bytes the backend under test is built with
    capacity: int = 8 * MiB
    #: size of the typical object in these tests (4 KiB multiples suit block devices)
    object_nbytes: int = 64 * KiB
    #: whether the backend enforces :attr:`capacity` itself
    bounded: bool = True

    async def make_backend(self, tmp_path: Path, capacity: int) -> Backend:
        """Build an unopened backend. Called again with the same ``tmp_path`` to reopen a persistent one."""
        raise NotImplementedError

    @pytest_asyncio.fixture
    async def backend(self, tmp_path: Path) -> AsyncIterator[Backend]:
        b = await self.make_backend(tmp_path, self.capacity)
        await b.open()
        try:
            yield b
        finally:
            await b.close()

    # --- round trips -------------------------------------------------------------------------------------
    async def test_roundtrip(self, backend: Backend) -> None:
        k, data = rand_key(), rand_bytes(self.object_nbytes)
        await backend.write(k, data)
        out = torch.zeros_like(data)
        assert await backend.read_into(k, out) is True
        assert torch.equal(out, data)

    async def test_roundtrip_typed_and_strided(self, backend: Backend) -> None:
        # a chunk view of a caller's [L, 2, T, H, D] tensor: non-contiguous, bf16
        kv = torch.randn(4, 2, 64, 4, 32).to(torch.bfloat16)
        view = kv[:, :, 16:48]
        k = rand_key()
        await backend.write(k, view)
        dest_full = torch.zeros_like(kv)
        dest = dest_full[:, :, 16:48]
        assert await backend.read_into(k, dest)
        assert torch.equal(dest, view)
        assert torch.count_nonzero(dest_full[:, :, :16].float()) == 0  # nothing written outside the view

    async def test_range_reads(self, backend: Backend) -> None:
        k, data = rand_key(), rand_bytes(self.object_nbytes)
        await backend.write(k, data)
        step = self.object_nbytes // 4
        for off in range(0, self.object_nbytes, step):
            out = torch.empty(step, dtype=torch.uint8)
            assert await backend.read_into(k, out, off)
            assert torch.equal(out, data[off : off + step])

    async def test_range_outside_object_raises(self, backend: Backend) -> None:
        k = rand_key()
        await backend.write(k, rand_bytes(self.object_nbytes))
        with pytest.raises(ValueError):
            await backend.read_into(k, torch.empty(self.object_nbytes + 4096, dtype=torch.uint8))
        with pytest.raises(ValueError):
            await backend.read_into(k, torch.empty(4096, dtype=torch.uint8), self.object_nbytes)

    async def test_missing_key_is_a_miss(self, backend: Backend) -> None:
        out = torch.full((4096,), 7, dtype=torch.uint8)
        assert await backend.read_into(rand_key(), out) is False
        assert not await backend.contains(rand_key())

    async def test_empty_object_rejected(self, backend: Backend) -> None:
        with pytest.raises(ValueError):
            await backend.write(rand_key(), torch.empty(0, dtype=torch.uint8))

    # --- membership, delete, overwrite -------------------------------------------------------------------
    async def test_contains_and_delete(self, backend: Backend) -> None:
        k = rand_key()
        assert not await backend.contains(k)
        await backend.write(k, rand_bytes(self.object_nbytes))
        assert await backend.contains(k)
        assert await backend.contains_many([k, rand_key()]) == [True, False]
        assert await backend.delete(k) is True
        assert not await backend.contains(k)
        assert await backend.delete(k) is False
        assert await backend.read_into(k, torch.empty(16, dtype=torch.uint8)) is False

    async def test_overwrite_replaces(self, backend: Backend) -> None:
        k = rand_key()
        a, b = rand_bytes(self.object_nbytes, 1), rand_bytes(self.object_nbytes // 2, 2)
        await backend.write(k, a)
        await backend.write(k, b)
        out = torch.empty_like(b)
        assert await backend.read_into(k, out)
        assert torch.equal(out, b)
        assert await backend.object_size(k) in (None, nbytes_of(b))

    async def test_keys_lists_objects(self, backend: Backend) -> None:
        ks = {rand_key() for _ in range(5)}
        for k in ks:
            await backend.write(k, rand_bytes(4096))
        listed = {k async for k in backend.keys()}
        assert ks <= listed

    # --- batches and concurrency -------------------------------------------------------------------------
    async def test_batches(self, backend: Backend) -> None:
        items = [(rand_key(), rand_bytes(self.object_nbytes // 2)) for _ in range(8)]
        await backend.write_many(items)
        outs = [torch.empty_like(d) for _, d in items]
        res = await backend.read_many([ReadRequest(k, o) for (k, _), o in zip(items, outs)] + [
            ReadRequest(rand_key(), torch.empty(16, dtype=torch.uint8))
        ])
        assert res == [True] * 8 + [False]
        for (_, d), o in zip(items, outs):
            assert torch.equal(d, o)
        assert await backend.read_many([]) == []

    async def test_concurrent_readers_and_writers(self, backend: Backend) -> None:
        n = 24
        size = max(4096, min(self.object_nbytes, self.capacity // (2 * n)) // 4096 * 4096)
        data = {rand_key(): rand_bytes(size) for _ in range(n)}

        async def writer(k: bytes) -> None:
            await backend.write(k, data[k])

        await asyncio.gather(*(writer(k) for k in data))

        async def reader(k: bytes) -> None:
            out = torch.empty(size, dtype=torch.uint8)
            for _ in range(3):
                assert await backend.read_into(k, out)
                assert torch.equal(out, data[k])

        await asyncio.gather(*(reader(k) for k in data))

    async def test_overwrite_while_reading_gives_old_or_new(self, backend: Backend) -> None:
        k = rand_key()
        a, b = rand_bytes(self.object_nbytes, 3), rand_bytes(self.object_nbytes, 4)
        await backend.write(k, a)
        outs = [torch.empty_like(a) for _ in range(8)]
        results = await asyncio.gather(*(backend.read_into(k, o) for o in outs), backend.write(k, b))
        for ok, o in zip(results[:-1], outs):
            assert ok
            assert torch.equal(o, a) or torch.equal(o, b)

    # --- capacity ----------------------------------------------------------------------------------------
    async def test_capacity_is_a_hard_bound(self, backend: Backend) -> None:
        if not self.bounded:
            pytest.skip("backend has no capacity of its own")
        size = self.object_nbytes
        keys = []
        for i in range(2 * self.capacity // size + 2):
            k = rand_key()
            await backend.write(k, rand_bytes(size, i))
            keys.append(k)
            assert backend.used_bytes <= (backend.capacity or self.capacity)
        # the newest object survived, the oldest were evicted
        out = torch.empty(size, dtype=torch.uint8)
        assert await backend.read_into(keys[-1], out)
        assert torch.equal(out, rand_bytes(size, len(keys) - 1))
        assert not await backend.contains(keys[0])

    async def test_object_larger_than_capacity(self, backend: Backend) -> None:
        if not self.bounded:
            pytest.skip("backend has no capacity of its own")
        k = rand_key()
        await backend.write(k, rand_bytes(4096))
        with pytest.raises(CapacityError):
            await backend.write(rand_key(), torch.zeros((backend.capacity or self.capacity) + 4096, dtype=torch.uint8))
        assert await backend.contains(k)  # the failed write changed nothing

    async def test_delete_frees_space(self, backend: Backend) -> None:
        if not self.bounded:
            pytest.skip("backend has no capacity of its own")
        before = backend.used_bytes
        k = rand_key()
        await backend.write(k, rand_bytes(self.object_nbytes))
        assert backend.used_bytes > before
        await backend.delete(k)
        assert backend.used_bytes == before

    # --- lifecycle ---------------------------------------------------------------------------------------
    async def test_closed_backend_refuses(self, tmp_path: Path) -> None:
        b = await self.make_backend(tmp_path / "closed", self.capacity)
        with pytest.raises(PoolClosedError):
            await b.write(rand_key(), rand_bytes(4096))
        await b.open()
        await b.open()  # idempotent
        await b.close()
        await b.close()  # idempotent
        with pytest.raises(PoolClosedError):
            await b.read_into(rand_key(), torch.empty(16, dtype=torch.uint8))

    async def test_capabilities_declared(self, backend: Backend) -> None:
        caps = backend.capabilities
        with pytest.raises(AttributeError):
            caps.persistent = not caps.persistent  # type: ignore[misc]
        assert isinstance(backend.stats(), dict)

    async def test_persistence_across_reopen(self, tmp_path: Path) -> None:
        b = await self.make_backend(tmp_path, self.capacity)
        if not b.capabilities.persistent:
            pytest.skip("backend is not persistent")
        await b.open()
        kept, gone = rand_key(), rand_key()
        data = rand_bytes(self.object_nbytes)
        await b.write(kept, data)
        await b.write(gone, rand_bytes(4096))
        await b.delete(gone)
        await b.close()
        b2 = await self.make_backend(tmp_path, self.capacity)
        await b2.open()
        try:
            out = torch.empty_like(data)
            assert await b2.read_into(kept, out)
            assert torch.equal(out, data)
            assert not await b2.contains(gone)
            assert kept in {k async for k in b2.keys()}
        finally:
            await b2.close()
