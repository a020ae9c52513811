"""Soak: mixed concurrent load on a dram + uring + redis pool, with random SIGKILLs, device faults and
redis-server kills; every acknowledged put is checked byte for byte after every kill.

    python benchmarks/soak.py --seconds 600 [--dir /var/tmp/soak]

Each round starts a child process that opens the pool (DRAM wrapped in a FaultyBackend that fails a share
of its writes, a uring:// file, a redis-server), runs concurrent puts, gets and deletes and logs each
acknowledged put (after ``put`` returned) to an append-only file; the parent SIGKILLs it after a random
time, sometimes kills (and restarts) the redis-server meanwhile, then reopens the file tier alone and reads
back every put acknowledged in that round (and a sample of older ones). Reported: acknowledged puts,
kills, faults injected, wrong bytes (must be 0), lost acknowledged puts (must be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kvpool import KVLayout, KVPool
from kvpool.memory.dram import DRAMBackend
from kvpool.storage.registry import backend_from_spec
from kvpool.testing.faults import FaultyBackend
from kvpool.testing.servers import RedisServer

LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=64, dtype=torch.float16, chunk_tokens=16)
CAPACITY = "1GiB"  # sparse; big enough that nothing acknowledged is evicted during a soak


def prompt(seed: int) -> tuple[list[int], torch.Tensor]:
    """Prompt ``seed``: 1-4 chunks, the first shared by every prompt of the same ``seed % 16``."""
    rng = np.random.default_rng(seed)
    n = 16 * (1 + seed % 4)
    toks = [seed % 16] * 16 + rng.integers(0, 50_000, n - 16).tolist()
    kv = torch.empty(LAYOUT.kv_shape(n), dtype=LAYOUT.dtype)
    kv[:, :, :16] = torch.randn(LAYOUT.kv_shape(16), generator=torch.Generator().manual_seed(seed % 16)).to(kv.dtype)
    if n > 16:
        kv[:, :, 16:] = torch.randn(LAYOUT.kv_shape(n - 16), generator=torch.Generator().manual_seed(seed)).to(kv.dtype)
    return toks, kv


async def child(path: str, redis_url: str, ack_path: str, first_seed: int, fault_p: float) -> None:
    dram = FaultyBackend(DRAMBackend(64 << 20), write_fail=fault_p, seed=first_seed, error="eio")
    pool = await KVPool.open(layout=LAYOUT, model_id="soak", backends=[
        dram, backend_from_spec(f"uring://{path}?capacity={CAPACITY}"),
        backend_from_spec(f"{redis_url}?timeout=0.3&retry_after=1"),
    ])
    ack = open(ack_path, "a", buffering=1)
    seeds = iter(range(first_seed, first_seed + 10**9))
    wrong = 0

    async def worker(w: int) -> None:
        nonlocal wrong
        rng = random.Random(first_seed + w)
        mine: list[int] = []
        while True:
            r = rng.random()
            if r < 0.6 or not mine:
                s = next(seeds)
                t, kv = prompt(s)
                n = await pool.put(t, kv)
                if n == len(t):
                    ack.write(f"{s}\n")  # acknowledged: must be readable after any kill from now on
                    mine.append(s)
            elif r < 0.95:
                s = rng.choice(mine)
                t, kv = prompt(s)
                got = await pool.get(t)
                if not torch.equal(got, kv[:, :, : got.shape[2]]):
                    wrong += 1
                    ack.write(f"WRONG {s}\n")
            else:  # a cancelled put: its rollback must not touch what others acknowledged
                s = next(seeds)
                t, kv = prompt(s)
                task = asyncio.ensure_future(pool.put(t, kv))
                await asyncio.sleep(0)
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass

    ack.write(f"START {first_seed}\n")
    await asyncio.gather(*(worker(w) for w in range(8)))


async def verify(path: str, seeds: list[int]) -> tuple[int, int]:
    """(wrong, lost) over ``seeds``, reading the file tier alone."""
    wrong = lost = 0
    async with await KVPool.open(layout=LAYOUT, model_id="soak",
                                 backends=[f"uring://{path}?capacity={CAPACITY}"]) as pool:
        for s in seeds:
            t, kv = prompt(s)
            got = await pool.get(t)
            if got.shape[2] < len(t):
                lost += 1
            elif not torch.equal(got, kv):
                wrong += 1
    return wrong, lost


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--dir", default=None, help="working directory on a real disk (default: a temp dir)")
    ap.add_argument("--fault-p", type=float, default=0.05, help="share of DRAM writes failing with EIO")
    ap.add_argument("--json", default=None, help="write the report here too")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        path, url, ack_path, first, p = a.child
        asyncio.run(child(path, url, ack_path, int(first), float(p)))
        return
    work = Path(a.dir or tempfile.mkdtemp(prefix="kvpool-soak-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    path, ack_path = str(work / "pool.kv"), str(work / "acks.log")
    Path(ack_path).touch()
    srv = RedisServer(work / "redis")
    rng = random.Random(0)
    report = {"seconds": a.seconds, "rounds": 0, "acknowledged_puts": 0, "kills": 0, "redis_kills": 0,
              "faults_injected_p": a.fault_p, "wrong_bytes": 0, "wrong_reads_in_child": 0,
              "lost_acknowledged_puts": 0, "lost_from_earlier_rounds": 0, "verified": 0}
    acked: list[int] = []
    next_seed = 0
    t_end = time.monotonic() + a.seconds
    try:
        while time.monotonic() < t_end:
            before = len(acked)
            proc = subprocess.Popen([sys.executable, __file__, "--child", path, srv.url, ack_path, str(next_seed),
                                     str(a.fault_p)], stderr=subprocess.DEVNULL)
            # the clock starts once the child's pool is open (imports and open take seconds on a loaded box)
            started = time.monotonic() + 120
            while time.monotonic() < started and proc.poll() is None:
                if f"START {next_seed}" in Path(ack_path).read_text():
                    break
                time.sleep(0.1)
            life = rng.uniform(2.0, 6.0)
            deadline = time.monotonic() + life
            killed_redis = False
            while time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.1)
                if not killed_redis and rng.random() < 0.02:
                    srv.kill()  # the remote node dies under the load; back a moment later
                    report["redis_kills"] += 1
                    killed_redis = True
                    time.sleep(0.3)
                    srv.start()
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                report["kills"] += 1
            proc.wait()
            with open(ack_path) as f:
                lines = f.read().splitlines()
            acked = [int(x) for x in lines if x.isdigit()]
            report["wrong_reads_in_child"] = sum(1 for x in lines if x.startswith("WRONG"))
            next_seed = (max(acked) + 1 if acked else next_seed) + 10**6  # fresh seeds every round
            new = acked[before:]
            sample = rng.sample(acked[:before], min(50, before))
            wrong, lost = asyncio.run(verify(path, new))
            wrong_old, lost_old = asyncio.run(verify(path, sample))
            report["rounds"] += 1
            report["verified"] += len(new) + len(sample)
            report["wrong_bytes"] += wrong + wrong_old
            report["lost_acknowledged_puts"] += lost  # acknowledged in the round just killed
            report["lost_from_earlier_rounds"] += lost_old
            report["acknowledged_puts"] = len(acked)
            print(json.dumps(report), flush=True)
    finally:
        srv.stop()
    print("FINAL", json.dumps(report), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    if (report["wrong_bytes"] or report["lost_acknowledged_puts"] or report["lost_from_earlier_rounds"]
            or report["wrong_reads_in_child"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
