"""The conformance suite: the contract of :class:`kvpool.storage.backend.Backend`, as tests.

Subclass :class:`BackendTests` in a test module and implement :meth:`BackendTests.make_backend`; pytest (with
pytest-asyncio in auto mode) collects every ``test_*`` method. Capacity tests use :attr:`BackendTests.capacity`;
a backend without a capacity of its own (a remote server) sets ``bounded = False``. To check bytes without
trusting the backend's own read path, implement the raw hooks (``get_raw``, and where the backend allows,
``set_raw`` and ``corrupt_raw``; see :mod:`kvpool.testing.contract_tests`). Tests that depend on a capability
run only where the backend declares it (``persistent``, ``durable``, ``partial_reads``, ``eviction_hints``).

The suite has three parts: the core round trips, membership, batches, concurrency, capacity and lifecycle
(here); the raw-channel, capability, flush and cancellation tests
(:class:`~kvpool.testing.contract_tests.ContractTests`); and a stateful Hypothesis test against a dict model
(:class:`~kvpool.testing.stateful_tests.StatefulTests`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import torch

from ..errors import CapacityError, PoolClosedError
from ..storage.backend import Backend, ReadRequest, nbytes_of
from ..storage.eviction import EvictionPolicy
from ._data import rand_bytes, rand_key, raw_bytes
from .contract_tests import ContractTests
from .stateful_tests import StatefulTests

__all__ = ["BackendTests", "rand_bytes", "rand_key", "raw_bytes"]

KiB = 1024
MiB = 1024 * 1024


class BackendTests(ContractTests, StatefulTests):
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
        if not backend.capabilities.partial_reads:
            pytest.skip("backend reads whole objects only")
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
        if not backend.capabilities.partial_reads:
            return  # offsets are never asked of it
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
        assert await backend.object_size(k) == nbytes_of(b)

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
        """Overfill: the backend evicts (in its policy's order, where it exposes one) or refuses with
        CapacityError; it never exceeds its capacity, and what it keeps is intact."""
        if not self.bounded:
            pytest.skip("backend has no capacity of its own")
        cap = backend.capacity or self.capacity
        size = self.object_nbytes
        n = 2 * self.capacity // size + 2
        policy = getattr(backend, "policy", None)  # the suite's view into an exposed policy, not the pool's
        kept: list[tuple[bytes, int]] = []  # (key, seed) of the objects still held, oldest first
        refused = 0
        for i in range(n):
            k = rand_key()
            first_victim = next(iter(policy.candidates()), None) if isinstance(policy, EvictionPolicy) else None
            try:
                await backend.write(k, rand_bytes(size, i))
            except CapacityError:
                refused += 1
                continue
            assert backend.used_bytes <= cap
            held = await backend.contains_many([key for key, _ in kept])
            still = [kj for kj, h in zip(kept, held) if h]
            if first_victim is not None and len(still) < len(kept):
                # this write evicted: its first victim was the policy's first candidate
                assert first_victim not in {key for key, _ in still}
            kept = still + [(k, i)]
        assert kept, "the backend refused every object"
        assert refused or len(kept) < n, "nothing was evicted or refused"
        assert len(kept) * size <= cap
        if not refused:
            assert kept[-1][1] == n - 1  # the newest object survived
        out = torch.empty(size, dtype=torch.uint8)
        for key, j in kept:  # and every survivor is intact
            assert await backend.read_into(key, out)
            assert torch.equal(out, rand_bytes(size, j))

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
