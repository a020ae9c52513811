"""Foreground restores under a concurrent write-back load (issue: scheduler).

A pool with one uring:// tier on a file (8B layout, 32 MiB chunks). We restore 4 prompts x 8 chunks
concurrently (get_into, page-aligned destinations) and measure the bandwidth:
  alone                      nothing else on the device
  after load                 right after 0.3 s of that load stopped (the device's / host's own after-effect)
  + write-back (scheduled)   8 background writers keep writing 32 MiB objects in the WRITE_BACK class
  + write-back (unscheduled) the same load issued in the FOREGROUND class (what happens without priorities)
Target: scheduled >= 0.9x alone. Medians of --repeat runs, page cache dropped before each.

    python benchmarks/bench_scheduler.py [--repeat 5] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import save  # noqa: E402

import kvpool  # noqa: E402
from kvpool.storage.buffers import aligned_empty  # noqa: E402
from kvpool.pool.scheduler import Priority, io_class  # noqa: E402

WRITERS = 8


def drop_caches() -> None:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    layout = kvpool.KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype=torch.float16, chunk_tokens=256)
    T = 8 * layout.chunk_tokens
    n_prompts = 4
    total = n_prompts * 8 * layout.chunk_nbytes
    tmp = tempfile.mkdtemp(prefix="kvpool-sched-", dir=args.dir)
    spec = f"uring://{tmp}/pool.kv?capacity=3GiB"
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 128_000, T) for _ in range(n_prompts)]
    kv = torch.randn(layout.kv_shape(T)).half()
    res: dict[str, float] = {}
    try:
        async with await kvpool.KVPool.open(layout=layout, model_id="bench", backends=[spec]) as pool:
            for p in prompts:
                await pool.put(p, kv)
            outs = [aligned_empty(layout.kv_shape(T), layout.dtype) for _ in prompts]
            src = aligned_empty((layout.chunk_nbytes,), torch.uint8)
            src.random_(0, 255)
            io = pool._io[0]

            async def restore() -> float:
                drop_caches()
                t0 = time.perf_counter()
                got = await asyncio.gather(*(pool.get_into(p, o) for p, o in zip(prompts, outs)))
                assert all(g == T for g in got)
                return total / (time.perf_counter() - t0) / 1e9

            async def writer(prio: Priority, stop: asyncio.Event, written: list[int]) -> None:
                keys = [os.urandom(16) for _ in range(4)]
                i = 0
                with io_class(prio):
                    while not stop.is_set():
                        await io.write(keys[i % 4], src)
                        written[0] += layout.chunk_nbytes
                        i += 1

            async def load(prio: Priority, stop: asyncio.Event, written: list[int]) -> None:
                # WRITERS concurrent write-back streams: enough to saturate the device if let through
                await asyncio.gather(*(writer(prio, stop, written) for _ in range(WRITERS)))

            rows: dict[str, list[float]] = {"alone": [], "after_load": [], "scheduled": [], "unscheduled": []}
            bg_rate: dict[str, list[float]] = {"scheduled": [], "unscheduled": []}
            await restore()  # warm-up
            for _ in range(args.repeat):
                rows["alone"].append(await restore())
                # the same load for 0.3 s, stopped just before the restore: what the device (and, on a VM, the
                # host's write-back of what we just wrote) costs a restore that no scheduler can avoid
                stop, written = asyncio.Event(), [0]
                task = asyncio.ensure_future(load(Priority.WRITE_BACK, stop, written))
                await asyncio.sleep(0.3)
                stop.set()
                await task
                rows["after_load"].append(await restore())
                for name, prio in (("scheduled", Priority.WRITE_BACK), ("unscheduled", Priority.FOREGROUND)):
                    stop, written = asyncio.Event(), [0]
                    task = asyncio.ensure_future(load(prio, stop, written))
                    await asyncio.sleep(0.3)  # the load is running
                    w0 = written[0]
                    t0 = time.perf_counter()
                    rows[name].append(await restore())
                    # background bytes written *during* the restore: what it took from the foreground
                    bg_rate[name].append((written[0] - w0) / (time.perf_counter() - t0) / 1e9)
                    stop.set()
                    await task
            for k, v in rows.items():
                res[f"restore_{k}_GBps"] = statistics.median(v)
            for k, v in bg_rate.items():
                res[f"writeback_during_restore_{k}_GBps"] = statistics.median(v)
            res["scheduled_vs_alone"] = res["restore_scheduled_GBps"] / res["restore_alone_GBps"]
            res["scheduled_vs_after_load"] = res["restore_scheduled_GBps"] / res["restore_after_load_GBps"]
            res["unscheduled_vs_alone"] = res["restore_unscheduled_GBps"] / res["restore_alone_GBps"]
            res["io_stats"] = pool.stats()["tiers"][0]["io"]  # type: ignore[assignment]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for k, v in res.items():
        print(f"{k:30s} {v if isinstance(v, dict) else round(v, 3)}")
    print("saved", save("scheduler", res))


if __name__ == "__main__":
    asyncio.run(main())
