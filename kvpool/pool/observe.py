"""Latency histograms and log lines for a pool: what a serving engineer watches.

Each pool keeps one :class:`LatencyHistogram` per operation (``lookup``, ``get`` -- which covers ``get`` and
``get_into`` --, ``put`` and ``stream_first_layer``, the time from calling :meth:`KVPool.stream` to its first
layer). Recording one is a ``bisect`` and two additions under the event loop (no lock, no allocation), so the
hot path stays cheap; :class:`kvpool.metrics.PoolCollector` turns them into Prometheus histograms at scrape time.

The methods are wrapped with :func:`timed` and :func:`timed_stream` (one decorator line on the façade each);
the pool's open is logged with :func:`log_open`.
"""

from __future__ import annotations

import bisect
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from ..units import format_size

if TYPE_CHECKING:
    from .facade import KVPool

__all__ = ["LatencyHistogram", "Observer", "log_delete", "log_open", "observer", "timed", "timed_stream"]

log = logging.getLogger("kvpool")

#: Bucket upper bounds in seconds: 25 us (a DRAM lookup) to 30 s (a huge restore from a remote tier).
BUCKETS: tuple[float, ...] = (
    25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3,
    1.0, 2.5, 5.0, 10.0, 30.0,
)
OPERATIONS = ("lookup", "get", "put", "stream_first_layer")


class LatencyHistogram:
    """Counts of observations per bucket (non-cumulative; the last slot is ``+Inf``), their sum and count."""

    __slots__ = ("counts", "sum", "count")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[str, float]]:
        """``(upper bound, observations <= it)`` pairs, ending with ``+Inf``: Prometheus' bucket form."""
        out, acc = [], 0
        for bound, n in zip((*(repr(b) for b in BUCKETS), "+Inf"), self.counts):
            acc += n
            out.append((bound, float(acc)))
        return out

    def quantile(self, q: float) -> float:
        """An upper bound of the ``q`` quantile (the bucket it falls in); 0.0 with no observations."""
        if not self.count:
            return 0.0
        rank, acc = q * self.count, 0
        for i, n in enumerate(self.counts):
            acc += n
            if acc >= rank:
                return BUCKETS[i] if i < len(BUCKETS) else float("inf")
        return float("inf")


class Observer:
    """One pool's latency histograms, by operation."""

    def __init__(self) -> None:
        self.latency = {op: LatencyHistogram() for op in OPERATIONS}


def observer(pool: KVPool) -> Observer:
    """The pool's :class:`Observer`, created on first use (the façade's ``__init__`` needs no hook)."""
    obs: Observer | None = pool.__dict__.get("_observer")
    if obs is None:
        obs = pool.__dict__["_observer"] = Observer()
    return obs


P = ParamSpec("P")
R = TypeVar("R")


def timed(op: str) -> Callable[[Callable[P, Coroutine[Any, Any, R]]], Callable[P, Coroutine[Any, Any, R]]]:
    """Decorate a pool coroutine method: its wall time (success or failure) goes to histogram ``op``."""
    if op not in OPERATIONS:
        raise ValueError(f"unknown operation {op!r}")

    def wrap(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
        @functools.wraps(fn)
        async def run(*args: P.args, **kwargs: P.kwargs) -> R:
            t0 = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                observer(args[0]).latency[op].observe(time.perf_counter() - t0)  # type: ignore[arg-type]

        return run

    return wrap


def timed_stream(fn: Callable[P, AsyncIterator[R]]) -> Callable[P, AsyncIterator[R]]:
    """Decorate :meth:`KVPool.stream`: the time until its first layer is ready goes to ``stream_first_layer``
    (a stream that yields nothing -- a miss -- records nothing: there is no first layer to wait for)."""

    @functools.wraps(fn)
    async def run(*args: P.args, **kwargs: P.kwargs) -> AsyncIterator[R]:
        t0 = time.perf_counter()
        gen = fn(*args, **kwargs)
        first = True
        try:
            async for item in gen:
                if first:
                    observer(args[0]).latency["stream_first_layer"].observe(  # type: ignore[arg-type]
                        time.perf_counter() - t0
                    )
                    first = False
                yield item
        finally:
            aclose = getattr(gen, "aclose", None)
            if aclose is not None:  # close the inner generator now, so its reads are cancelled and awaited
                await aclose()

    return run


def describe_tiers(pool: KVPool) -> str:
    """One phrase per tier: ``dram 8.0 GiB (0 objects), uring 100.0 GiB (12 objects recovered)``."""
    parts = []
    for t in pool.stats()["tiers"]:
        cap = t.get("capacity")
        text = f"{t.get('scheme', '?')} {format_size(cap) if cap else 'unbounded'}"
        if "objects" in t:
            text += f" ({t['objects']} objects)"
        parts.append(text)
    return ", ".join(parts)


def log_open(pool: KVPool, seconds: float) -> None:
    """INFO: the pool opened -- model, tiers with capacities and the objects each holds (recovered, for a
    persistent tier), and how long opening took."""
    log.info("kvpool opened for %s in %.3f s: %s", pool.model_id, seconds, describe_tiers(pool))


def log_delete(pool: KVPool, chunks: int) -> None:
    """INFO: a delete removed chunks (a destructive action is always visible in the log; a no-op is not)."""
    if chunks:
        log.info("kvpool %s: deleted %d chunk(s) (%s) from every tier", pool.model_id, chunks,
                 format_size(chunks * pool.layout.chunk_nbytes))
