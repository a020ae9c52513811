"""The parts of the conformance suite that check a backend against its declaration and from outside it.

:class:`ContractTests` is mixed into :class:`kvpool.testing.BackendTests`; it is not collected on its own.

- Raw hooks (zarr's ``StoreTests.get``/``set``): :meth:`ContractTests.get_raw`, :meth:`ContractTests.set_raw`
  and :meth:`ContractTests.corrupt_raw` reach a stored object through a channel *independent* of the backend
  under test (``os.pread`` of the pool file at the object's offset, the arena's bytes, a plain redis
  client...), so the suite checks what a write stored without trusting the backend's own read path. A test
  class implements the ones its backend allows; the tests that need a hook it lacks are skipped.
- Capability-gated tests: ``persistent`` (survives close and reopen), ``durable`` (``flush``),
  ``partial_reads`` (odd ranges), ``eviction_hints``; a consistency test of the declaration itself.
- Cancellation: a cancelled ``read_many``/``write_many`` leaves the caller's memory alone once it has
  returned, never a torn object, and a backend that serves the next calls correctly.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import torch

from ..errors import PoolClosedError
from ..storage.backend import Backend, Capabilities, ReadRequest, check_contract, nbytes_of
from ._data import rand_bytes, rand_key, raw_bytes

__all__ = ["ContractTests"]


class ContractTests:
    """Raw-channel, capability, flush and cancellation tests (see the module docstring)."""

    capacity: int
    object_nbytes: int
    bounded: bool

    async def make_backend(self, tmp_path: Path, capacity: int) -> Backend:
        raise NotImplementedError

    # --- raw hooks: override the ones the backend allows ------------------------------------------------
    async def get_raw(self, backend: Backend, key: bytes) -> bytes | None:
        """The stored bytes of ``key`` (what :meth:`Backend.write` was given, row-major), read without
        :meth:`Backend.read_into`; ``None`` if no object is stored under ``key``."""
        raise NotImplementedError

    async def set_raw(self, backend: Backend, key: bytes, data: bytes) -> None:
        """Store ``data`` under ``key`` without :meth:`Backend.write`, so that the backend then finds it."""
        raise NotImplementedError

    async def corrupt_raw(self, backend: Backend, key: bytes) -> None:
        """Damage the stored bytes of ``key`` (flip one) without going through the backend."""
        raise NotImplementedError

    async def _raw(self, backend: Backend, key: bytes) -> bytes | None:
        try:
            return await self.get_raw(backend, key)
        except NotImplementedError:
            pytest.skip("the test class gives no independent channel (get_raw)")

    # --- through the independent channel ----------------------------------------------------------------
    async def test_raw_bytes_are_what_was_written(self, backend: Backend) -> None:
        kv = torch.randn(2, 2, 48, 4, 16).to(torch.bfloat16)
        view = kv[:, :, 8:40]  # strided: the object must be its row-major bytes, not the underlying storage
        k, plain = rand_key(), rand_key()
        data = rand_bytes(self.object_nbytes, 11)
        await backend.write(k, view)
        await backend.write(plain, data)
        assert await self._raw(backend, k) == raw_bytes(view)
        assert await self._raw(backend, plain) == raw_bytes(data)
        assert await self._raw(backend, rand_key()) is None

    async def test_raw_after_overwrite_and_delete(self, backend: Backend) -> None:
        k = rand_key()
        await backend.write(k, rand_bytes(self.object_nbytes, 1))
        b = rand_bytes(self.object_nbytes // 2, 2)
        await backend.write(k, b)
        assert await self._raw(backend, k) == raw_bytes(b)
        assert await backend.delete(k)
        assert await self._raw(backend, k) is None

    async def test_raw_set_is_read_back(self, backend: Backend) -> None:
        k, data = rand_key(), raw_bytes(rand_bytes(self.object_nbytes, 5))
        try:
            await self.set_raw(backend, k, data)
        except NotImplementedError:
            pytest.skip("the test class cannot store through an independent channel (set_raw)")
        assert await backend.contains(k)
        assert await backend.object_size(k) == len(data)
        out = torch.zeros(len(data), dtype=torch.uint8)
        assert await backend.read_into(k, out)
        assert raw_bytes(out) == data

    async def test_corrupt_object_is_a_miss(self, backend: Backend) -> None:
        k, data = rand_key(), rand_bytes(self.object_nbytes, 6)
        await backend.write(k, data)
        try:
            await self.corrupt_raw(backend, k)
        except NotImplementedError:
            pytest.skip("the test class cannot damage an object (corrupt_raw), or the backend keeps no checksum")
        out = torch.zeros_like(data)
        ok = await backend.read_into(k, out)
        assert not (ok and not torch.equal(out, data)), "a corrupt object was returned as good data"
        assert ok is False

    async def test_persistent_raw_survives_reopen(self, tmp_path: Path) -> None:
        b = await self.make_backend(tmp_path, self.capacity)
        if not b.capabilities.persistent:
            pytest.skip("backend is not persistent")
        k, data = rand_key(), rand_bytes(self.object_nbytes, 7)
        async with b:
            await b.write(k, data)
        b2 = await self.make_backend(tmp_path, self.capacity)
        async with b2:
            assert await self._raw(b2, k) == raw_bytes(data)

    # --- the declaration --------------------------------------------------------------------------------
    async def test_capabilities_consistent(self, backend: Backend) -> None:
        caps = backend.capabilities
        assert isinstance(caps, Capabilities)
        with pytest.raises(AttributeError):
            caps.persistent = not caps.persistent  # type: ignore[misc]
        assert backend.capabilities == caps, "capabilities change while the backend is open"
        check_contract(backend)  # what open checked: declared surfaces are implemented
        assert caps.read_bandwidth is None or caps.read_bandwidth > 0
        if caps.durable:  # durability of objects that vanish on close means nothing
            assert caps.persistent
        if caps.remote:  # a network round trip queues
            assert caps.queued_io
        path = backend.device_path
        assert path is None or (isinstance(path, str) and os.path.exists(path))
        if not self.bounded:
            return
        assert backend.capacity is not None and backend.capacity > 0

    async def test_object_size_of_stored_objects(self, backend: Backend) -> None:
        k, data = rand_key(), rand_bytes(self.object_nbytes - 100, 8)
        assert await backend.object_size(k) is None
        await backend.write(k, data)
        assert await backend.object_size(k) == nbytes_of(data)
        view = torch.randn(3, 2, 10, 2, 8).to(torch.float16)[:, :, 2:7]
        await backend.write(k, view)
        assert await backend.object_size(k) == nbytes_of(view)
        await backend.delete(k)
        assert await backend.object_size(k) is None

    async def test_partial_reads_of_odd_ranges(self, backend: Backend) -> None:
        if not backend.capabilities.partial_reads:
            pytest.skip("backend reads whole objects only")
        k, data = rand_key(), rand_bytes(self.object_nbytes + 777, 9)
        await backend.write(k, data)
        n = nbytes_of(data)
        for off, ln in ((1, 3), (4095, 2), (n - 1, 1), (n // 3, n // 3 + 1), (0, n)):
            out = torch.zeros(ln, dtype=torch.uint8)
            assert await backend.read_into(k, out, off)
            assert torch.equal(out, data[off : off + ln]), (off, ln)
        many = [ReadRequest(k, torch.zeros(100, dtype=torch.uint8), off) for off in (0, 101, n - 100)]
        assert await backend.read_many(many) == [True] * 3
        for r in many:
            assert torch.equal(r.dest, data[r.offset : r.offset + 100])

    async def test_eviction_hints_never_change_contents(self, backend: Backend) -> None:
        a, b, unknown = rand_key(), rand_key(), rand_key()
        da, db = rand_bytes(4096, 1), rand_bytes(4096, 2)
        await backend.write(a, da)
        await backend.write(b, db)
        # the no-op defaults and the real ones alike: hints order eviction, they never add or drop objects
        backend.hint_prefix(a, b)
        backend.hint_prefix(unknown, a)
        backend.hint_prefix(b, unknown)
        backend.hint_attention(a, 3.0)
        backend.hint_attention(unknown, 1.0)
        backend.hint_touch(b)
        backend.hint_touch(unknown)
        assert await backend.contains_many([a, b, unknown]) == [True, True, False]
        out = torch.empty_like(da)
        assert await backend.read_into(a, out) and torch.equal(out, da)
        if backend.capabilities.eviction_hints:
            await backend.delete(a)  # a hinted key that leaves must leave the policy's state consistent
            backend.hint_touch(a)
            backend.hint_attention(a, 1.0)
            assert not await backend.contains(a)

    # --- flush ------------------------------------------------------------------------------------------
    async def test_flush(self, tmp_path: Path) -> None:
        b = await self.make_backend(tmp_path, self.capacity)
        caps = b.capabilities
        k, data = rand_key(), rand_bytes(self.object_nbytes, 12)
        async with b:
            await b.flush()  # nothing written yet: a no-op, not an error
            await b.write(k, data)
            await b.flush()
            out = torch.empty_like(data)
            assert await b.read_into(k, out) and torch.equal(out, data)  # flush changed nothing visible
        with pytest.raises(PoolClosedError):
            await b.flush()
        if not caps.persistent:
            return
        b2 = await self.make_backend(tmp_path, self.capacity)
        async with b2:
            out = torch.empty_like(data)
            assert await b2.read_into(k, out) and torch.equal(out, data)

    # --- cancellation -----------------------------------------------------------------------------------
    async def _settled(self, tensors: list[torch.Tensor]) -> None:
        """Once a call returned or was cancelled, nothing writes into its buffers any more."""
        snap = [t.clone() for t in tensors]
        for _ in range(5):
            await asyncio.sleep(0.005)
        for s, t in zip(snap, tensors):
            assert torch.equal(s, t), "a buffer changed after the call that owned it returned"

    async def test_cancelled_read_many(self, backend: Backend) -> None:
        size = max(4096, min(self.object_nbytes, self.capacity // 32) // 4096 * 4096)
        items = [(rand_key(), rand_bytes(size, 100 + i)) for i in range(8)]
        await backend.write_many(items)
        for delay in (0.0, 0.0005, 0.002):
            outs = [torch.zeros(size, dtype=torch.uint8) for _ in items]
            task = asyncio.ensure_future(backend.read_many([ReadRequest(k, o) for (k, _), o in zip(items, outs)]))
            await asyncio.sleep(delay)
            task.cancel()
            try:
                res: list[bool] | None = await task
            except asyncio.CancelledError:
                res = None
            await self._settled(outs)
            if res is not None:  # it finished before the cancel landed: then it is right
                for ok, o, (_, d) in zip(res, outs, items):
                    assert ok and torch.equal(o, d)
        for k, d in items:  # the backend is none the worse
            out = torch.empty_like(d)
            assert await backend.read_into(k, out) and torch.equal(out, d)

    async def test_cancelled_write_many(self, backend: Backend) -> None:
        size = max(4096, min(self.object_nbytes, self.capacity // 32) // 4096 * 4096)
        for delay in (0.0, 0.0005, 0.002):
            items = [(rand_key(), rand_bytes(size, 200 + i)) for i in range(8)]
            task = asyncio.ensure_future(backend.write_many(items))
            await asyncio.sleep(delay)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            await asyncio.sleep(0.01)
            # each object is all there or not there: never a torn one reported as good
            for k, d in items:
                out = torch.zeros_like(d)
                present = await backend.contains(k)
                ok = await backend.read_into(k, out)
                assert ok == present, "contains and read_into disagree after a cancelled write"
                assert not ok or torch.equal(out, d)
            if self.bounded:
                assert backend.used_bytes <= (backend.capacity or self.capacity)
            await backend.write_many(items)  # and it takes them whole afterwards
            for k, d in items:
                out = torch.empty_like(d)
                assert await backend.read_into(k, out) and torch.equal(out, d)
