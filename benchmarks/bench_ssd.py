"""SSD tier (``uring://``) restore bandwidth and CPU against what the device itself can do (issue: SSD restore).

Reference, measured by fio in the same run on the same bytes (the pool file's -- or device's -- data region,
read-only): randread, ioengine=io_uring, direct=1, bs 1M/4M x iodepth 8/32, with huge-page buffers
(``--iomem=mmaphuge``, after reserving huge pages; the old reservation is restored) and with ordinary memory
(``--iomem=malloc``). "fio best" is the best bandwidth of all of them; fio's CPU (usr+sys seconds per GB) is
taken from the best ordinary-buffer run.

kvpool, 8B-class layout (32 layers, 8 KV heads, head_dim 128, fp16, 256-token chunks: 32 MiB objects), a pool
with only the uring tier, filled with 6 distinct prompts x 8 chunks (1.5 GiB). Page cache dropped before every
timed read. Each figure is the median of ``--repeat`` interleaved runs (one untimed warm-up each):

  get                 all prompts restored concurrently (asyncio.gather) into new tensors
  get_into aligned    ... into preallocated, 4096-aligned tensors (direct reads into the caller's memory)
  get_into caller     ... into plain ``torch.empty`` tensors (the caller's memory as it comes)
  get_into THP        diagnostic: 2 MiB-aligned destinations advised MADV_HUGEPAGE (what huge pages buy)
  stream              ``pool.stream`` of all prompts concurrently, each layer consumed without work
  tiny objects        the same kind of bytes stored as one 16 KiB object per (16-token page, layer, K|V),
                      written and read straight on the backend, read_many batches of one prompt's pages

Targets (issue): get, get_into >= 0.9 x fio best; stream >= 0.85 x fio best; kvpool CPU-s/GB <= 2 x fio's
with ordinary buffers. LMCache 0.5.6 figures in the plot are the issue's published numbers for this machine
kind, not measured here.

    python benchmarks/bench_ssd.py [--path FILE] [--repeat 5]           # pool file (default: temp file in /tmp)
    python benchmarks/bench_ssd.py --device /dev/loopN                   # raw block device (its data is lost)
    python benchmarks/bench_ssd.py --opts 'bounce=1GiB' --plot /tmp/x.png  # tier options (query string)

Needs root for drop_caches and huge pages (skipped with a warning otherwise) and fio on PATH.
Writes benchmarks/results/ssd.json (ssd_blockdev.json with --device) and docs/ssd_bandwidth.png (file mode).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mmap
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))  # measure the checkout this file lives in, whatever is pip-installed
from _util import save

import kvpool
from kvpool.storage.backend import ReadRequest

GB = 1e9
MiB = 1 << 20
PAGE = 4096
HUGE = 2 * MiB

# Published by the issue for this machine kind (LMCache 0.5.6); plotted as such, never scaled.
LMCACHE_REPORTED = {
    "LMCache 0.5.6 local-disk (default)": 0.64,
    "LMCache 0.5.6 local-disk use_odirect": 1.65,
}
LMCACHE_REPORTED_FIO_ORDINARY = 1.00

TARGETS = {"get": 0.9, "get_into_aligned": 0.9, "get_into_caller": 0.9, "stream": 0.85}
CPU_TARGET = 2.0


# --- system helpers ----------------------------------------------------------------------------------------
def log(*a: Any) -> None:
    print(*a, flush=True)


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def rusage() -> tuple[float, float, int]:
    """(user s, system s, minor faults) of the whole process: torch's, asyncio's and io_uring's threads too."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def meminfo(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def set_hugepages(n: int) -> int:
    with open("/proc/sys/vm/nr_hugepages", "w") as f:
        f.write(str(n))
    with open("/proc/sys/vm/nr_hugepages") as f:
        return int(f.read())


def get_hugepages() -> int:
    with open("/proc/sys/vm/nr_hugepages") as f:
        return int(f.read())


