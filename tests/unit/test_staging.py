"""StagingArena: memory is populated before it is handed out, comes back when dropped, and back-pressures."""

from __future__ import annotations

import asyncio
import gc
import threading

import pytest
import torch

from kvpool.storage.staging import StagingArena

MiB = 1 << 20


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


async def test_ready_and_populated_before_use() -> None:
    before = _rss_anon()
    a = StagingArena(64 * MiB)
    await a.wait_ready()
    assert a.ready and a.populated == 64 * MiB
    # populated: resident before anything is handed out (so no request pays the faults)
    assert _rss_anon() - before >= 60 * MiB
    t = await a.acquire((16 * MiB,), torch.uint8)
    assert a.contains(t.data_ptr(), t.numel())
    grown = _rss_anon()
    t.fill_(7)
    assert _rss_anon() - grown < 4 * MiB  # writing it faulted nothing new in
    assert int(t[123]) == 7


async def test_handed_out_memory_is_disjoint_and_returns() -> None:
    a = StagingArena(8 * MiB)
    await a.wait_ready()
    x = await a.acquire((2 * MiB,), torch.uint8)
    y = await a.acquire((3 * MiB,), torch.uint8)
    assert x.data_ptr() + x.numel() <= y.data_ptr() or y.data_ptr() + y.numel() <= x.data_ptr()
    assert a.free_bytes == 8 * MiB - 2 * MiB - 4 * MiB  # 2 MiB granules
    v = y[10:20]  # a view keeps the memory
    del y
    gc.collect()
    assert a.free_bytes == 2 * MiB
    del v
    gc.collect()
    assert a.free_bytes == 6 * MiB
    del x
    gc.collect()
    assert a.free_bytes == 8 * MiB


async def test_back_pressure_waits_for_a_drop_from_another_thread() -> None:
    a = StagingArena(4 * MiB)
    await a.wait_ready()
    held = [await a.acquire((4 * MiB,), torch.uint8)]
    waiter = asyncio.ensure_future(a.acquire((2 * MiB,), torch.uint8))
    await asyncio.sleep(0.05)
    assert not waiter.done()  # exhausted: it waits, it does not allocate
    threading.Thread(target=lambda: (held.pop(), gc.collect())).start()
    t = await asyncio.wait_for(waiter, 5)
    assert a.contains(t.data_ptr(), t.numel())
    assert a.waits >= 1 and a.oversize == 0


async def test_oversize_request_is_counted_not_deadlocked() -> None:
    a = StagingArena(2 * MiB)
    await a.wait_ready()
    t = await a.acquire((3 * MiB,), torch.uint8)
    assert t.numel() == 3 * MiB and not a.contains(t.data_ptr(), t.numel())
    assert a.oversize == 1


async def test_dtype_and_shape() -> None:
    a = StagingArena(4 * MiB)
    await a.wait_ready()
    t = await a.acquire((2, 3, 64, 1024), torch.bfloat16)
    assert t.shape == (2, 3, 64, 1024) and t.dtype == torch.bfloat16 and t.is_contiguous()
    assert t.data_ptr() % 4096 == 0
    assert (await a.acquire((0,), torch.float32)).numel() == 0


def test_bad_size() -> None:
    with pytest.raises(ValueError):
        StagingArena(0)


async def test_a_wait_that_would_deadlock_falls_back_and_counts() -> None:
    a = StagingArena(2 * MiB)
    await a.wait_ready()
    held = await a.acquire((2 * MiB,), torch.uint8)  # the caller keeps it while asking for more
    t = await a.acquire((MiB,), torch.uint8, wait_s=0.05)
    assert not a.contains(t.data_ptr(), t.numel()) and a.fallbacks == 1
    assert held.numel() == 2 * MiB


async def test_cancelled_wait_leaves_no_waiter() -> None:
    a = StagingArena(2 * MiB)
    await a.wait_ready()
    held = await a.acquire((2 * MiB,), torch.uint8)
    w = asyncio.ensure_future(a.acquire((MiB,), torch.uint8))
    await asyncio.sleep(0.01)
    w.cancel()
    with pytest.raises(asyncio.CancelledError):
        await w
    assert not a._waiters
    del held


async def test_overflow_serves_beyond_the_arena_and_is_reused() -> None:
    a = StagingArena(2 * MiB, overflow_bytes=16 * MiB)
    await a.wait_ready()
    held = await a.acquire((2 * MiB,), torch.uint8)
    x = await a.acquire((4 * MiB,), torch.uint8, wait_s=5)  # no wait: the overflow has room
    assert not a.contains(x.data_ptr(), 1) and a.overflowed == 1 and a.fallbacks == 0
    ptr = x.data_ptr()
    del x
    gc.collect()
    y = await a.acquire((4 * MiB,), torch.uint8, wait_s=5)
    assert y.data_ptr() == ptr  # reused, not fresh memory
    big = await a.acquire((8 * MiB,), torch.uint8)  # larger than the arena itself: overflow too
    assert a.oversize == 0 and a.overflowed == 3
    del held, y, big


def test_default_size_follows_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    import kvpool
    from kvpool.errors import ConfigError
    from kvpool.storage.staging import default_staging_bytes

    monkeypatch.delenv("KVPOOL_STAGING_BYTES", raising=False)
    small = kvpool.KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype=torch.float16, chunk_tokens=16)
    big = kvpool.KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype=torch.float16, chunk_tokens=256)
    GiB = 1 << 30
    assert default_staging_bytes(small, mem_total=24 * GiB) == 3 * GiB  # an eighth of the memory
    assert default_staging_bytes(small, mem_total=256 * GiB) == 4 * GiB  # at most 4 GiB
    assert default_staging_bytes(big, mem_total=2 * GiB) == 512 * MiB  # 16 chunks, but never over a quarter
    assert default_staging_bytes(big, mem_total=8 * GiB) == 1 * GiB  # 16 x 32 MiB chunks > an eighth
    monkeypatch.setenv("KVPOOL_STAGING_BYTES", "100MiB")
    assert default_staging_bytes(big) % (2 * MiB) == 0 and 100 * MiB <= default_staging_bytes(big) < 102 * MiB
    for bad in ("lots", "0"):
        monkeypatch.setenv("KVPOOL_STAGING_BYTES", bad)
        with pytest.raises(ConfigError, match="KVPOOL_STAGING_BYTES"):
            default_staging_bytes(big)


async def test_shared_arena_is_a_memfd_another_mapping_sees() -> None:
    import mmap
    import os

    a = StagingArena(8 * MiB, shared=True)
    await a.wait_ready()
    assert a.fd is not None and a.stats()["shared"]
    t = a.try_empty((MiB,), torch.uint8)
    assert t is not None
    t.fill_(0x5A)
    # what another process (a vhost-user target) maps through the fd is the very same memory
    other = mmap.mmap(a.fd, a.nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    off = t.data_ptr() - a.address
    assert other[off : off + 4] == b"\x5a" * 4
    other.close()
    fd = a.fd
    a.close()
    assert a.fd is None
    with pytest.raises(OSError):
        os.fstat(fd)  # closed with the arena
