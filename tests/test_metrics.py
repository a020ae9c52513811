from __future__ import annotations

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest

from kvpool import KVLayout, KVPool
from kvpool.metrics import PoolCollector


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
