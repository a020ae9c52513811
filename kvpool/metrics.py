"""Prometheus exposition of a pool: counters, tier gauges, hit ratios and latency histograms.

    from prometheus_client import start_http_server, REGISTRY
    from kvpool.metrics import PoolCollector
    REGISTRY.register(PoolCollector(pool))
    start_http_server(9400)

The collector reads :meth:`KVPool.stats` and the pool's latency histograms (:mod:`kvpool.pool.observe`) at
scrape time, so nothing is counted twice and the hot path pays only for recording a latency.

Exposed (every family has a ``pool`` label; tier families add ``tier`` (index, fastest first) and ``scheme``):

- ``kvpool_<counter>_total`` for the pool counters (puts, lookups, gets, hit/miss tokens, promotions...);
- ``kvpool_tier_<counter>_total`` (hits, misses, evictions, bytes read/written, corrupt, errors, timeouts);
- ``kvpool_tier_capacity`` / ``_used_bytes`` / ``_objects`` gauges;
- ``kvpool_hit_ratio`` (cached tokens / asked tokens, since open) and ``kvpool_tier_hit_ratio``
  (hits / (hits + misses) of each tier's reads);
- ``kvpool_<op>_seconds`` histograms for ``lookup``, ``get`` (``get`` and ``get_into``), ``put`` and
  ``stream_first_layer`` (time to the first layer of :meth:`KVPool.stream`);
- ``kvpool_tier_io_queue_wait_seconds_total`` per priority class (time requests waited in the tier's I/O
  scheduler), ``kvpool_tier_io_request_wait_seconds`` (a histogram of each request's wait, per priority
  class), ``kvpool_tier_io_queued`` and ``kvpool_tier_io_ops_total`` (operations admitted, per class);
- ``kvpool_tier_faults_total`` (failures the pool contained by skipping the tier, per ``kind``);
- ``kvpool_background_tasks`` and ``kvpool_background_queued_bytes`` (per ``kind`` of background work);
- ``kvpool_staging_<gauge>`` (bytes, populated, free, ready, populate_seconds, overflow_bytes) and
  ``kvpool_staging_<counter>_total`` (acquired, waits, oversize, fallbacks, overflowed).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from .pool.observe import OPERATIONS, observer

if TYPE_CHECKING:
    from .pool.facade import KVPool

__all__ = ["PoolCollector"]

_POOL_COUNTERS = (
    "puts", "chunks_written", "chunks_skipped", "lookups", "gets", "hit_tokens", "miss_tokens", "promotions",
    "read_failures", "prefetches", "prefetch_joins", "write_backs", "write_back_failures", "attention_observations",
    "promotions_dropped", "prefetches_dropped", "write_back_waits", "promotion_failures",
)
# the staging arena: sizes and state are gauges, event counts are counters
_STAGING_GAUGES = ("bytes", "populated", "free", "ready", "populate_seconds", "overflow_bytes")
_STAGING_COUNTERS = ("acquired", "waits", "oversize", "fallbacks", "overflowed")
_TIER_COUNTERS = (
    "hits", "misses", "evictions", "bytes_read", "bytes_written", "corrupt", "read_errors", "errors", "timeouts",
)
_TIER_GAUGES = ("capacity", "used_bytes", "objects")


def _num(v: object) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0


class PoolCollector(Collector):
    """Collects one pool's metrics; the ``pool`` label (``name``) distinguishes several pools in one process."""

    def __init__(self, pool: KVPool, name: str = "default") -> None:
        self.pool = pool
        self.name = name

    def collect(self) -> Iterator[Any]:
        s = self.pool.stats()
        flat: Mapping[str, object] = s  # the counters, read by name
        for key in _POOL_COUNTERS:
            c = CounterMetricFamily(f"kvpool_{key}", f"kvpool pool counter {key}", labels=["pool"])
            c.add_metric([self.name], _num(flat.get(key, 0)))
            yield c
        asked = _num(s["hit_tokens"]) + _num(s["miss_tokens"])
        g = GaugeMetricFamily("kvpool_hit_ratio", "cached tokens / tokens asked by get, get_into, stream",
                              labels=["pool"])
        g.add_metric([self.name], _num(s["hit_tokens"]) / asked if asked else 0.0)
        yield g

        bg: Mapping[str, object] = s["background"]
        g = GaugeMetricFamily("kvpool_background_tasks", "background tasks (write-back, promotion, prefetch) alive",
                              labels=["pool"])
        g.add_metric([self.name], _num(bg.get("tasks", 0)))
        yield g
        g = GaugeMetricFamily("kvpool_background_queued_bytes", "bytes queued for background work, per kind",
                              labels=["pool", "kind"])
        queued = bg.get("queued_bytes", {})
        if isinstance(queued, Mapping):
            for kind, n in queued.items():
                g.add_metric([self.name, str(kind)], _num(n))
        yield g
        staging: Mapping[str, object] = s["staging"]
        for key in _STAGING_GAUGES:
            if key in staging:
                g = GaugeMetricFamily(f"kvpool_staging_{key}", f"kvpool staging arena {key}", labels=["pool"])
                v = staging[key]
                g.add_metric([self.name], float(v) if isinstance(v, bool) else _num(v))
                yield g
        for key in _STAGING_COUNTERS:
            if key in staging:
                c = CounterMetricFamily(f"kvpool_staging_{key}", f"kvpool staging arena {key}", labels=["pool"])
                c.add_metric([self.name], _num(staging[key]))
                yield c

        tiers: list[Mapping[str, object]] = list(s["tiers"])
        tl = ["pool", "tier", "scheme"]

        def labels(i: int, t: Mapping[str, object]) -> list[str]:
            return [self.name, str(i), str(t.get("scheme", ""))]

        for key in _TIER_COUNTERS:
            c = CounterMetricFamily(f"kvpool_tier_{key}", f"kvpool tier counter {key}", labels=tl)
            for i, t in enumerate(tiers):
                if key in t:
                    c.add_metric(labels(i, t), _num(t[key]))
            yield c
        for key in _TIER_GAUGES:
            g = GaugeMetricFamily(f"kvpool_tier_{key}", f"kvpool tier {key}", labels=tl)
            for i, t in enumerate(tiers):
                if t.get(key) is not None:
                    g.add_metric(labels(i, t), _num(t[key]))
            yield g
        g = GaugeMetricFamily("kvpool_tier_hit_ratio", "hits / (hits + misses) of the tier's reads", labels=tl)
        for i, t in enumerate(tiers):
            n = _num(t.get("hits", 0)) + _num(t.get("misses", 0))
            if "hits" in t:
                g.add_metric(labels(i, t), _num(t["hits"]) / n if n else 0.0)
        yield g

        faults = CounterMetricFamily("kvpool_tier_faults", "tier failures the pool contained (skipped, counted)",
                                     labels=[*tl, "kind"])
        for i, t in enumerate(tiers):
            f = t.get("faults", {})
            if isinstance(f, Mapping):
                for kind, n in f.items():
                    faults.add_metric([*labels(i, t), str(kind)], _num(n))
        yield faults

        bw = GaugeMetricFamily("kvpool_tier_recent_read_bytes_per_second",
                               "read bandwidth of the tier's recent foreground operations", labels=["pool", "tier"])
        q = GaugeMetricFamily("kvpool_tier_io_queued", "operations waiting in the tier's I/O scheduler",
                              labels=["pool", "tier"])
        wait = CounterMetricFamily("kvpool_tier_io_queue_wait_seconds",
                                   "seconds requests waited in the tier's I/O scheduler, per priority class",
                                   labels=["pool", "tier", "priority"])
        for i, t in enumerate(tiers):
            io = t.get("io", {})
            io = io if isinstance(io, Mapping) else {}
            bw.add_metric([self.name, str(i)], _num(io.get("recent_read_Bps", 0.0)))
            q.add_metric([self.name, str(i)], _num(io.get("queued", 0)))
            waits = io.get("wait_s", {})
            if isinstance(waits, Mapping):
                for prio, secs in waits.items():
                    wait.add_metric([self.name, str(i), str(prio)], _num(secs))
        yield bw
        yield q
        yield wait
        ops = CounterMetricFamily("kvpool_tier_io_ops", "operations the tier's I/O scheduler admitted, per class",
                                  labels=["pool", "tier", "priority"])
        hist = HistogramMetricFamily("kvpool_tier_io_request_wait_seconds",
                                     "each request's wait in the tier's I/O scheduler, per priority class",
                                     labels=["pool", "tier", "priority"])
        for i, sched in enumerate(self.pool._io):
            for prio, h in sched.wait_histograms.items():
                ops.add_metric([self.name, str(i), prio], _num(sched.counters.get(f"ops_{prio}", 0)))
                hist.add_metric([self.name, str(i), prio], buckets=h.cumulative(), sum_value=h.sum)
        yield ops
        yield hist

        for op, h in observer(self.pool).latency.items():
            assert op in OPERATIONS
            hist = HistogramMetricFamily(f"kvpool_{op}_seconds", f"kvpool {op} latency", labels=["pool"])
            hist.add_metric([self.name], buckets=h.cumulative(), sum_value=h.sum)
            yield hist