def aligned_empty(shape: tuple[int, ...], dtype: torch.dtype, align: int = PAGE) -> torch.Tensor:
    """torch memory, over-allocated and sliced so that data_ptr() is a multiple of ``align``."""
    n = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    raw = torch.empty(n + align, dtype=torch.uint8)
    sh = (-raw.data_ptr()) % align
    return raw[sh : sh + n].view(dtype).view(shape)


def thp_empty(shape: tuple[int, ...], dtype: torch.dtype, keep: list[Any]) -> torch.Tensor:
    """2 MiB-aligned anonymous memory advised MADV_HUGEPAGE (transparent huge pages)."""
    n = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    buf = mmap.mmap(-1, n + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):
        pass
    keep.append(buf)
    raw = torch.frombuffer(buf, dtype=torch.uint8)
    sh = (-raw.data_ptr()) % HUGE
    return raw[sh : sh + n].view(dtype).view(shape)


# --- fio ---------------------------------------------------------------------------------------------------
def run_fio(target: str, offset: int, size: int, bs: str, iodepth: int, iomem: str, runtime: float) -> dict[str, Any]:
    cmd = [
        "fio", "--name=ref", f"--filename={target}", "--readonly", f"--offset={offset}", f"--size={size}",
        "--rw=randread", "--ioengine=io_uring", "--direct=1", f"--bs={bs}", f"--iodepth={iodepth}",
        f"--iomem={iomem}", "--time_based", f"--runtime={runtime}", "--norandommap",
        "--output-format=json",
    ]
    drop_caches()
    p = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if p.returncode != 0:
        return {"bs": bs, "iodepth": iodepth, "iomem": iomem, "error": (p.stderr or p.stdout).strip()[-300:]}
    j = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
    rt = j["job_runtime"] / 1e3  # s
    io = j["read"]["io_bytes"]
    cpu = (j["usr_cpu"] + j["sys_cpu"]) / 100 * rt
    return {
        "bs": bs, "iodepth": iodepth, "iomem": iomem, "GBps": j["read"]["bw_bytes"] / GB,
        "usr_cpu_pct": j["usr_cpu"], "sys_cpu_pct": j["sys_cpu"], "runtime_s": rt, "io_bytes": io,
        "cpu_s_per_GB": cpu / (io / GB) if io else None, "cmd": " ".join(cmd),
    }


def fio_reference(target: str, offset: int, size: int, runtime: float) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    old = get_hugepages()
    need_pages = (4 * MiB * 32) // HUGE + 16  # the largest bs x iodepth, plus slack
    huge_ok = False
    try:
        try:
            got = set_hugepages(old + need_pages)
            huge_ok = got >= old + need_pages or meminfo("HugePages_Free") * 1024 >= 4 * MiB * 32
            if not huge_ok:
                log(f"warning: asked for {old + need_pages} huge pages, got {got}; skipping --iomem=mmaphuge")
        except OSError as exc:
            log(f"warning: cannot reserve huge pages ({exc}); skipping --iomem=mmaphuge")
        for iomem in (["mmaphuge"] if huge_ok else []) + ["malloc"]:
            for bs in ("1M", "4M"):
                for qd in (8, 32):
                    r = run_fio(target, offset, size, bs, qd, iomem, runtime)
                    runs.append(r)
                    log(f"  fio {iomem:8s} bs={bs} qd={qd:2d}: "
                        + (f"{r['GBps']:.2f} GB/s, {r['cpu_s_per_GB']:.3f} CPU-s/GB" if "GBps" in r else r["error"]))
    finally:
        try:
            set_hugepages(old)
        except OSError:
            pass
    ok = [r for r in runs if "GBps" in r]
    huge = [r for r in ok if r["iomem"] == "mmaphuge"]
    plain = [r for r in ok if r["iomem"] == "malloc"]
    if not ok:
        raise SystemExit("fio failed: " + "; ".join(r.get("error", "") for r in runs))
    best_plain = max(plain, key=lambda r: r["GBps"]) if plain else None
    best_huge = max(huge, key=lambda r: r["GBps"]) if huge else None
    return {
        "fio_runs": runs,
        "fio_best_GBps": max(r["GBps"] for r in ok),
        "fio_hugepages_best_GBps": best_huge["GBps"] if best_huge else None,
        "fio_hugepages_best_config": f"bs={best_huge['bs']} iodepth={best_huge['iodepth']}" if best_huge else None,
        "fio_hugepages_cpu_s_per_GB": best_huge["cpu_s_per_GB"] if best_huge else None,
        "fio_ordinary_best_GBps": best_plain["GBps"] if best_plain else None,
        "fio_ordinary_best_config": f"bs={best_plain['bs']} iodepth={best_plain['iodepth']}" if best_plain else None,
        "fio_ordinary_cpu_s_per_GB": best_plain["cpu_s_per_GB"] if best_plain else None,
        "hugepages_reserved_for_fio": need_pages if huge_ok else 0,
        "hugepages_restored_to": get_hugepages(),
    }


