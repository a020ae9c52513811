"""Bounded background work under a real load: 20k write-back puts under foreground reads."""

from __future__ import annotations

import asyncio
import resource
from pathlib import Path

import numpy as np
import pytest
import torch

from kvpool import KVLayout, KVPool

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=64, dtype=torch.float16, chunk_tokens=16)
CH = LAYOUT.chunk_nbytes  # 4 KiB


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


@pytest.mark.parametrize("n_puts", [2000, pytest.param(20_000, marks=pytest.mark.slow)])
async def test_write_back_back_pressures_puts_and_stays_bounded(tmp_path: Path, n_puts: int) -> None:
    limit = 64 * CH
    pool = await KVPool.open(
        layout=LAYOUT, model_id="m",
        backends=[f"dram://?capacity={4096 * CH}", f"uring://{tmp_path}/p.kv?capacity=256MiB"],
        config={"write_policy": "write-back", "write_back_queue_bytes": limit, "promote_on_hit": False},
    )
    rng = np.random.default_rng(0)
    kv = torch.randn(LAYOUT.kv_shape(16)).to(LAYOUT.dtype)
    hot = [rng.integers(0, 50_000, 16).tolist() for _ in range(8)]
    for t in hot:
        await pool.put(t, kv)
    await pool.flush()
    stop = asyncio.Event()
    reads = 0

    async def reader() -> None:  # foreground reads all along
        nonlocal reads
        out = torch.empty(LAYOUT.kv_shape(16), dtype=LAYOUT.dtype)
        while not stop.is_set():
            for t in hot:
                assert await pool.get_into(t, out) == 16
                reads += 1
            await asyncio.sleep(0)

    readers = [asyncio.ensure_future(reader()) for _ in range(2)]
    rss0 = _rss_mib()
    max_tasks = max_queued = 0
    prompts = [rng.integers(0, 2**31, 16).tolist() for _ in range(n_puts)]
    try:
        for i, t in enumerate(prompts):
            assert await pool.put(t, kv) == 16
            if i % 100 == 0:
                bg = pool.stats()["background"]
                max_tasks = max(max_tasks, bg["tasks"])
                max_queued = max(max_queued, bg["queued_bytes"]["write_back"])
        rss1 = _rss_mib()
    finally:
        stop.set()
        await asyncio.gather(*readers)
    await pool.flush()
    s = pool.stats()
    assert max_tasks <= 3, max_tasks
    assert max_queued <= limit
    assert s["write_backs"] == n_puts + len(hot)  # nothing evicted from DRAM before it reached the SSD
    assert rss1 - rss0 < 100, (rss0, rss1)
    assert reads > 0
    # everything acknowledged is readable from the SSD tier alone
    for t in prompts[:: n_puts // 50]:
        for k in pool.keys_for(t):
            await pool.tiers[0].delete(k)
        assert await pool.lookup(t) == 16
    await pool.close()


async def test_write_back_put_waits_while_the_queue_is_full() -> None:
    from kvpool.memory.dram import DRAMBackend
    from kvpool.testing.faults import FaultyBackend

    low = FaultyBackend(DRAMBackend(64 * CH))
    pool = await KVPool.open(layout=LAYOUT, model_id="m", backends=[DRAMBackend(64 * CH), low],
                             config={"write_policy": "write-back", "write_back_queue_bytes": 4 * CH})
    try:
        kv = torch.randn(LAYOUT.kv_shape(16)).to(LAYOUT.dtype)
        low.stall()  # the lower tier hangs: nothing leaves the queue
        for s in range(4):
            await asyncio.wait_for(pool.put([s] * 16, kv), 5)  # room for 4 chunks
        fifth = asyncio.ensure_future(pool.put([9] * 16, kv))
        await asyncio.sleep(0.2)
        assert not fifth.done()  # back-pressure: the put waits for the writer
        assert pool.stats()["background"]["queued_bytes"]["write_back"] <= 4 * CH
        low.resume()
        assert await asyncio.wait_for(fifth, 5) == 16
        await pool.flush()
        assert pool.stats()["write_back_waits"] == 1 and len(low.inner) == 5
    finally:
        await pool.close()
