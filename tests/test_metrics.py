from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest

from kvpool import KVLayout, KVPool
from kvpool.memory.dram import DRAMBackend
from kvpool.metrics import PoolCollector
from kvpool.pool.scheduler import Priority, TierScheduler, io_class
from kvpool.testing.backend_tests import rand_bytes, rand_key
from kvpool.testing.faults import LatencyBackend
from kvpool.types import BackgroundStats, PoolStats, SchedulerStats, StagingStats


async def test_prometheus_exposition_reflects_pool_counters() -> None:
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float16, chunk_tokens=16)
    async with await KVPool.open(layout=layout, model_id="m", backends=["dram://?capacity=1MiB"]) as pool:
        reg = CollectorRegistry()
        reg.register(PoolCollector(pool, name="p1"))
        t = list(range(32))
        await pool.put(t, torch.randn(layout.kv_shape(32)).half())
        await pool.get(t)
        text = generate_latest(reg).decode()
        assert 'kvpool_chunks_written_total{pool="p1"} 2.0' in text
        assert 'kvpool_hit_tokens_total{pool="p1"} 32.0' in text
        assert 'kvpool_tier_used_bytes{pool="p1",scheme="dram",tier="0"}' in text
        assert "kvpool_tier_recent_read_bytes_per_second" in text
        s = pool.stats()["tiers"][0]["io"]
        assert s["bytes_read"] == 2 * layout.chunk_nbytes and s["recent_read_Bps"] > 0


async def test_latency_histograms_and_hit_ratios_are_exposed() -> None:
    """A scrape shows lookup/get/put/time-to-first-layer histograms with the calls made, and hit ratios of the
    pool and of each tier."""
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float16, chunk_tokens=16)
    async with KVPool.open(layout=layout, model_id="m", backends=["dram://?capacity=1MiB"]) as pool:
        reg = CollectorRegistry()
        reg.register(PoolCollector(pool, name="p2"))
        t = list(range(32))
        await pool.put(t, torch.randn(layout.kv_shape(32)).half())
        assert await pool.lookup(t) == 32
        await pool.get(t)  # hit: 32 tokens
        await pool.get(list(range(100, 132)))  # miss: 32 tokens
        out = torch.empty(layout.kv_shape(32), dtype=torch.float16)
        await pool.get_into(t, out)
        layers = [x async for _layer, x in pool.stream(t)]
        assert len(layers) == 2
        text = generate_latest(reg).decode()
        assert 'kvpool_put_seconds_count{pool="p2"} 1.0' in text
        assert 'kvpool_lookup_seconds_count{pool="p2"} 1.0' in text
        assert 'kvpool_get_seconds_count{pool="p2"} 3.0' in text  # get x2 + get_into
        assert 'kvpool_stream_first_layer_seconds_count{pool="p2"} 1.0' in text
        assert 'kvpool_get_seconds_bucket{le="+Inf",pool="p2"} 3.0' in text
        # 32 hit + 32 miss + 32 hit (get_into) + 32 hit (stream): 96 of 128 tokens
        assert 'kvpool_hit_ratio{pool="p2"} 0.75' in text
        assert 'kvpool_tier_hit_ratio{pool="p2",scheme="dram",tier="0"}' in text
        assert "kvpool_tier_io_queue_wait_seconds_total" in text


async def test_open_and_delete_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    """INFO at open (tiers, capacities, objects, time) and for every delete that removed something; a
    useful repr."""
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float16, chunk_tokens=16)
    with caplog.at_level("INFO", logger="kvpool"):
        async with KVPool.open(layout=layout, model_id="m", backends=["dram://?capacity=1MiB"]) as pool:
            t = list(range(32))
            await pool.put(t, torch.randn(layout.kv_shape(32)).half())
            assert await pool.delete(t) == 32
            assert await pool.delete(t) == 0
            assert repr(pool).startswith("<KVPool 'm' open: 2 layers x 2 kv heads x 16 float16, 16 tokens/chunk; "
                                         "tiers dram 1.0 MiB")
    opened = [r.getMessage() for r in caplog.records if "opened" in r.getMessage()]
    assert opened and "kvpool opened for m in" in opened[0] and "dram 1.0 MiB (0 objects)" in opened[0]
    deleted = [r.getMessage() for r in caplog.records if "deleted" in r.getMessage()]
    assert deleted == ["kvpool m: deleted 2 chunk(s) (8.0 KiB) from every tier"]


