from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness.local_raw import ArenaRawHooks
from kvpool import CapacityError, ConfigError
from kvpool.memory.dram import DRAMBackend
from kvpool.config import BackendSpec
from kvpool.testing import BackendTests
from kvpool.testing.backend_tests import rand_bytes, rand_key


class TestDRAMConformance(ArenaRawHooks, BackendTests):
    async def make_backend(self, tmp_path: Path, capacity: int) -> DRAMBackend:
        return DRAMBackend(capacity)


async def test_lru_order_respects_hits() -> None:
    async with DRAMBackend(4 * 4096) as b:
        ks = [rand_key() for _ in range(4)]
        for k in ks:
            await b.write(k, rand_bytes(4096))
        assert await b.read_into(ks[0], torch.empty(4096, dtype=torch.uint8))  # ks[0] becomes most recent
        await b.write(rand_key(), rand_bytes(4096))
        assert await b.contains(ks[0])
        assert not await b.contains(ks[1])
        assert b.stats()["evictions"] == 1


async def test_pinned_reads_are_not_evicted_under_them() -> None:
    # A large read runs in a worker thread with its extent pinned; a write that needs the space must not
    # reuse the extent under the copy.
    size = 8 << 20
    async with DRAMBackend(2 * size) as b:
        k1, k2 = rand_key(), rand_key()
        d1 = rand_bytes(size, 1)
        await b.write(k1, d1)
        await b.write(k2, rand_bytes(size, 2))
        out = torch.empty(size, dtype=torch.uint8)
        import asyncio

        read = asyncio.ensure_future(b.read_into(k1, out))
        await asyncio.sleep(0)  # the read is now copying, k1 pinned
        await b.write(rand_key(), rand_bytes(size, 3))  # must evict k2, not k1
        assert await read
        assert torch.equal(out, d1)


def test_spec_parsing() -> None:
    b = DRAMBackend.from_spec(BackendSpec.parse("dram://?capacity=64MiB"))
    assert b.capacity == 64 << 20
    with pytest.raises(ConfigError, match="capacity"):
        DRAMBackend.from_spec(BackendSpec.parse("dram://"))
    with pytest.raises(ConfigError, match="unknown option"):
        DRAMBackend.from_spec(BackendSpec.parse("dram://?capacity=1MiB&capacty=2"))
    with pytest.raises(ConfigError):
        DRAMBackend.from_spec(BackendSpec.parse("dram://?capacity=lots"))


async def test_full_of_pinned_raises_capacity_error() -> None:
    async with DRAMBackend(4096) as b:
        with pytest.raises(CapacityError):
            await b.write(rand_key(), rand_bytes(8192))


async def test_numa_arena_binds_to_node() -> None:
    b = DRAMBackend.from_spec(BackendSpec.parse("dram://?capacity=8MiB&numa=0"))
    async with b:
        k, d = rand_key(), rand_bytes(1 << 20)
        await b.write(k, d)
        out = torch.empty_like(d)
        assert await b.read_into(k, out) and torch.equal(out, d)
        assert b._arena is not None
        addr = b._arena.data_ptr()
        maps = open("/proc/self/numa_maps").read().splitlines()
        line = next(m for m in maps if int(m.split()[0], 16) <= addr < int(m.split()[0], 16) + (8 << 20))
        assert "bind:0" in line
    with pytest.raises(ConfigError, match="NUMA node 4096"):
        DRAMBackend(1 << 20, numa=4096)


class TestDRAMNumaConformance(ArenaRawHooks, BackendTests):
    async def make_backend(self, tmp_path: Path, capacity: int) -> DRAMBackend:
        return DRAMBackend(capacity, numa=0)