# --- kvpool ------------------------------------------------------------------------------------------------
class Case:
    def __init__(self, name: str, nbytes: int, fn: Callable[[], Awaitable[Any]]) -> None:
        self.name, self.nbytes, self.fn = name, nbytes, fn
        self.times: list[float] = []
        self.cpus: list[float] = []
        self.usr: list[float] = []
        self.sys: list[float] = []
        self.faults: list[int] = []
        self.direct: list[int] = []
        self.bounce: list[int] = []


async def timed(case: Case, tier: Any, record: bool) -> None:
    drop_caches()
    s0 = tier.stats()
    u0, k0, f0 = rusage()
    t0 = time.perf_counter()
    await case.fn()
    dt = time.perf_counter() - t0
    u1, k1, f1 = rusage()
    s1 = tier.stats()
    if record:
        case.times.append(dt)
        case.cpus.append(u1 - u0 + k1 - k0)
        case.usr.append(u1 - u0)
        case.sys.append(k1 - k0)
        case.faults.append(f1 - f0)
        case.direct.append(s1["direct_reads"] - s0["direct_reads"])
        case.bounce.append(s1["bounce_reads"] - s0["bounce_reads"])


async def kvpool_part(spec: str, args: argparse.Namespace, target_desc: str) -> dict[str, Any]:
    layout = kvpool.KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype=torch.float16, chunk_tokens=256)
    T = args.chunks * layout.chunk_tokens
    prompt_bytes = args.chunks * layout.chunk_nbytes
    total = args.prompts * prompt_bytes
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 128_000, T) for _ in range(args.prompts)]
    res: dict[str, Any] = {"target": target_desc, "spec": spec, "prompts": args.prompts, "chunks_per_prompt": args.chunks,
                           "chunk_bytes": layout.chunk_nbytes, "restored_bytes": total}

    async with await kvpool.KVPool.open(layout=layout, model_id="bench-ssd", backends=[spec]) as pool:
        tier = pool.tiers[0]
        # --- fill (untimed): aligned sources so the writes go straight from our memory --------------------
        t0 = time.perf_counter()
        kv = aligned_empty(layout.kv_shape(T), torch.float16)
        kv.copy_(torch.randn(layout.kv_shape(T), dtype=torch.float16))

        def mark(i: int) -> None:  # make every prompt's bytes distinct (and recognisable)
            kv[:, :, :, 0, 0] = float(i)

        for i, p in enumerate(prompts):
            mark(i)
            await pool.put(p, kv)
        # the tiny-object baseline: 16 KiB objects, one per (16-token page, layer, K|V)
        tiny_obj = args.tiny_kib * 1024
        tiny_n = (args.tiny_mib * MiB) // tiny_obj
        per_prompt = (T // 16) * layout.num_layers * 2  # one prompt's pages
        tiny_src = aligned_empty((tiny_n * tiny_obj,), torch.uint8)
        tiny_src.copy_(torch.randint(0, 256, (tiny_n * tiny_obj,), dtype=torch.uint8))
        tiny_keys = [os.urandom(16) for _ in range(tiny_n)]
        for b in range(0, tiny_n, 1024):
            await tier.write_many([(tiny_keys[j], tiny_src[j * tiny_obj : (j + 1) * tiny_obj])
                                   for j in range(b, min(tiny_n, b + 1024))])
        await pool.flush()
        res["fill_s"] = time.perf_counter() - t0
        for p in prompts:
            assert await pool.lookup(p) == T, "a prompt is not fully stored"

        # --- the data region fio reads: the extents holding the prompts' objects --------------------------
        entries = [tier._index[k] for p in prompts for k in pool.keys_for(p)]
        lo = min(e.offset for e in entries)
        hi = max(e.offset + e.extent for e in entries)
        d_off = tier._geo.d_off
        res["data_region"] = {"offset": d_off + lo, "size": hi - lo}
        res["mem_align"] = tier.stats()["mem_align"]
        res["block_device"] = tier.stats()["block_device"]

        # --- fio on the same bytes, while the pool is idle ---------------------------------------------------
        if not args.no_fio:
            log(f"fio on {tier.path} offset={d_off + lo} size={hi - lo}")
            res.update(fio_reference(tier.path, d_off + lo, hi - lo, args.fio_runtime))

        # --- destinations ------------------------------------------------------------------------------------
        keep: list[Any] = []
        outs_aligned = [aligned_empty(layout.kv_shape(T), torch.float16) for _ in prompts]
        outs_caller = [torch.empty(layout.kv_shape(T), dtype=torch.float16) for _ in prompts]
        outs_thp = [thp_empty(layout.kv_shape(T), torch.float16, keep) for _ in prompts]
        for o in outs_aligned + outs_caller + outs_thp:
            o.zero_()  # fault them in: preallocated means resident
        res["caller_tensor_ptr_mod_4096"] = sorted({o.data_ptr() % PAGE for o in outs_caller})
        tiny_dst = aligned_empty((tiny_n * tiny_obj,), torch.uint8)
        tiny_dst.zero_()
        tiny_batches = [range(b, min(tiny_n, b + per_prompt)) for b in range(0, tiny_n, per_prompt)]

        async def consume(p: np.ndarray) -> int:
            n = 0
            async for _layer, x in pool.stream(p):
                n += x.numel()
                if args.stream_touch:
                    x.sum()
            return n

        async def tiny_read() -> None:
            res_ = await asyncio.gather(*(tier.read_many(
                [ReadRequest(tiny_keys[j], tiny_dst[j * tiny_obj : (j + 1) * tiny_obj]) for j in b])
                for b in tiny_batches))
            assert all(all(r) for r in res_)

        cases = [
            Case("get", total, lambda: asyncio.gather(*(pool.get(p) for p in prompts))),
            Case("get_into_aligned", total,
                 lambda: asyncio.gather(*(pool.get_into(p, o) for p, o in zip(prompts, outs_aligned)))),
            Case("get_into_caller", total,
                 lambda: asyncio.gather(*(pool.get_into(p, o) for p, o in zip(prompts, outs_caller)))),
            Case("get_into_thp", total,
                 lambda: asyncio.gather(*(pool.get_into(p, o) for p, o in zip(prompts, outs_thp)))),
            Case("stream", total, lambda: asyncio.gather(*(consume(p) for p in prompts))),
            Case("tiny_objects", tiny_n * tiny_obj, tiny_read),
        ]
        res["tiny_object_bytes"] = tiny_obj
        res["tiny_objects"] = tiny_n
        res["tiny_batch_objects"] = per_prompt

        # --- correctness, once (untimed) --------------------------------------------------------------------
        got = await asyncio.gather(*(pool.get(p) for p in prompts))
        await asyncio.gather(*(pool.get_into(p, o) for p, o in zip(prompts, outs_caller)))
        for i in range(len(prompts)):
            mark(i)
            assert torch.equal(got[i], kv) and torch.equal(outs_caller[i], kv), f"prompt {i} restored wrong bytes"
        del got
        await tiny_read()
        assert torch.equal(tiny_dst, tiny_src), "tiny objects restored wrong bytes"

        # --- timed: interleaved so drift hits every contender alike ----------------------------------------
        log(f"kvpool on {target_desc}: {args.repeat} runs x {len(cases)} cases")
        for c in cases:
            await timed(c, tier, record=False)  # warm-up
        for _ in range(args.repeat):
            for c in cases:
                await timed(c, tier, record=True)

        for c in cases:
            t = statistics.median(c.times)
            res[f"{c.name}_GBps"] = c.nbytes / t / GB
            res[f"{c.name}_cpu_s_per_GB"] = statistics.median(x / (c.nbytes / GB) for x in c.cpus)
            res[f"{c.name}_usr_s_per_GB"] = statistics.median(x / (c.nbytes / GB) for x in c.usr)
            res[f"{c.name}_sys_s_per_GB"] = statistics.median(x / (c.nbytes / GB) for x in c.sys)
            res[f"{c.name}_minor_faults_per_GB"] = statistics.median(x / (c.nbytes / GB) for x in c.faults)
            res[f"{c.name}_direct_reads"] = statistics.median(c.direct)
            res[f"{c.name}_bounce_reads"] = statistics.median(c.bounce)
            res[f"{c.name}_runs_GBps"] = [c.nbytes / x / GB for x in c.times]
        res["tier_stats"] = {k: v for k, v in tier.stats().items() if isinstance(v, (int, float, str, bool))}
    return res


def ratios(res: dict[str, Any]) -> None:
    best = res.get("fio_best_GBps")
    fcpu = res.get("fio_ordinary_cpu_s_per_GB")
    for name in ("get", "get_into_aligned", "get_into_caller", "get_into_thp", "stream", "tiny_objects"):
        if best:
            res[f"{name}_vs_fio_best"] = res[f"{name}_GBps"] / best
        if fcpu:
            res[f"{name}_cpu_vs_fio_ordinary"] = res[f"{name}_cpu_s_per_GB"] / fcpu
    if best:
        res["targets"] = {name: {"ratio": res[f"{name}_vs_fio_best"], "target": tgt,
                                 "met": res[f"{name}_vs_fio_best"] >= tgt} for name, tgt in TARGETS.items()}
    if fcpu:
        res["cpu_targets"] = {name: {"ratio": res[f"{name}_cpu_vs_fio_ordinary"], "target": CPU_TARGET,
                                     "met": res[f"{name}_cpu_vs_fio_ordinary"] <= CPU_TARGET} for name in TARGETS}


def table(res: dict[str, Any]) -> None:
    best = res.get("fio_best_GBps")
    fcpu = res.get("fio_ordinary_cpu_s_per_GB")
    log(f"\n{res['target']}  ({res['restored_bytes'] / GB:.2f} GB restored per run, medians of {res['repeat']})")
    log(f"{'':40s} {'GB/s':>7s} {'vs fio best':>11s} {'CPU-s/GB':>9s} {'vs fio CPU':>10s} {'direct/bounce':>14s} {'usr/sys s/GB':>12s} {'faults/GB':>9s} target")
    if best:
        log(f"{'fio best (huge pages)':40s} {res['fio_hugepages_best_GBps'] or float('nan'):7.2f} "
            f"{(res['fio_hugepages_best_GBps'] or float('nan')) / best:11.2f}")
        log(f"{'fio ordinary buffers (' + res['fio_ordinary_best_config'] + ')':40s} "
            f"{res['fio_ordinary_best_GBps']:7.2f} {res['fio_ordinary_best_GBps'] / best:11.2f} {fcpu:9.3f} {1.0:10.2f}")
    for name, label in (("get", "kvpool get"), ("get_into_aligned", "kvpool get_into (aligned)"),
                        ("get_into_caller", "kvpool get_into (caller memory)"),
                        ("get_into_thp", "kvpool get_into (THP, diagnostic)"), ("stream", "kvpool stream"),
                        ("tiny_objects", f"{res['tiny_object_bytes'] // 1024} KiB objects")):
        gbps, cpu = res[f"{name}_GBps"], res[f"{name}_cpu_s_per_GB"]
        vs = f"{gbps / best:11.2f}" if best else f"{'-':>11s}"
        vc = f"{cpu / fcpu:10.2f}" if fcpu else f"{'-':>10s}"
        db = f"{res[f'{name}_direct_reads']:.0f}/{res[f'{name}_bounce_reads']:.0f}"
        tgt = ""
        if name in TARGETS and best:
            ok_bw = gbps / best >= TARGETS[name]
            ok_cpu = (cpu / fcpu <= CPU_TARGET) if fcpu else True
            tgt = (f">={TARGETS[name]}x {'ok' if ok_bw else 'MISSED'}; CPU<={CPU_TARGET:.0f}x "
                   f"{'ok' if ok_cpu else 'MISSED'}")
        us = f"{res[f'{name}_usr_s_per_GB']:.3f}/{res[f'{name}_sys_s_per_GB']:.3f}"
        log(f"{label:40s} {gbps:7.2f} {vs} {cpu:9.3f} {vc} {db:>14s} {us:>12s} "
            f"{res[f'{name}_minor_faults_per_GB']:9.0f} {tgt}")


def plot(res: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars: list[tuple[str, float | None, str, str]] = [  # label, GB/s, colour, hatch
        ("fio best\n(huge pages)", res.get("fio_hugepages_best_GBps"), "#555555", ""),
        ("fio\nordinary buffers", res.get("fio_ordinary_best_GBps"), "#999999", ""),
        ("kvpool\nget", res["get_GBps"], "#1f77b4", ""),
        ("kvpool get_into\n(aligned)", res["get_into_aligned_GBps"], "#1f77b4", ""),
        ("kvpool get_into\n(caller memory)", res["get_into_caller_GBps"], "#1f77b4", ""),
        ("kvpool get_into\n(THP dest,\ndiagnostic)", res["get_into_thp_GBps"], "#9ecae1", ""),
        ("kvpool\nstream", res["stream_GBps"], "#1f77b4", ""),
        (f"{res['tiny_object_bytes'] // 1024} KiB objects\n(paged, no\nbulk objects)", res["tiny_objects_GBps"],
         "#ff7f0e", ""),
    ]
    cpu = [res.get("fio_hugepages_cpu_s_per_GB"), res.get("fio_ordinary_cpu_s_per_GB")] + [
        res[f"{n}_cpu_s_per_GB"] for n in ("get", "get_into_aligned", "get_into_caller", "get_into_thp", "stream",
                                           "tiny_objects")]
    for label, v in LMCACHE_REPORTED.items():
        bars.append((label.replace("LMCache 0.5.6 ", "LMCache 0.5.6\n").replace(" use_", "\nuse_")
                     + "\n(reported, not\nmeasured in this run)", v, "white", "//"))
    fig, ax = plt.subplots(figsize=(13, 5.5))
    xs = range(len(bars))
    for x, (label, v, col, hatch) in zip(xs, bars):
        if v is None:
            continue
        ax.bar(x, v, color=col, edgecolor="black", hatch=hatch, linewidth=0.8)
        ax.text(x, v, f"{v:.2f}", ha="center", va="bottom", fontsize=9)
        if x < len(cpu) and cpu[x] is not None:
            ax.text(x, v / 2, f"{cpu[x]:.3f}\nCPU-s/GB", ha="center", va="center", fontsize=7,
                    color="black" if col in ("#9ecae1", "#ff7f0e", "white") else "white")
    best = res.get("fio_best_GBps")
    if best:
        ax.axhline(0.9 * best, color="green", ls="--", lw=1, label=f"target get/get_into: 0.9 x fio best ({0.9 * best:.2f})")
        ax.axhline(0.85 * best, color="olive", ls=":", lw=1, label=f"target stream: 0.85 x fio best ({0.85 * best:.2f})")
    ax.set_xticks(list(xs), [b[0] for b in bars], fontsize=8)
    ax.set_ylabel("read bandwidth, GB/s (median)")
    ax.set_title(f"SSD restore, 8B-class layout, {res['restored_bytes'] / GB:.2f} GB, page cache dropped "
                 f"({'block device' if res.get('block_device') else 'pool file'}, {os.cpu_count()} CPUs)", fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    ax.text(0.99, 0.72, f"hatched: LMCache 0.5.6 figures published in the issue for this machine kind,\n"
            f"where fio with ordinary buffers did {LMCACHE_REPORTED_FIO_ORDINARY:.2f} GB/s "
            f"(reported, not measured in this run; not scaled)",
            transform=ax.transAxes, ha="right", va="top", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", help="pool file (default: a temporary file under /tmp, removed at the end)")
    ap.add_argument("--device", help="raw block device, e.g. /dev/loop0 (overwritten!): uring:///dev/...")
    ap.add_argument("--capacity", default="2560MiB", help="pool file capacity (file mode)")
    ap.add_argument("--opts", default="", help="extra uring:// options, e.g. 'bounce=1GiB&entries=128'")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--chunks", type=int, default=8, help="256-token chunks per prompt")
    ap.add_argument("--tiny-mib", type=int, default=256, help="bytes of tiny objects to read")
    ap.add_argument("--tiny-kib", type=int, default=16, help="tiny object size")
    ap.add_argument("--fio-runtime", type=float, default=3.0, help="seconds per fio configuration")
    ap.add_argument("--no-fio", action="store_true")
    ap.add_argument("--stream-touch", action="store_true", help="x.sum() every streamed layer")
    ap.add_argument("--name", help="results/NAME.json (default ssd, or ssd_blockdev with --device)")
    ap.add_argument("--plot", type=Path, default=None, help="plot path (default docs/ssd_bandwidth.png in file mode)")
    ap.add_argument("--replot", action="store_true", help="only redraw the plot from results/NAME.json")
    args = ap.parse_args()
    if args.replot:
        from _util import RESULTS

        res = json.loads((RESULTS / f"{args.name or ('ssd_blockdev' if args.device else 'ssd')}.json").read_text())
        out = args.plot or REPO / "docs" / "ssd_bandwidth.png"
        plot(res, out)
        log(f"plot {out}")
        return
    if not args.no_fio and shutil.which("fio") is None:
        raise SystemExit("fio is not on PATH (apt-get install fio), or pass --no-fio")
    if not drop_caches():
        log("warning: cannot drop the page cache (not root?); reads are O_DIRECT anyway")

    t_start = time.perf_counter()
    tmpdir = None
    if args.device:
        spec = f"uring://{args.device}" + (f"?{args.opts}" if args.opts else "")
        desc = f"block device {args.device}"
        name = "ssd_blockdev"
    else:
        path = args.path
        if path is None:
            tmpdir = tempfile.mkdtemp(prefix="kvpool-bench-ssd-", dir="/tmp")
            path = os.path.join(tmpdir, "pool.bin")
        spec = f"uring://{path}?capacity={args.capacity}" + (f"&{args.opts}" if args.opts else "")
        desc = f"pool file {path}"
        name = "ssd"
    try:
        res = asyncio.run(kvpool_part(spec, args, desc))
    finally:
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)
    res["repeat"] = args.repeat
    res["kvpool_module"] = kvpool.__file__
    res["torch_threads"] = torch.get_num_threads()
    res["reported_not_measured"] = {**LMCACHE_REPORTED, "LMCache report's fio ordinary buffers": LMCACHE_REPORTED_FIO_ORDINARY}
    ratios(res)
    res["wall_s"] = time.perf_counter() - t_start
    table(res)
    log(f"\nwall {res['wall_s']:.0f} s; saved {save(args.name or name, res)}")
    out = args.plot or (None if args.device else REPO / "docs" / "ssd_bandwidth.png")
    if out is not None:
        plot(res, out)
        log(f"plot {out}")


if __name__ == "__main__":
    main()
