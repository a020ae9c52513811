from __future__ import annotations

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
