"""What bench_redis and bench_mooncake measure alike: a timed coroutine, and the lookup of a 512-chunk prompt."""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import torch


async def atimed(fn: Callable[[], Awaitable[Any]]) -> float:
    """Seconds one awaited call took."""
    t0 = time.perf_counter()
    await fn()
    return time.perf_counter() - t0


async def lookup_figures(b: Any, repeat: int) -> dict[str, float]:
    """Median ``contains_many`` of 512 stored keys and of one key, in ms (one round trip each)."""
    keys = [os.urandom(16) for _ in range(512)]
    small = torch.zeros(4096, dtype=torch.uint8)
    await b.write_many([(k, small) for k in keys])
    assert await b.contains_many(keys) == [True] * 512
    ts = [await atimed(lambda: b.contains_many(keys)) for _ in range(max(repeat, 21))]
    one = [await atimed(lambda: b.contains_many(keys[:1])) for _ in range(max(repeat, 21))]
    return {"lookup_512_ms": statistics.median(ts) * 1e3, "lookup_1_ms": statistics.median(one) * 1e3}


def parse_args() -> argparse.Namespace:
    """``--repeat`` (timed rounds, default 21) and ``--size-mib`` (the object, default 32)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=21)
    ap.add_argument("--size-mib", type=int, default=32)
    return ap.parse_args()
