"""Restoring into a GPU paged KV cache (issue: paged GPU restore).

All figures are medians of ``--repeat`` runs, measured in one process against references taken in the same
run. 8B-class layout: 32 layers, 8 KV heads, head_dim 128, fp16, 256-token chunks, vLLM block_size 16.

CUDA (needs a GPU):
  restore_GBps / h2d_pinned_GBps   ``restore_paged`` of a cached 4096-token prefix (512 MiB) from the DRAM tier
                                   into a paged cache with a shuffled block table, until every layer's event has
                                   completed, against one pinned host-to-device ``copy_`` of the same bytes.
                                   Target >= 0.85.
  launch_cpu_us_per_layer@B        CPU time (this thread) to issue one layer -- ``scatter_layer`` from a pinned
                                   layer (H2D copy + ``index_copy_``) and recording its event -- with B = 16,
                                   256, 4096 blocks of 16 tokens per layer. Target: flat within 20%.
  restore_loop_cpu_us_per_layer@B  the event-loop thread's CPU time over a whole ``restore_paged`` / layers, at a
                                   fixed 4096 tokens per layer cut into B = 16, 256, 4096 blocks (block_size
                                   256, 16, 1): what the restore costs the serving process per layer.
  decode_slowdown                  a decode-like loop (per step 32 matmuls [8, 4096] x [4096, 14336] fp16 on a
                                   high-priority stream, one sync per step, in its own thread) timed alone and
                                   while restores run back to back beside it: step time with / alone - 1.
                                   Target <= 0.05.

CPU (runs anywhere; the CUDA figures are skipped with a message):
  cpu_scatter_us_per_layer@B       ``scatter_layer`` of a 16 MiB layer (4096 tokens) cut into B = 16, 256, 4096
                                   blocks, CPU caches: the work per layer at a fixed byte count must not grow
                                   with the number of blocks. Also ``cpu_scatter_flat_ratio`` = max / min.

    python benchmarks/bench_gpu.py [--repeat 9]

Writes benchmarks/results/gpu.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # measure the checkout this file lives in
from _util import save

import kvpool
from kvpool.cuda.events import LayerEvents, restore_stream
from kvpool.cuda.paged_kv import PagedKV
from kvpool.pool.paged import restore_paged

L, H, D, DT, CT, BS = 32, 8, 128, torch.float16, 256, 16
BLOCK_COUNTS = (16, 256, 4096)


def layout(num_layers: int = L) -> kvpool.KVLayout:
    return kvpool.KVLayout(num_layers=num_layers, num_kv_heads=H, head_dim=D, dtype=DT, chunk_tokens=CT)


def tokens(n: int, seed: int = 0) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).integers(0, 128_000, n)


def paged(num_layers: int, pool_blocks: int, used: int, bs: int, device: str, seed: int = 0) -> PagedKV:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(pool_blocks, generator=g)[:used].to(device)
    caches = [torch.zeros(2, pool_blocks, bs, H, D, dtype=DT, device=device) for _ in range(num_layers)]
    return PagedKV(caches, ids, bs)


# --- CPU ------------------------------------------------------------------------------------------------
def cpu_scatter(repeat: int) -> dict[str, float]:
    res: dict[str, float] = {}
    T = 4096
    x = torch.randn(2, T, H, D).to(DT)
    for nb in BLOCK_COUNTS:
        bs = T // nb
        p = paged(1, nb + nb // 4, nb, bs, "cpu")
        p.scatter_layer(0, x)  # warm-up (first touch of the cache)
        ts = []
        for _ in range(repeat):
            c0 = time.process_time()
            p.scatter_layer(0, x)
            ts.append(time.process_time() - c0)
        res[f"cpu_scatter_us_per_layer@{nb}"] = 1e6 * statistics.median(ts)
    vals = [res[f"cpu_scatter_us_per_layer@{nb}"] for nb in BLOCK_COUNTS]
    res["cpu_scatter_flat_ratio"] = max(vals) / min(vals)
    res["cpu_layer_bytes"] = float(x.numel() * x.element_size())
    return res


# --- CUDA -----------------------------------------------------------------------------------------------
def _sync() -> None:
    torch.cuda.synchronize()


async def bandwidth(repeat: int) -> dict[str, float]:
    lay = layout()
    T = 4096
    t = tokens(T)
    kv = torch.randn(lay.kv_shape(T)).to(DT)
    nbytes = kv.numel() * kv.element_size()
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    pinned.copy_(kv.view(-1).view(torch.uint8))
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dest = paged(L, 2 * T // BS, T // BS, BS, "cuda", seed=1)
    ref: list[float] = []
    ours: list[float] = []
    async with await kvpool.KVPool.open(layout=lay, model_id="bench", backends=["dram://?capacity=1GiB"]) as pool:
        await pool.put(t, kv)
        for i in range(repeat + 1):  # first round: warm-up
            _sync()
            t0 = time.perf_counter()
            dev.copy_(pinned, non_blocking=True)
            _sync()
            r = time.perf_counter() - t0
            _sync()
            t0 = time.perf_counter()
            hit, ev = await restore_paged(pool, t, dest)
            await ev.synchronize_async()
            o = time.perf_counter() - t0
            assert hit == T
            if i:
                ref.append(r)
                ours.append(o)
        got = torch.stack([dest.gather_layer(layer, T) for layer in range(L)]).cpu()
        assert torch.equal(got, kv), "restored bytes differ"
    h2d = nbytes / statistics.median(ref) / 1e9
    rst = nbytes / statistics.median(ours) / 1e9
    return {"restore_bytes": float(nbytes), "h2d_pinned_GBps": h2d, "restore_GBps": rst,
            "restore_vs_h2d": rst / h2d}


def launch_cpu(repeat: int) -> dict[str, float]:
    res: dict[str, float] = {}
    s = restore_stream(torch.device("cuda", torch.cuda.current_device()))
    for nb in BLOCK_COUNTS:
        T = nb * BS
        p = paged(1, nb + 64, nb, BS, "cuda")
        x = torch.randn(2, T, H, D).to(DT).pin_memory()
        staging = torch.empty(x.numel(), dtype=DT, device="cuda")
        ev = LayerEvents(1, p.device)
        ts = []
        for i in range(repeat + 2):
            _sync()
            c0 = time.thread_time()
            p.scatter_layer(0, x, stream=s, staging=staging)
            ev.record(0, s)
            c = time.thread_time() - c0
            ev.synchronize()
            if i >= 2:
                ts.append(c)
        res[f"launch_cpu_us_per_layer@{nb}"] = 1e6 * statistics.median(ts)
    vals = [res[f"launch_cpu_us_per_layer@{nb}"] for nb in BLOCK_COUNTS]
    res["launch_cpu_flat_ratio"] = max(vals) / min(vals)
    return res


async def restore_loop_cpu(repeat: int) -> dict[str, float]:
    res: dict[str, float] = {}
    nl = 8
    lay = layout(nl)
    T = 4096
    t = tokens(T, 3)
    kv = torch.randn(lay.kv_shape(T)).to(DT)
    async with await kvpool.KVPool.open(layout=lay, model_id="bench", backends=["dram://?capacity=512MiB"]) as pool:
        await pool.put(t, kv)
        for nb in BLOCK_COUNTS:
            bs = T // nb
            dest = paged(nl, nb + nb // 4, nb, bs, "cuda", seed=nb)
            ts = []
            for i in range(repeat + 1):
                _sync()
                c0 = time.thread_time()
                hit, ev = await restore_paged(pool, t, dest)
                c = time.thread_time() - c0
                await ev.synchronize_async()
                assert hit == T
                if i:
                    ts.append(c / nl)
            res[f"restore_loop_cpu_us_per_layer@{nb}"] = 1e6 * statistics.median(ts)
    vals = [res[f"restore_loop_cpu_us_per_layer@{nb}"] for nb in BLOCK_COUNTS]
    res["restore_loop_cpu_flat_ratio"] = max(vals) / min(vals)
    return res


async def decode_slowdown(steps: int) -> dict[str, float]:
    device = torch.device("cuda", torch.cuda.current_device())
    compute = torch.cuda.Stream(device=device, priority=-1)
    ws = [torch.randn(4096, 14336, device=device, dtype=DT) for _ in range(4)]
    a = torch.randn(8, 4096, device=device, dtype=DT)

    def decode(n: int, out: list[float]) -> None:
        with torch.cuda.stream(compute):
            for _ in range(n):
                t0 = time.perf_counter()
                for layer in range(L):
                    y = a @ ws[layer % 4]
                    del y
                compute.synchronize()  # a decode step ends by sampling on the host
                out.append(time.perf_counter() - t0)

    warm: list[float] = []
    decode(20, warm)
    alone: list[float] = []
    decode(steps, alone)

    lay = layout()
    T = 4096
    t = tokens(T, 5)
    kv = torch.randn(lay.kv_shape(T)).to(DT)
    dest = paged(L, 2 * T // BS, T // BS, BS, "cuda", seed=7)
    beside: list[float] = []
    restores = 0
    async with await kvpool.KVPool.open(layout=lay, model_id="bench", backends=["dram://?capacity=1GiB"]) as pool:
        await pool.put(t, kv)
        th = threading.Thread(target=decode, args=(steps, beside))
        th.start()
        while th.is_alive():
            _, ev = await restore_paged(pool, t, dest)
            await ev.synchronize_async()
            restores += 1
        th.join()
    a_med, b_med = statistics.median(alone), statistics.median(beside)
    return {"decode_step_ms_alone": 1e3 * a_med, "decode_step_ms_beside_restore": 1e3 * b_med,
            "decode_slowdown": b_med / a_med - 1, "restores_during_decode": float(restores)}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--decode-steps", type=int, default=200)
    args = ap.parse_args()
    res: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    res.update(cpu_scatter(args.repeat))
    if torch.cuda.is_available():
        res["gpu"] = torch.cuda.get_device_name()
        res.update(await bandwidth(args.repeat))
        res.update(launch_cpu(args.repeat))
        res.update(await restore_loop_cpu(args.repeat))
        res.update(await decode_slowdown(args.decode_steps))
    for k, v in res.items():
        print(f"{k:34s} {v:12.3f}" if isinstance(v, float) else f"{k:34s} {v}")
    print("saved", save("gpu", res))
    if not torch.cuda.is_available():
        print("no CUDA device: the GPU figures (restore vs pinned H2D bandwidth, CPU per layer launch, decode "
              "slowdown) need one and were skipped; only the CPU-path figure above was measured.")


if __name__ == "__main__":
    asyncio.run(main())
