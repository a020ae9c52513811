"""SSD tier (``uring://``) restore bandwidth and CPU against what the device itself can do (issue: SSD restore).

Reference, measured by fio in the same run on the same bytes (the pool file's -- or device's -- data region,
read-only): randread, ioengine=io_uring, direct=1, bs 1M/4M x iodepth 8/32, with huge-page buffers
(``--iomem=mmaphuge``, after reserving huge pages; the old reservation is restored) and with ordinary memory
(``--iomem=malloc``). "fio best" is the best bandwidth of all of them; fio's CPU (usr+sys seconds per GB) is
taken from the best ordinary-buffer run.

kvpool, 8B-class layout (32 layers, 8 KV heads, head_dim 128, fp16, 256-token chunks: 32 MiB objects), a pool
with only the uring tier, filled with 6 distinct prompts x 8 chunks (1.5 GiB) and closed. Then, as users run
it: every timed restore happens in a pool opened just before it (``KVPool.open``, then ``await pool.ready()``,
whose time is reported separately), page cache dropped, no untimed warm-up: that first restore is "cold"; a
second one in the same pool (page cache dropped again) is "warm". Figures are medians of ``--repeat``:

  get                 all prompts restored concurrently (asyncio.gather) into new tensors
  get_into (pool.empty)   ... into tensors from ``pool.empty`` (the pool's staging memory: direct reads)
  get_into (torch.empty)  ... into plain ``torch.empty`` tensors, resident (a serving engine's own buffers)
  stream              ``pool.stream`` of all prompts concurrently, each layer consumed without work
  16 KiB objects      the same kind of bytes stored as one 16 KiB object per (16-token page, layer, K|V),
                      read straight on the backend (the many-small-I/Os baseline)

Beside them, in the same run on the same disk: LMCache 0.5.6's LocalDiskBackend with use_odirect (installed in
its own venv, .venv-lmcache, when missing), its restore timed cold in a fresh process with its preallocated
memory pool (benchmarks/lmcache_driver.py).

Targets (issue 10): get cold and warm >= 0.9 x fio best; get_into (pool.empty) >= 0.95x; stream >= 0.9x;
get_into (torch.empty) >= 0.8x (bounce on a device whose DIO alignment plain tensors miss); CPU-s/GB of get and
get_into (pool.empty) <= 1.5 x fio's with ordinary buffers; cold get >= 1.1 x LMCache's bandwidth at no more CPU/GB.

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
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
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

TARGETS = {"get": 0.9, "get_into_aligned": 0.95, "get_into_caller": 0.8, "stream": 0.9}
CPU_TARGET = 1.5
CPU_TARGET_CASES = ("get", "get_into_aligned")


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
CASES = ("get", "get_into_aligned", "get_into_caller", "stream")
LABELS = {"get": "get", "get_into_aligned": "get_into (pool.empty)", "get_into_caller": "get_into (torch.empty)",
          "stream": "stream", "tiny_objects": "16 KiB objects"}


def layout_8b() -> kvpool.KVLayout:
    return kvpool.KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype=torch.float16, chunk_tokens=256)


def mark(kv: torch.Tensor, i: int) -> None:  # make every prompt's bytes distinct (and recognisable)
    kv[:, :, :, 0, 0] = float(i)


async def fill(spec: str, args: argparse.Namespace, prompts: list[np.ndarray], res: dict[str, Any]) -> None:
    """Store the prompts (and the tiny-object baseline) in a pool that is then closed: nothing stays warm."""
    layout = layout_8b()
    T = args.chunks * layout.chunk_tokens
    t0 = time.perf_counter()
    async with await kvpool.KVPool.open(layout=layout, model_id="bench-ssd", backends=[spec]) as pool:
        tier = pool.tiers[0]
        kv = aligned_empty(layout.kv_shape(T), torch.float16)
        kv.copy_(torch.randn(layout.kv_shape(T), dtype=torch.float16))
        for i, p in enumerate(prompts):
            mark(kv, i)
            await pool.put(p, kv)
        tiny_obj = args.tiny_kib * 1024
        tiny_n = (args.tiny_mib * MiB) // tiny_obj
        g = torch.Generator().manual_seed(1)
        tiny_src = torch.randint(0, 256, (tiny_n * tiny_obj,), dtype=torch.uint8, generator=g)
        tiny_keys = [bytes([7]) + j.to_bytes(15, "little") for j in range(tiny_n)]
        for b in range(0, tiny_n, 1024):
            await tier.write_many([(tiny_keys[j], tiny_src[j * tiny_obj : (j + 1) * tiny_obj])
                                   for j in range(b, min(tiny_n, b + 1024))])
        await pool.flush()
        for p in prompts:
            assert await pool.lookup(p) == T, "a prompt is not fully stored"
        entries = [tier._index[k] for p in prompts for k in pool.keys_for(p)]
        lo = min(e.offset for e in entries)
        hi = max(e.offset + e.extent for e in entries)
        d_off = tier._geo.d_off
        res["data_region"] = {"offset": d_off + lo, "size": hi - lo}
        res["pool_path"] = tier.path
        res["mem_align"] = tier.stats()["mem_align"]
        res["block_device"] = tier.stats()["block_device"]
    res["fill_s"] = time.perf_counter() - t0
    res["tiny_object_bytes"], res["tiny_objects"] = tiny_obj, tiny_n
    res["tiny_batch_objects"] = (T // 16) * layout.num_layers * 2
    res["_tiny"] = (tiny_keys, tiny_src)


async def restore_once(spec: str, args: argparse.Namespace, prompts: list[np.ndarray], case: str,
                       res: dict[str, Any], runs: dict[str, list[dict[str, float]]], verify: bool) -> None:
    """Open a pool, wait until it is ready, and time its FIRST restore (cold), then a second one (warm).

    Before each timed restore the page cache is dropped. Destinations are made the way a caller makes them:
    ``pool.empty`` for get_into (aligned), a fresh ``torch.empty`` faulted in (resident, as a serving engine's
    buffers are) for get_into (caller).
    """
    layout = layout_8b()
    T = args.chunks * layout.chunk_tokens
    total = len(prompts) * args.chunks * layout.chunk_nbytes
    # 0: the pool's own default (what a user who sets nothing gets)
    cfg = {"staging_bytes": int(args.staging_gib * 2**30)} if args.staging_gib else {}
    t_open = time.perf_counter()
    pool = await kvpool.KVPool.open(layout=layout, model_id="bench-ssd", backends=[spec], config=cfg)
    opened = time.perf_counter() - t_open
    try:
        ready = await pool.ready()
        runs.setdefault("open", []).append({"open_s": opened, "ready_s": time.perf_counter() - t_open,
                                            "populate_s": ready, "staging_bytes": pool.stats()["staging"]["bytes"]})
        tier = pool.tiers[0]
        if case == "get_into_aligned":
            outs = [pool.empty(T) for _ in prompts]
        elif case == "get_into_caller":
            outs = [torch.empty(layout.kv_shape(T), dtype=torch.float16) for _ in prompts]
            for o in outs:
                o.zero_()  # the caller's buffers exist (resident) before the request
        else:
            outs = []

        async def consume(p: np.ndarray) -> int:
            n = 0
            async for _layer, x in pool.stream(p):
                n += x.numel()
            return n

        async def run() -> Any:
            if case == "get":
                return await asyncio.gather(*(pool.get(p) for p in prompts))
            if case == "stream":
                return await asyncio.gather(*(consume(p) for p in prompts))
            return await asyncio.gather(*(pool.get_into(p, o) for p, o in zip(prompts, outs)))

        for phase in ("cold", "warm"):
            drop_caches()
            s0 = tier.stats()
            u0, k0, f0 = rusage()
            t0 = time.perf_counter()
            got = await run()
            dt = time.perf_counter() - t0
            u1, k1, f1 = rusage()
            s1 = tier.stats()
            runs.setdefault(f"{case}_{phase}", []).append({
                "s": dt, "GBps": total / dt / GB, "cpu_s_per_GB": (u1 - u0 + k1 - k0) / (total / GB),
                "usr_s_per_GB": (u1 - u0) / (total / GB), "sys_s_per_GB": (k1 - k0) / (total / GB),
                "faults_per_GB": (f1 - f0) / (total / GB),
                "direct": s1["direct_reads"] - s0["direct_reads"], "bounce": s1["bounce_reads"] - s0["bounce_reads"],
            })
            if verify and phase == "cold" and case in ("get", "get_into_caller", "get_into_aligned"):
                ref = aligned_empty(layout.kv_shape(T), torch.float16)
                for i in range(len(prompts)):
                    x = got[i] if case == "get" else outs[i]
                    ref.copy_(x)
                    mark(ref, i)
                    assert torch.equal(ref, x), f"prompt {i} restored wrong bytes ({case})"
            del got
            if case == "get":
                import gc

                gc.collect()  # the results go back to the staging arena, as when a server drops them
    finally:
        await pool.close()


async def tiny_once(spec: str, res: dict[str, Any], runs: dict[str, list[dict[str, float]]]) -> None:
    tiny_keys, tiny_src = res["_tiny"]
    obj = res["tiny_object_bytes"]
    per = res["tiny_batch_objects"]
    async with await kvpool.KVPool.open(layout=layout_8b(), model_id="bench-ssd", backends=[spec]) as pool:
        t = pool.tiers[0]
        dst = aligned_empty((len(tiny_keys) * obj,), torch.uint8)
        dst.zero_()
        batches = [range(b, min(len(tiny_keys), b + per)) for b in range(0, len(tiny_keys), per)]
        drop_caches()
        u0, k0, _ = rusage()
        t0 = time.perf_counter()
        r = await asyncio.gather(*(t.read_many([ReadRequest(tiny_keys[j], dst[j * obj : (j + 1) * obj]) for j in b])
                                   for b in batches))
        dt = time.perf_counter() - t0
        u1, k1, _ = rusage()
        assert all(all(x) for x in r) and torch.equal(dst, tiny_src), "tiny objects restored wrong bytes"
        n = len(tiny_keys) * obj
        runs.setdefault("tiny_objects_cold", []).append({"s": dt, "GBps": n / dt / GB,
                                                        "cpu_s_per_GB": (u1 - u0 + k1 - k0) / (n / GB)})


# --- LMCache (its own venv: it pins other packages than ours) ------------------------------------------------
LMCACHE_VENV = REPO / ".venv-lmcache"


def lmcache_python() -> Path | None:
    py = LMCACHE_VENV / "bin" / "python"
    ok = py.exists() and subprocess.run([str(py), "-c", "import lmcache"], capture_output=True).returncode == 0
    if not ok:
        log(f"installing LMCache 0.5.6 (CPU) into {LMCACHE_VENV} ...")
        r = subprocess.run(f"{sys.executable} -m venv {LMCACHE_VENV} && {py} -m pip install -q torch==2.13.0 "
                           "lmcache==0.5.6", shell=True, capture_output=True, text=True)
        if r.returncode != 0:
            log("warning: LMCache could not be installed: " + (r.stderr or r.stdout)[-400:])
            return None
    return py


def lmcache_part(args: argparse.Namespace, workdir: str, chunks: int) -> dict[str, Any]:
    py = lmcache_python()
    if py is None:
        return {"lmcache_error": "not installed"}
    d = os.path.join(workdir, "lmcache")
    os.makedirs(d, exist_ok=True)
    drv = [str(py), str(HERE / "lmcache_driver.py"), d, "--chunks", str(chunks)]
    p = subprocess.run(drv + ["--phase", "put"], capture_output=True, text=True)
    if p.returncode != 0:
        return {"lmcache_error": p.stderr[-400:]}
    runs = []
    for _ in range(args.repeat):
        drop_caches()
        p = subprocess.run(drv + ["--phase", "get"], capture_output=True, text=True)
        if p.returncode != 0:
            return {"lmcache_error": p.stderr[-400:]}
        runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
        log(f"  LMCache cold restore: {runs[-1]['GBps']:.2f} GB/s, {runs[-1]['cpu_s_per_GB']:.3f} CPU-s/GB")
    shutil.rmtree(d, ignore_errors=True)
    return {"lmcache_runs": runs, "lmcache_GBps": statistics.median(r["GBps"] for r in runs),
            "lmcache_cpu_s_per_GB": statistics.median(r["cpu_s_per_GB"] for r in runs),
            "lmcache_dir": d, "lmcache_version": "0.5.6 LocalDiskBackend use_odirect"}


async def kvpool_part(spec: str, args: argparse.Namespace, target_desc: str, workdir: str) -> dict[str, Any]:
    layout = layout_8b()
    T = args.chunks * layout.chunk_tokens
    total = args.prompts * args.chunks * layout.chunk_nbytes
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 128_000, T) for _ in range(args.prompts)]
    res: dict[str, Any] = {"target": target_desc, "spec": spec, "prompts": args.prompts, "chunks_per_prompt": args.chunks,
                           "chunk_bytes": layout.chunk_nbytes, "restored_bytes": total}
    await fill(spec, args, prompts, res)
    if not args.no_fio:
        r = res["data_region"]
        log(f"fio on {res['pool_path']} offset={r['offset']} size={r['size']}")
        res.update(fio_reference(res["pool_path"], r["offset"], r["size"], args.fio_runtime))
    if not args.no_lmcache:
        res.update(lmcache_part(args, workdir, args.prompts * args.chunks))
    runs: dict[str, list[dict[str, float]]] = {}
    log(f"kvpool on {target_desc}: {args.repeat} x {len(CASES)} cases, each in a pool opened just before it")
    for rep in range(args.repeat):
        for case in CASES:  # interleaved so drift hits every contender alike
            await restore_once(spec, args, prompts, case, res, runs, verify=rep == 0)
        await tiny_once(spec, res, runs)
    del res["_tiny"]
    res["runs"] = runs
    for key, rs in runs.items():
        if key == "open":
            res["open_s"] = statistics.median(r["open_s"] for r in rs)
            res["ready_s"] = statistics.median(r["ready_s"] for r in rs)
            res["staging_bytes"] = rs[0]["staging_bytes"]
            continue
        for f in rs[0]:
            res[f"{key}_{f}"] = statistics.median(r[f] for r in rs)
    return res


def ratios(res: dict[str, Any]) -> None:
    best = res.get("fio_best_GBps")
    fcpu = res.get("fio_ordinary_cpu_s_per_GB")
    res["targets"] = {}
    for case in CASES:
        for phase in ("cold", "warm"):
            k = f"{case}_{phase}"
            tgt = TARGETS[case]
            if best:
                res[f"{k}_vs_fio_best"] = res[f"{k}_GBps"] / best
            if fcpu:
                res[f"{k}_cpu_vs_fio_ordinary"] = res[f"{k}_cpu_s_per_GB"] / fcpu
            if best:
                res["targets"][k] = {"ratio": res[f"{k}_vs_fio_best"], "target": tgt, "met": res[f"{k}_vs_fio_best"] >= tgt}
            if fcpu and case in CPU_TARGET_CASES:
                res["targets"][k + "_cpu"] = {"ratio": res[f"{k}_cpu_vs_fio_ordinary"], "target": CPU_TARGET,
                                             "met": res[f"{k}_cpu_vs_fio_ordinary"] <= CPU_TARGET}
    if "lmcache_GBps" in res:
        r = res["get_cold_GBps"] / res["lmcache_GBps"]
        res["targets"]["get_cold_vs_lmcache"] = {"ratio": r, "target": 1.1, "met": r >= 1.1}
        c = res["get_cold_cpu_s_per_GB"] / res["lmcache_cpu_s_per_GB"]
        res["targets"]["get_cold_cpu_vs_lmcache"] = {"ratio": c, "target": 1.0, "met": c <= 1.0}


def table(res: dict[str, Any]) -> None:
    best = res.get("fio_best_GBps")
    fcpu = res.get("fio_ordinary_cpu_s_per_GB")
    log(f"\n{res['target']}  ({res['restored_bytes'] / GB:.2f} GB per restore, medians of {res['repeat']}; "
        f"open {res['open_s']:.2f} s, ready (staging {res['staging_bytes'] >> 20} MiB populated) {res['ready_s']:.2f} s)")
    log(f"{'':34s} {'GB/s':>6s} {'x fio best':>10s} {'CPU-s/GB':>9s} {'x fio CPU':>9s} {'direct/bounce':>13s} target")
    if best:
        log(f"{'fio best (huge pages)':34s} {res['fio_hugepages_best_GBps'] or float('nan'):6.2f} "
            f"{(res['fio_hugepages_best_GBps'] or float('nan')) / best:10.2f} {res.get('fio_hugepages_cpu_s_per_GB') or float('nan'):9.3f}")
        log(f"{'fio ordinary buffers':34s} {res['fio_ordinary_best_GBps']:6.2f} "
            f"{res['fio_ordinary_best_GBps'] / best:10.2f} {fcpu:9.3f} {1.0:9.2f}")
    if "lmcache_GBps" in res:
        log(f"{'LMCache 0.5.6 O_DIRECT (cold)':34s} {res['lmcache_GBps']:6.2f} "
            f"{res['lmcache_GBps'] / best if best else float('nan'):10.2f} {res['lmcache_cpu_s_per_GB']:9.3f} "
            f"{res['lmcache_cpu_s_per_GB'] / fcpu if fcpu else float('nan'):9.2f}")
    for case in CASES:
        for phase in ("cold", "warm"):
            k = f"{case}_{phase}"
            gbps, cpu = res[f"{k}_GBps"], res[f"{k}_cpu_s_per_GB"]
            t = res["targets"].get(k)
            tc = res["targets"].get(k + "_cpu")
            tgt = (f">={t['target']}x {'ok' if t['met'] else 'MISSED'}" if t else "") + (
                f"; CPU<={tc['target']}x {'ok' if tc['met'] else 'MISSED'}" if tc else "")
            log(f"{'kvpool ' + LABELS[case] + ' ' + phase:34s} {gbps:6.2f} {gbps / best if best else float('nan'):10.2f} "
                f"{cpu:9.3f} {cpu / fcpu if fcpu else float('nan'):9.2f} "
                f"{res[f'{k}_direct']:.0f}/{res[f'{k}_bounce']:.0f}".ljust(88) + f" {tgt}")
    log(f"{'16 KiB objects (cold)':34s} {res['tiny_objects_cold_GBps']:6.2f} "
        f"{res['tiny_objects_cold_GBps'] / best if best else float('nan'):10.2f} {res['tiny_objects_cold_cpu_s_per_GB']:9.3f}")
    for name in ("get_cold_vs_lmcache", "get_cold_cpu_vs_lmcache"):
        if name in res["targets"]:
            t = res["targets"][name]
            log(f"{name}: {t['ratio']:.2f} (target {'>=' if 'cpu' not in name else '<='}{t['target']}) "
                f"{'ok' if t['met'] else 'MISSED'}")


def plot(res: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars: list[tuple[str, float | None, float | None, str]] = [  # label, GB/s, CPU-s/GB, colour
        ("fio best\n(huge pages)", res.get("fio_hugepages_best_GBps"), res.get("fio_hugepages_cpu_s_per_GB"), "#555555"),
        ("fio\nordinary buffers", res.get("fio_ordinary_best_GBps"), res.get("fio_ordinary_cpu_s_per_GB"), "#999999"),
        ("LMCache 0.5.6\nO_DIRECT, cold", res.get("lmcache_GBps"), res.get("lmcache_cpu_s_per_GB"), "#d62728"),
    ]
    for case in CASES:
        for phase, col in (("cold", "#1f77b4"), ("warm", "#9ecae1")):
            bars.append((f"kvpool\n{LABELS[case].replace(' (', chr(10) + '(')}\n{phase}", res[f"{case}_{phase}_GBps"],
                         res[f"{case}_{phase}_cpu_s_per_GB"], col))
    bars.append(("16 KiB\nobjects", res["tiny_objects_cold_GBps"], res["tiny_objects_cold_cpu_s_per_GB"], "#ff7f0e"))
    fig, ax = plt.subplots(figsize=(15, 5.5))
    for x, (label, v, cpu, col) in enumerate(bars):
        if v is None:
            continue
        ax.bar(x, v, color=col, edgecolor="black", linewidth=0.8)
        ax.text(x, v, f"{v:.2f}", ha="center", va="bottom", fontsize=9)
        if cpu is not None:
            ax.text(x, v / 2, f"{cpu:.3f}\nCPU-s/GB", ha="center", va="center", fontsize=7,
                    color="black" if col in ("#9ecae1", "#ff7f0e") else "white")
    best = res.get("fio_best_GBps")
    if best:
        ax.axhline(best, color="black", ls="-", lw=0.8, label=f"device ceiling: fio best ({best:.2f})")
        ax.axhline(0.9 * best, color="green", ls="--", lw=1, label=f"target get/stream: 0.9 x fio best ({0.9 * best:.2f})")
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=7)
    ax.set_ylabel("read bandwidth, GB/s (median)")
    ax.set_title(f"SSD restore, 8B-class layout, {res['restored_bytes'] / GB:.2f} GB, page cache dropped, each cold "
                 f"restore the first in a freshly opened pool ({'block device' if res.get('block_device') else 'pool file'}, "
                 f"{os.cpu_count()} CPUs)", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
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
    ap.add_argument("--no-lmcache", action="store_true", help="skip the LMCache side-by-side")
    ap.add_argument("--staging-gib", type=float, default=0.0,
                    help="PoolConfig.staging_bytes of the timed pools, GiB (default 0: the pool's own default)")
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
    tmpdir = tempfile.mkdtemp(prefix="kvpool-bench-ssd-", dir=os.path.dirname(args.path) if args.path else "/tmp")
    if args.device:
        spec = f"uring://{args.device}" + (f"?{args.opts}" if args.opts else "")
        desc = f"block device {args.device}"
        name = "ssd_blockdev"
    else:
        path = args.path or os.path.join(tmpdir, "pool.bin")
        spec = f"uring://{path}?capacity={args.capacity}" + (f"&{args.opts}" if args.opts else "")
        desc = f"pool file {path}"
        name = "ssd"
    try:
        res = asyncio.run(kvpool_part(spec, args, desc, tmpdir))
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    res["repeat"] = args.repeat
    res["kvpool_module"] = kvpool.__file__
    res["torch_threads"] = torch.get_num_threads()
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
