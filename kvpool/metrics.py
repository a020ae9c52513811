"""Prometheus exposition of pool and tier counters (prometheus-client).

    from prometheus_client import start_http_server, REGISTRY
    from kvpool.metrics import PoolCollector
    REGISTRY.register(PoolCollector(pool))
    start_http_server(9400)

The collector reads :meth:`KVPool.stats` at scrape time, so nothing is counted twice and the hot path pays
nothing for metrics.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .pool.facade import KVPool

__all__ = ["PoolCollector"]

_POOL_COUNTERS = (
    "puts", "chunks_written", "chunks_skipped", "lookups", "gets", "hit_tokens", "miss_tokens", "promotions",
    "read_failures", "prefetches", "prefetch_joins", "write_backs", "write_back_failures",
)
_TIER_COUNTERS = (
    "hits", "misses", "evictions", "bytes_read", "bytes_written", "corrupt", "read_errors", "errors", "timeouts",
)
_TIER_GAUGES = ("capacity", "used_bytes", "objects")


class PoolCollector(Collector):
    """Collects one pool's counters; ``pool`` label distinguishes several pools in one process."""

    def __init__(self, pool: KVPool, name: str = "default") -> None:
        self.pool = pool
        self.name = name

    def collect(self) -> Iterator[Any]:
        s = self.pool.stats()
        for key in _POOL_COUNTERS:
            c = CounterMetricFamily(f"kvpool_{key}", f"kvpool pool counter {key}", labels=["pool"])
            c.add_metric([self.name], float(s.get(key, 0)))
            yield c
        tiers = s.get("tiers", [])
        for key in _TIER_COUNTERS:
            c = CounterMetricFamily(f"kvpool_tier_{key}", f"kvpool tier counter {key}", labels=["pool", "tier", "scheme"])
            for i, t in enumerate(tiers):
                if key in t:
                    c.add_metric([self.name, str(i), str(t.get("scheme", ""))], float(t[key]))
            yield c
        for key in _TIER_GAUGES:
            g = GaugeMetricFamily(f"kvpool_tier_{key}", f"kvpool tier {key}", labels=["pool", "tier", "scheme"])
            for i, t in enumerate(tiers):
                if t.get(key) is not None:
                    g.add_metric([self.name, str(i), str(t.get("scheme", ""))], float(t[key]))
            yield g
        bw = GaugeMetricFamily("kvpool_tier_recent_read_bytes_per_second",
                               "read bandwidth of the tier's recent foreground operations", labels=["pool", "tier"])
        q = GaugeMetricFamily("kvpool_tier_io_queued", "operations waiting in the tier's I/O scheduler",
                              labels=["pool", "tier"])
        for i, t in enumerate(tiers):
            io = t.get("io", {})
            bw.add_metric([self.name, str(i)], float(io.get("recent_read_Bps", 0.0)))
            q.add_metric([self.name, str(i)], float(io.get("queued", 0)))
        yield bw
        yield q
