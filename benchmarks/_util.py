"""Shared helpers for the benchmarks: timing with medians, result files."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def median_time(fn: Callable[[], Any], repeat: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


async def amedian_time(fn: Callable[[], Awaitable[Any]], repeat: int, warmup: int = 1,
                       before: Callable[[], Awaitable[Any]] | None = None) -> float:
    for _ in range(warmup):
        if before:
            await before()
        await fn()
    ts = []
    for _ in range(repeat):
        if before:
            await before()
        t0 = time.perf_counter()
        await fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def save(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    p = RESULTS / f"{name}.json"
    data = {"machine": {"cpus": os.cpu_count(), "uname": " ".join(os.uname())}, **data}
    p.write_text(json.dumps(data, indent=2))
    return p


def drop_caches() -> bool:
    """Write back dirty pages and drop the page cache (root only); whether it could."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False
