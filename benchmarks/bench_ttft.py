"""Time to first token with a shared prefix: full prefill vs restoring the prefix's KV from kvpool.

    python benchmarks/bench_ttft.py              # 4K, 16K, 32K prefixes (~3.5 min on 2 idle cores)
    python benchmarks/bench_ttft.py --contexts 4096,16384 --repeat 3 --plot /tmp/ttft.png

Model: a Llama with random weights built from a config (no download) -- 8 layers, hidden 1024, 8 heads,
8 KV heads, head_dim 128, MLP 2816, vocab 32000, bf16, SDPA attention (~130M parameters; KV = 32 KiB/token).
Pool layout from ``layout_for(model)``, 256-token chunks. For each prefix length P, a prompt of P shared tokens
plus a 256-token suffix; the logits of the last token only (``logits_to_keep=1``):

  full prefill     the model on all P + 256 tokens (once: at 32K it takes minutes on 2 cores)
  DRAM restore     ``prefill_with_pool`` on a pool with only a ``dram://`` tier holding the prefix
  SSD restore      ... only a ``uring://`` tier (a file in /tmp, O_DIRECT); page cache dropped before each run
  + layerwise      ``prefill_with_pool(..., layerwise=True)``: the forward starts at layer 0 while later layers
                   are still read; stall = time the decoder-layer pre-hooks waited for their KV
  I/O only         ``pool.stream`` of the prefix, consumed without work (all layers in flight)
  compute only     the forward on the suffix with the prefix's KV already in memory (from the restore runs)

TTFT is call -> logits (``store=False``: writing the suffix back happens after the first token). Restore
figures are medians of ``--repeat`` runs after one warm-up. Targets: SSD restore >= 5x faster than full
prefill at 16K+; layer-wise TTFT <= 1.1 x max(I/O only, compute only).

Writes benchmarks/results/ttft.json and docs/ttft.png. Needs root for drop_caches (else a warning).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))
from _util import save  # noqa: E402

import kvpool  # noqa: E402
from kvpool.integrations.transformers import PrefillStats, cache_to_kv, layout_for, prefill_with_pool  # noqa: E402

SUFFIX = 256
KV_BYTES_PER_TOKEN = 8 * 2 * 8 * 128 * 2


def build_model() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=65536,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


_warned = False


def drop_caches() -> None:
    global _warned
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as exc:
        if not _warned:
            print(f"warning: cannot drop page caches ({exc}); SSD figures may be cache-assisted", file=sys.stderr)
            _warned = True


def full_prefill(model: Any, ids: torch.Tensor) -> tuple[float, Any]:
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(input_ids=ids.unsqueeze(0), use_cache=True, logits_to_keep=1)
        return time.perf_counter() - t0, out.past_key_values


async def restore_run(model: Any, pool: kvpool.KVPool, ids: torch.Tensor, layerwise: bool, ssd: bool,
                      expect_hit: int) -> PrefillStats:
    if ssd:
        drop_caches()
    st = PrefillStats()
    _, cache, hit = await prefill_with_pool(model, pool, ids, store=False, layerwise=layerwise,
                                           logits_to_keep=1, stats=st)
    assert hit == expect_hit, (hit, expect_hit, st)
    assert not st.fallback, st.fallback
    del cache
    return st


async def stream_only(pool: kvpool.KVPool, tokens: list[int], ssd: bool) -> float:
    if ssd:
        drop_caches()
    t0 = time.perf_counter()
    n = 0
    async for _layer, x in pool.stream(tokens, prefetch_layers=pool.layout.num_layers):
        n += x.shape[1]
    assert n
    return time.perf_counter() - t0


def med(xs: list[float]) -> float:
    return statistics.median(xs)


async def bench_context(model: Any, P: int, repeat: int, root: Path, layout: kvpool.KVLayout) -> dict[str, Any]:
    g = torch.Generator().manual_seed(P)
    ids = torch.randint(0, 32000, (P + SUFFIX,), generator=g)
    prefix = ids[:P].tolist()
    print(f"--- prefix {P} + suffix {SUFFIX} tokens (prefix KV {P * KV_BYTES_PER_TOKEN / 2**30:.2f} GiB)", flush=True)

    load_before = os.getloadavg()[0]
    t_full, cache = full_prefill(model, ids)
    print(f"full prefill {t_full:8.2f} s", flush=True)
    kv = cache_to_kv(cache, end=P, dtype=layout.dtype)
    del cache
    gc.collect()

    cap = f"{(P * KV_BYTES_PER_TOKEN * 5 // 4) // 2**20 + 64}MiB"
    res: dict[str, Any] = {"prefix_tokens": P, "suffix_tokens": SUFFIX, "full_prefill_s": t_full,
                           "prefix_kv_bytes": P * KV_BYTES_PER_TOKEN, "loadavg_1m_before": load_before}
    for tier, spec in (("dram", f"dram://?capacity={cap}"), ("ssd", f"uring://{root}/pool-{P}.kv?capacity={cap}")):
        ssd = tier == "ssd"
        pool = await kvpool.KVPool.open(layout=layout, model_id="bench-ttft-llama", backends=[spec])
        async with pool:
            await pool.put(prefix, kv)
            await pool.flush()
            assert await pool.lookup(ids.tolist()) == P
            out: dict[str, Any] = {}
            for _ in range(1):  # warm-up
                await restore_run(model, pool, ids, False, ssd, P)
            io = [await stream_only(pool, prefix, ssd) for _ in range(repeat)]
            runs: dict[str, list[PrefillStats]] = {"restore": [], "layerwise": []}
            for _ in range(repeat):  # interleaved
                runs["restore"].append(await restore_run(model, pool, ids, False, ssd, P))
                runs["layerwise"].append(await restore_run(model, pool, ids, True, ssd, P))
            r, lw = runs["restore"], runs["layerwise"]
            io_s = med(io)
            compute_s = med([s.compute_s for s in r])
            bound = max(io_s, compute_s)
            out = {
                "io_only_s": io_s,
                "io_GBps": P * KV_BYTES_PER_TOKEN / io_s / 1e9,
                "compute_only_s": compute_s,
                "restore_ttft_s": med([s.ttft_s for s in r]),
                "restore_read_s": med([s.restore_s for s in r]),
                "layerwise_ttft_s": med([s.ttft_s for s in lw]),
                "layerwise_stall_s": med([s.stall_s for s in lw]),
                "layerwise_stalled_layers": med([float(s.stalled_layers) for s in lw]),
                "layerwise_forward_s": med([s.compute_s for s in lw]),
                "layerwise_vs_bound": med([s.ttft_s for s in lw]) / bound,
                "speedup_restore": t_full / med([s.ttft_s for s in r]),
                "speedup_layerwise": t_full / med([s.ttft_s for s in lw]),
                "all_ttft_restore_s": [s.ttft_s for s in r],
                "all_ttft_layerwise_s": [s.ttft_s for s in lw],
            }
            res[tier] = out
            print(
                f"{tier:4s}: restore TTFT {out['restore_ttft_s']:6.3f} s ({out['speedup_restore']:5.1f}x) | "
                f"layerwise {out['layerwise_ttft_s']:6.3f} s ({out['speedup_layerwise']:5.1f}x), "
                f"stall {out['layerwise_stall_s']:.3f} s | I/O only {io_s:.3f} s ({out['io_GBps']:.2f} GB/s), "
                f"compute only {compute_s:.3f} s -> layerwise/max = {out['layerwise_vs_bound']:.2f}",
                flush=True,
            )
            await pool.delete(prefix)
        if ssd:
            (root / f"pool-{P}.kv").unlink(missing_ok=True)
    del kv
    gc.collect()
    res["loadavg_1m_after"] = os.getloadavg()[0]
    return res


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["prefix_tokens"] for r in results]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = [
        ("full prefill", [r["full_prefill_s"] for r in results], "o-", "tab:red"),
        ("restore from DRAM", [r["dram"]["restore_ttft_s"] for r in results], "s-", "tab:blue"),
        ("restore from SSD", [r["ssd"]["restore_ttft_s"] for r in results], "^-", "tab:green"),
        ("SSD, layer-wise", [r["ssd"]["layerwise_ttft_s"] for r in results], "v--", "tab:olive"),
        ("SSD I/O only", [r["ssd"]["io_only_s"] for r in results], ":", "tab:gray"),
        ("suffix compute only", [r["ssd"]["compute_only_s"] for r in results], "-.", "tab:purple"),
    ]
    for label, ys, style, color in series:
        ax.plot(xs, ys, style, label=label, color=color)
    for r in results:
        ax.annotate(f"{r['ssd']['speedup_restore']:.0f}x", (r["prefix_tokens"], r["ssd"]["restore_ttft_s"]),
                    textcoords="offset points", xytext=(4, -12), fontsize=8, color="tab:green")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(xs, [f"{x // 1024}K" for x in xs])
    ax.set_xlabel(f"shared prefix (tokens), + {SUFFIX}-token suffix")
    ax.set_ylabel("time to first token (s)")
    ax.set_title("TTFT: prefill vs kvpool restore (8-layer 1024-d Llama, bf16, 2 CPU cores)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="4096,16384,32768", help="prefix lengths, comma-separated")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="directory for the SSD pool file (default: a temp dir in /tmp)")
    ap.add_argument("--plot", default=str(REPO / "docs" / "ttft.png"))
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]

    if os.getloadavg()[0] > 1.0:
        print(f"warning: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs: other work will skew "
              "the timings (recorded per context in the JSON)", file=sys.stderr)
    t_start = time.perf_counter()
    model = build_model()
    layout = layout_for(model, chunk_tokens=256)
    # Warm the kernels once (first-call allocations, oneDNN setup).
    full_prefill(model, torch.randint(0, 32000, (512,)))
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="kvpool-ttft-", dir="/tmp"))
    results = []
    try:
        for P in contexts:
            results.append(await bench_context(model, P, args.repeat, root, layout))
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    elapsed = time.perf_counter() - t_start

    print(f"\n{'prefix':>7} | {'prefill':>8} | {'DRAM':>7} {'x':>5} | {'SSD':>7} {'x':>5} | {'SSD lw':>7} "
          f"{'stall':>6} {'I/O':>6} {'comp':>6} {'lw/max':>6}")
    for r in results:
        d, s = r["dram"], r["ssd"]
        print(f"{r['prefix_tokens']:>7} | {r['full_prefill_s']:8.2f} | {d['restore_ttft_s']:7.3f} "
              f"{d['speedup_restore']:5.1f} | {s['restore_ttft_s']:7.3f} {s['speedup_restore']:5.1f} | "
              f"{s['layerwise_ttft_s']:7.3f} {s['layerwise_stall_s']:6.3f} {s['io_only_s']:6.3f} "
              f"{s['compute_only_s']:6.3f} {s['layerwise_vs_bound']:6.2f}")
    print(f"total {elapsed:.0f} s")

    import transformers

    data = {
        "command": "python " + " ".join([os.path.relpath(__file__, REPO), *sys.argv[1:]]),
        "model": {"layers": 8, "hidden": 1024, "heads": 8, "kv_heads": 8, "head_dim": 128, "mlp": 2816,
                  "vocab": 32000, "dtype": "bfloat16", "attn": "sdpa", "weights": "random (seed 0)"},
        "chunk_tokens": 256,
        "suffix_tokens": SUFFIX,
        "repeat": args.repeat,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "elapsed_s": elapsed,
        "results": results,
    }
    p = save("ttft", data)
    print(f"wrote {p}")
    if args.plot:
        plot(results, Path(args.plot))
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    asyncio.run(main())