def _value(text: str, series: str) -> float:
    """The value of one series in an exposition."""
    (line,) = [ln for ln in text.splitlines() if ln.startswith(series + " ")]
    return float(line.split()[-1])


async def test_stats_keys_match_their_typed_shape_and_numeric_ones_are_exported(tmp_path: Path) -> None:
    """Every key ``KVPool.stats()`` returns is named by :class:`kvpool.types.PoolStats` (and its staging,
    background and tier parts by theirs), and the numeric ones reach the Prometheus exposition."""
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float16, chunk_tokens=16)
    backends = ["dram://?capacity=1MiB", f"uring://{tmp_path}/a.kv?capacity=16MiB"]
    async with await KVPool.open(layout=layout, model_id="m", backends=backends) as pool:
        reg = CollectorRegistry()
        reg.register(PoolCollector(pool, name="p3"))
        await pool.put(list(range(32)), torch.randn(layout.kv_shape(32)).half())
        s = pool.stats()
        assert set(s) == set(PoolStats.__annotations__)
        assert set(s["staging"]) <= set(StagingStats.__annotations__)
        assert set(s["background"]) == set(BackgroundStats.__annotations__)
        for t in s["tiers"]:
            assert {"faults", "last_fault", "io"} <= set(t)
            assert set(t["io"]) <= set(SchedulerStats.__annotations__)
        text = generate_latest(reg).decode()
        for key in ("promotions_dropped", "prefetches_dropped", "write_back_waits", "promotion_failures"):
            assert f'kvpool_{key}_total{{pool="p3"}} 0.0' in text
        assert 'kvpool_background_tasks{pool="p3"}' in text
        assert 'kvpool_background_queued_bytes{kind="write_back",pool="p3"}' in text
        assert _value(text, 'kvpool_staging_bytes{pool="p3"}') == s["staging"]["bytes"] > 0
        assert 'kvpool_staging_acquired_total{pool="p3"}' in text
        assert 'kvpool_tier_faults_total{kind="write_failures",pool="p3",scheme="uring",tier="1"} 0.0' in text
        # the put wrote one batch through each tier's scheduler: one foreground request each
        assert 'kvpool_tier_io_ops_total{pool="p3",priority="foreground",tier="1"} 1.0' in text
        assert 'kvpool_tier_io_request_wait_seconds_count{pool="p3",priority="foreground",tier="1"} 1.0' in text
        assert 'kvpool_tier_io_request_wait_seconds_count{pool="p3",priority="write_back",tier="1"} 0.0' in text


async def test_scheduler_records_each_requests_queue_wait_per_priority() -> None:
    """A request that queued behind a running one records (about) that one's device time when dequeued; one
    admitted at once records ~0."""
    dev = LatencyBackend(DRAMBackend(8 << 20), latency=0.05)
    await dev.open()
    sched = TierScheduler(dev, max_inflight=1)
    keys = [rand_key() for _ in range(2)]

    async def write_back(k: bytes) -> None:
        with io_class(Priority.WRITE_BACK):
            await sched.write(k, rand_bytes(4096))

    await asyncio.gather(sched.write(keys[0], rand_bytes(4096)), write_back(keys[1]))
    fg, wb = sched.wait_histograms["foreground"], sched.wait_histograms["write_back"]
    assert fg.count == 1 and fg.sum < 0.01  # admitted at once
    assert wb.count == 1 and 0.04 < wb.sum < 1.0  # waited for the foreground write's 50 ms
    assert wb.quantile(0.5) >= 0.05  # in the 50-100 ms bucket
    await dev.close()
