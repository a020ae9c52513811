"""DRAM tier against torch's own memory bandwidth (issue: core).

Figures (all medians, measured in one run against references in the same process):
  get_into / copy_   >= 0.7    (a cached 8-chunk prefix of an 8B-class layout into a preallocated tensor)
  get / clone        >= 0.7
  put / clone        >= 0.4
  lookup of 131,072 tokens (512 chunks), hashing included: < 2 ms
  small objects (4 layers, 16-token chunks): >= 20,000 chunk puts+gets per second on one core

    python benchmarks/bench_dram.py [--repeat 15]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import amedian_time, median_time, save  # noqa: E402

import kvpool  # noqa: E402


async def bulk(repeat: int) -> dict[str, float]:
    layout = kvpool.KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype=torch.float16, chunk_tokens=256)
    T = 8 * layout.chunk_tokens
    nbytes = 8 * layout.chunk_nbytes
    tokens = np.random.default_rng(0).integers(0, 128_000, T)
    kv = torch.randn(layout.kv_shape(T), dtype=torch.float16)
    out = torch.empty_like(kv)
    ref_dst = torch.empty_like(kv)
    res: dict[str, float] = {}
    async with await kvpool.KVPool.open(layout=layout, model_id="bench", backends=["dram://?capacity=1GiB"]) as pool:
        await pool.put(tokens, kv)
        assert await pool.lookup(tokens) == T
        rows = {"copy_": [], "clone": [], "get_into": [], "get": [], "put": []}
        # interleave the contenders so drift hits them alike
        for _ in range(repeat):
            rows["copy_"].append(median_time(lambda: ref_dst.copy_(kv), 1, 0))
            rows["clone"].append(median_time(lambda: kv.clone(), 1, 0))
            rows["get_into"].append(await amedian_time(lambda: pool.get_into(tokens, out), 1, 0))
            rows["get"].append(await amedian_time(lambda: pool.get(tokens), 1, 0))
            rows["put"].append(await amedian_time(lambda: pool.put(tokens, kv), 1, 0,
                                                  before=lambda: pool.delete(tokens)))
        assert torch.equal(out, kv)
        for k, v in rows.items():
            res[f"{k}_GBps"] = nbytes / statistics.median(v) / 1e9
    res["get_into_vs_copy"] = res["get_into_GBps"] / res["copy__GBps"]
    res["get_vs_clone"] = res["get_GBps"] / res["clone_GBps"]
    res["put_vs_clone"] = res["put_GBps"] / res["clone_GBps"]
    return res


async def lookup_bench(repeat: int) -> dict[str, float]:
    # The lookup cost does not depend on object size: a tiny layout with 256-token chunks lets 512 chunks fit.
    layout = kvpool.KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, dtype=torch.float16, chunk_tokens=256)
    T = 131_072
    tokens = np.random.default_rng(1).integers(0, 128_000, T)
    kv = torch.randn(layout.kv_shape(T), dtype=torch.float16)
    res = {}
    async with await kvpool.KVPool.open(layout=layout, model_id="bench", backends=["dram://?capacity=64MiB"]) as pool:
        await pool.put(tokens, kv)
        assert await pool.lookup(tokens) == T
        res["lookup_ms_ndarray"] = 1e3 * await amedian_time(lambda: pool.lookup(tokens), repeat * 10)
        as_tensor = torch.from_numpy(tokens)
        res["lookup_ms_tensor"] = 1e3 * await amedian_time(lambda: pool.lookup(as_tensor), repeat * 10)
        as_list = tokens.tolist()
        res["lookup_ms_list"] = 1e3 * await amedian_time(lambda: pool.lookup(as_list), repeat * 10)
    return res


async def small_objects(seconds: float = 2.0) -> dict[str, float]:
    layout = kvpool.KVLayout(num_layers=4, num_kv_heads=8, head_dim=128, dtype=torch.float16, chunk_tokens=16)
    n_prompts = 256
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 128_000, 16) for _ in range(n_prompts)]
    kvs = [torch.randn(layout.kv_shape(16), dtype=torch.float16) for _ in range(8)]
    out = torch.empty(layout.kv_shape(16), dtype=torch.float16)
    cap = 64 * layout.chunk_nbytes  # a full tier: puts evict, as in steady-state serving
    res = {"small_object_bytes": float(layout.chunk_nbytes)}
    async with await kvpool.KVPool.open(layout=layout, model_id="bench", backends=[f"dram://?capacity={cap}"]) as pool:
        tier = pool.tiers[0]
        keys = [pool.keys_for(p)[0] for p in prompts]
        # chunk-level operations straight on the tier, and through the pool façade (hashing included)
        for label, put, get in (
            ("tier", lambda i: tier.write(keys[i], kvs[i % 8]), lambda i: tier.read_into(keys[i], out)),
            ("pool", lambda i: pool.put(prompts[i], kvs[i % 8]), lambda i: pool.get_into(prompts[i], out)),
        ):
            ops = 0
            t0 = time.perf_counter()
            c0 = time.process_time()
            while time.perf_counter() - t0 < seconds:
                for i in range(n_prompts):
                    await put(i)
                    await get(i)
                ops += 2 * n_prompts
            res[f"small_{label}_ops_per_s"] = ops / (time.perf_counter() - t0)
            res[f"small_{label}_ops_per_cpu_s"] = ops / (time.process_time() - c0)
    return res


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    res = {"torch_threads": torch.get_num_threads()}
    res.update(await bulk(args.repeat))
    res.update(await lookup_bench(args.repeat))
    res.update(await small_objects())
    for k, v in res.items():
        print(f"{k:28s} {v:10.3f}")
    print("saved", save("dram", res))


if __name__ == "__main__":
    asyncio.run(main())
