"""vLLM + KVPoolConnector on this CPU: TTFT of a long shared prefix restored from the SSD tier vs recomputed.

    python benchmarks/bench_vllm.py [--prefix 4096] [--suffix 256] [--pool /var/tmp/kvpool-bench.pool]

Runs with any python that has kvpool; the engines run in the vLLM venv (``.ci/install_vllm.sh``;
``KVPOOL_VLLM_VENV``), each in its own process (vLLM adds its EngineCore and worker processes). Model: a random
Llama, 8 layers, hidden 1024, 8 KV heads x 128, fp32, block_size 32, chunk_tokens 256.

1. engine A, connector on ``uring://POOL`` (vLLM's own prefix cache off): warm-up, then prefix + suffix A
   (recompute: nothing cached; the prompt's chunks are stored in the background), then the page cache is
   dropped and prefix + suffix B is served (restore through the connector, layer by layer). TTFT =
   ``generate(max_tokens=1)``. The connector's counters give the restore's wall time and the time the forward
   stalled in ``wait_for_layer_load``.
2. engine B, no connector, vLLM's prefix cache on: prefix + suffix A, then prefix + suffix C: the second is
   pure compute of the suffix over a cached prefix (the floor a restore can reach).
3. ``KVPool.get_into`` of the same prefix from the same pool file (page cache dropped): the restore
   bandwidth the connector is compared with.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _util import drop_caches  # noqa: E402

VENV = Path(os.environ.get("KVPOOL_VLLM_VENV", ROOT / ".venv-vllm"))
DRIVER = ROOT / "tests" / "integrations" / "vllm_drivers" / "engine.py"
RESULTS = ROOT / "benchmarks" / "results"
MODEL = dict(vocab_size=1024, hidden_size=1024, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=8, head_dim=128, max_position_embeddings=40000)


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(DRIVER.parent)])
    e.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    e.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return e




def run_engine(name: str, workdir: Path, spec: dict[str, Any]) -> dict[str, Any]:
    p, out, logf = workdir / f"{name}.json", workdir / f"{name}.out.json", workdir / f"{name}.log"
    p.write_text(json.dumps(spec))
    with open(logf, "wb") as lf:
        rc = subprocess.run([str(VENV / "bin" / "python"), str(DRIVER), str(p), str(out)], cwd=ROOT, env=env(),
                            stdout=lf, stderr=subprocess.STDOUT).returncode
    if rc or not out.exists():
        sys.exit(f"engine {name} failed (rc={rc}); see {logf}:\n{logf.read_text(errors='replace')[-4000:]}")
    return json.loads(out.read_text())["phases"]


async def get_into_bandwidth(pool_path: str, stats: dict[str, Any], tokens: list[int], repeat: int) -> dict[str, Any]:
    import torch

    import kvpool

    lay = stats["layout"]
    layout = kvpool.KVLayout(num_layers=lay["num_layers"], num_kv_heads=lay["num_kv_heads"],
                             head_dim=lay["head_dim"], dtype=getattr(torch, lay["dtype"].split(".")[-1]),
                             chunk_tokens=lay["chunk_tokens"])
    out = torch.empty(layout.kv_shape(len(tokens) // layout.chunk_tokens * layout.chunk_tokens), dtype=layout.dtype)
    out.zero_()
    times = []
    n = 0
    async with await kvpool.KVPool.open(layout=layout, model_id=stats["model_id"],
                                        backends=[f"uring://{pool_path}"]) as pool:
        for _ in range(repeat):
            drop_caches()
            t0 = time.perf_counter()
            n = await pool.get_into(tokens, out)
            times.append(time.perf_counter() - t0)
    nbytes = n // layout.chunk_tokens * layout.chunk_nbytes
    best = min(times)
    return {"tokens": n, "bytes": nbytes, "seconds": times, "GBps": nbytes / best / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefix", type=int, default=4096)
    ap.add_argument("--suffix", type=int, default=256)
    ap.add_argument("--chunk-tokens", type=int, default=256)
    ap.add_argument("--prefetch-layers", type=int, default=8)
    ap.add_argument("--pool", default="/var/tmp/kvpool-vllm-bench.pool")
    ap.add_argument("--out", default=str(RESULTS / "vllm.json"))
    a = ap.parse_args()
    if not (VENV / "bin" / "python").exists():
        sys.exit(f"no vLLM venv at {VENV}: run .ci/install_vllm.sh")
    work = Path(tempfile.mkdtemp(prefix="kvpool-bench-vllm-"))
    model = str(work / "model")
    subprocess.run([str(VENV / "bin" / "python"), "-c",
                    f"import engine; engine.make_model({model!r}, **{MODEL!r})"], check=True, env=env(), cwd=ROOT)
    r = random.Random(5)
    prefix = [r.randrange(1, 1000) for _ in range(a.prefix)]
    sfx = [[r.randrange(1, 1000) for _ in range(a.suffix)] for _ in range(3)]
    warm = [[r.randrange(1, 1000) for _ in range(300)]]
    if os.path.exists(a.pool):
        os.unlink(a.pool)
    kv_gib = 2 * MODEL["num_hidden_layers"] * MODEL["num_key_value_heads"] * MODEL["head_dim"] * 4 * (
        a.prefix + a.suffix) / 2**30
    cap = f"{max(1, int(kv_gib * 1.5) + 1)}GiB"
    llm = {"max_model_len": a.prefix + a.suffix + 64, "max_num_batched_tokens": 2048}
    conn = {"backends": [f"uring://{a.pool}?capacity={cap}"], "chunk_tokens": a.chunk_tokens,
            "prefetch_layers": a.prefetch_layers, "socket_dir": str(work / "s")}
    A = run_engine("A", work, {"model": model, "engine_id": "bench-a", "connector": conn,
                               "llm": {**llm, "enable_prefix_caching": False}, "phases": [
        {"name": "warm", "prompts": warm, "max_tokens": 1, "settle": True},
        {"name": "recompute", "prompts": [prefix + sfx[0]], "max_tokens": 1, "settle": True},
        {"name": "restore", "prompts": [prefix + sfx[1]], "max_tokens": 1, "settle": True, "drop_caches": True},
        {"name": "restore2", "prompts": [prefix + sfx[2]], "max_tokens": 1, "settle": True, "drop_caches": True},
    ]})
    B = run_engine("B", work, {"model": model, "engine_id": "bench-b", "connector": None, "llm": llm, "phases": [
        {"name": "warm", "prompts": warm, "max_tokens": 1},
        {"name": "recompute", "prompts": [prefix + sfx[0]], "max_tokens": 1},
        {"name": "suffix_only", "prompts": [prefix + sfx[2]], "max_tokens": 1},
        {"name": "suffix_only2", "prompts": [prefix + sfx[1]], "max_tokens": 1},
    ]})
    def delta(ph: str, prev: str) -> dict[str, float]:
        before, after = A[prev]["pool"]["connector"]["counters"], A[ph]["pool"]["connector"]["counters"]
        return {k: after.get(k, 0) - before.get(k, 0) for k in after}

    d, d2 = delta("restore", "recompute"), delta("restore2", "restore")
    restored = A["restore"]["requests"][0]["num_cached_tokens"]
    lay = A["restore"]["pool"]["layout"]
    restored_bytes = restored // lay["chunk_tokens"] * lay["chunk_bytes"]
    gi = asyncio.run(get_into_bandwidth(a.pool, A["restore"]["pool"], prefix, repeat=3))
    conn_bw = restored_bytes / d["load_seconds"] / 1e9 if d.get("load_seconds") else None
    conn_bw2 = restored_bytes / d2["load_seconds"] / 1e9 if d2.get("load_seconds") else None
    res = {
        "machine": "2 cores (AMD EPYC, avx512), 24 GiB, virtio disk; torch 2.13.0+cpu, vllm-cpu 0.32.0",
        "model": MODEL, "dtype": "float32", "block_size": 32, "chunk_tokens": a.chunk_tokens,
        "prefix_tokens": a.prefix, "suffix_tokens": a.suffix, "prefetch_layers": a.prefetch_layers,
        "ttft_recompute_s": A["recompute"]["seconds"],
        "ttft_restore_s": A["restore"]["seconds"],
        "speedup": A["recompute"]["seconds"] / A["restore"]["seconds"],
        "restored_tokens": restored,
        "restored_bytes": restored_bytes,
        "restore_load_s": d.get("load_seconds"),
        "restore_stall_s": d.get("load_stall_seconds"),
        "ttft_restore2_s": A["restore2"]["seconds"],
        "restore2_load_s": d2.get("load_seconds"),
        "restore2_stall_s": d2.get("load_stall_seconds"),
        "connector_restore2_GBps": conn_bw2,
        "ttft_suffix_only_s": B["suffix_only"]["seconds"],
        "ttft_suffix_only2_s": B["suffix_only2"]["seconds"],
        "ttft_recompute_no_connector_s": B["recompute"]["seconds"],
        "stall_over_suffix_compute_s": A["restore"]["seconds"] - B["suffix_only"]["seconds"],
        "connector_restore_GBps": conn_bw,
        "get_into": gi,
        "connector_vs_get_into": (conn_bw / gi["GBps"]) if conn_bw else None,
        "connector2_vs_get_into": (conn_bw2 / gi["GBps"]) if conn_bw2 else None,
        "load_avg_1min_at_end": os.getloadavg()[0],
        # prefix + suffix B: restored through the connector (A) vs served by vLLM alone (B): same token, logprob
        "restore_matches_vllm_alone": [A["restore"]["requests"][0][k] == B["suffix_only2"]["requests"][0][k]
                                       for k in ("tokens", "logprobs")],
        "page_cache_dropped": drop_caches(),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
