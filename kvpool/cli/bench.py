"""``kvpool bench``: fill a ``uring://`` pool, restore it, and compare with what the raw device does (fio)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch

from ..config import BackendSpec
from ..errors import ConfigError
from ..layout import KVLayout
from ..pool.facade import KVPool
from ..ssd.store import UringBackend
from ..storage.buffers import aligned_empty
from ..units import format_size, parse_size
from .checks import UsageError, default_bench_dir, is_tmpfs, positive, writable_dir

LAYOUTS = {
    "8b": KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype=torch.float16, chunk_tokens=256),
    "70b": KVLayout(num_layers=80, num_kv_heads=8, head_dim=128, dtype=torch.float16, chunk_tokens=256),
    "small": KVLayout(num_layers=8, num_kv_heads=4, head_dim=64, dtype=torch.float16, chunk_tokens=256),
}


class Progress:
    """A one-line progress bar on stderr (plain lines when stderr is not a terminal); fits 80 columns."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done = label, total, 0
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self._last = -1

    def advance(self, n: int) -> None:
        self.done += n
        frac = self.done / self.total if self.total else 1.0
        pct = int(frac * 100)
        if not self.tty and pct // 25 == self._last // 25 and self.done < self.total:
            return
        self._last = pct
        bar = "#" * int(frac * 30)
        rate = self.done / max(time.perf_counter() - self.t0, 1e-9) / 1e9
        end = "" if self.tty and self.done < self.total else "\n"
        print(f"\r{self.label:8s} [{bar:30s}] {pct:3d}% {format_size(self.done):>10s} {rate:6.2f} GB/s",
              end=end, file=sys.stderr, flush=True)


def _fio_run(path: str, size: int, bs: str, qd: int, iomem: str) -> dict[str, float] | None:
    cmd = ["fio", "--name=ref", f"--filename={path}", "--readonly", "--rw=randread", "--ioengine=io_uring",
           "--direct=1", f"--bs={bs}", f"--iodepth={qd}", f"--size={size}", "--time_based", "--runtime=2",
           f"--iomem={iomem}", "--output-format=json"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
        job = json.loads(out[out.index("{"):])["jobs"][0]
    except (subprocess.SubprocessError, ValueError, KeyError, IndexError):
        return None
    io = max(job["read"]["io_bytes"] / 1e9, 1e-9)
    return {"GBps": job["read"]["bw_bytes"] / 1e9,
            "cpu_s_per_GB": (job["usr_cpu"] + job["sys_cpu"]) / 100 * job["job_runtime"] / 1e3 / io,
            "bs": float(parse_size(bs.replace("M", "MiB"))), "iodepth": float(qd)}


def _reserve_hugepages(n: int) -> int | None:
    """Raise vm.nr_hugepages by ``n`` for fio's huge-page buffers; return the old value (None: not possible)."""
    try:
        with open("/proc/sys/vm/nr_hugepages") as f:
            old = int(f.read())
        with open("/proc/sys/vm/nr_hugepages", "w") as f:
            f.write(str(old + n))
        with open("/proc/sys/vm/nr_hugepages") as f:
            if int(f.read()) >= old + n:
                return old
        _restore_hugepages(old)  # the kernel could not find that many: give back what it did find
    except (OSError, ValueError):
        pass
    return None


def _restore_hugepages(old: int) -> None:
    try:
        with open("/proc/sys/vm/nr_hugepages", "w") as f:
            f.write(str(old))
    except OSError:
        pass


def _fio_reference(path: str, size: int) -> dict[str, dict[str, float]]:
    """fio on the pool's bytes: the device's best (huge-page buffers, when they can be reserved) and with
    ordinary buffers (what most callers' memory is); each the best of a few request shapes."""
    if not shutil.which("fio"):
        return {}
    shapes = (("1M", 32), ("4M", 8), ("4M", 32))
    out: dict[str, dict[str, float]] = {}
    old = _reserve_hugepages(4 * 32 * 2 + 8)  # the largest bs x iodepth, in 2 MiB pages, plus slack
    kinds = (["mmaphuge"] if old is not None else []) + ["malloc"]
    try:
        for iomem in kinds:
            runs = [r for bs, qd in shapes if (r := _fio_run(path, size, bs, qd, iomem)) is not None]
            if runs:
                out["huge_pages" if iomem == "mmaphuge" else "ordinary"] = max(runs, key=lambda r: r["GBps"])
    finally:
        if old is not None:
            _restore_hugepages(old)
    return out


def _drop_caches() -> None:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass  # not root: O_DIRECT reads bypass the page cache anyway


class Plan:
    """A validated bench: what to write where; every user mistake is found here, before any I/O."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.layout = LAYOUTS[args.layout]
        self.layout_name = args.layout
        self.prompt_chunks = positive(args.prompt_chunks, "--prompt-chunks", "e.g. 8")
        self.concurrency = positive(args.concurrency, "--concurrency", "e.g. 4")
        self.repeat = positive(args.repeat, "--repeat", "e.g. 3")
        try:
            fill = parse_size(args.size, what="--size")
        except ConfigError:
            raise UsageError(f"--size {args.size}: not a size", "e.g. 4GiB, 512MiB, 10GB") from None
        prompt = self.layout.chunk_nbytes * self.prompt_chunks
        if fill == 0:
            raise UsageError("--size must be more than 0", "e.g. --size 4GiB")
        if fill < prompt:
            fewer = max(1, fill // self.layout.chunk_nbytes)
            raise UsageError(
                f"--size {args.size} is less than one prompt ({self.prompt_chunks} chunks x "
                f"{format_size(self.layout.chunk_nbytes)} = {format_size(prompt)} for layout {args.layout})",
                f"use --size {-(-prompt >> 20)}MiB or more"
                + (f", or --prompt-chunks {fewer}" if fill >= self.layout.chunk_nbytes else
                   ", or --layout small"),
            )
        self.n_prompts = fill // prompt
        self.total = self.n_prompts * prompt
        self.capacity = int(self.total * 1.15) + (64 << 20)
        self.keep = args.keep
        self.tmpdir: str | None = None
        self.warnings: list[str] = []
        if args.path:
            if args.dir:
                raise UsageError("give --path or --dir, not both", "--dir is where a temp pool file goes")
            self.path = args.path
            try:
                st: os.stat_result | None = os.stat(self.path)
            except FileNotFoundError:
                st = None
            parent = os.path.dirname(os.path.abspath(self.path))
            if st is None and not os.path.isdir(parent):
                raise UsageError(f"--path {self.path}: directory {parent} does not exist", "create it first")
            self.block_device = bool(st and stat.S_ISBLK(st.st_mode))
            if st is not None and not (self.block_device or stat.S_ISREG(st.st_mode)):
                raise UsageError(f"--path {self.path}: neither a file nor a block device",
                                 "give a pool file (created if missing) or a raw block device")
            where = parent
            self.keep = True  # the user's own path is never removed
        else:
            where = writable_dir(args.dir) if args.dir else default_bench_dir()
            self.path = os.path.join(where, "kvpool-bench-XXXX", "pool.kv")
            self.block_device = False
        if not self.block_device:
            free = shutil.disk_usage(where).free
            if free < self.capacity:
                raise UsageError(f"{where} has {format_size(free)} free; the bench needs {format_size(self.capacity)}",
                                 "use a smaller --size or another --dir")
            if is_tmpfs(where):
                self.warnings.append(f"{where} is tmpfs (memory): the figures measure RAM, not a disk; "
                                     "use --dir on an SSD for device figures")
        self.where = where
        self.no_fio = args.no_fio

    def spec(self) -> str:
        if self.block_device:
            return f"uring://{self.path}"
        if self.tmpdir is None and "kvpool-bench-XXXX" in self.path:
            self.tmpdir = tempfile.mkdtemp(prefix="kvpool-bench-", dir=self.where)
            self.path = os.path.join(self.tmpdir, "pool.kv")
        exists = os.path.exists(self.path)
        spec = f"uring://{self.path}" + ("" if exists else f"?capacity={self.capacity}")
        BackendSpec.parse(spec)
        return spec


async def _restore(pool: KVPool, prompts: list[Any], plan: Plan, prog: Progress) -> tuple[float, float]:
    """``get`` every prompt, ``concurrency`` at a time (results dropped per batch, as a server drops them);
    page cache dropped first. Returns (seconds, CPU seconds)."""
    tokens = plan.prompt_chunks * plan.layout.chunk_tokens
    per_prompt = plan.prompt_chunks * plan.layout.chunk_nbytes
    _drop_caches()
    c0, t0 = time.process_time(), time.perf_counter()
    if prog.done == 0:  # the bar's rate counts restore time, not the cache drop before it
        prog.t0 = t0
    for s in range(0, len(prompts), plan.concurrency):
        batch = prompts[s : s + plan.concurrency]
        got = await asyncio.gather(*(pool.get(p) for p in batch))
        if not all(g.shape[2] == tokens for g in got):
            raise RuntimeError(f"restore found {[g.shape[2] for g in got]} tokens: the pool lost data it acknowledged")
        del got
        prog.advance(len(batch) * per_prompt)
    return time.perf_counter() - t0, time.process_time() - c0


async def run(plan: Plan) -> dict[str, Any]:
    """Fill and close a pool; fio on its bytes; then ``repeat`` times: open the pool afresh, wait until it is
    ready, and time its first restore (cold) and a second one (warm), the page cache dropped before each."""
    layout = plan.layout
    spec = plan.spec()
    for w in plan.warnings:
        print(f"kvpool bench: warning: {w}", file=sys.stderr)
    print(f"kvpool bench: {plan.layout_name} layout ({format_size(layout.chunk_nbytes)}/chunk), {plan.n_prompts} "
          f"prompts x {plan.prompt_chunks} chunks = {format_size(plan.total)}\n  on {plan.path}", file=sys.stderr)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 128_000, plan.prompt_chunks * layout.chunk_tokens) for _ in range(plan.n_prompts)]
    kv = torch.randn(layout.kv_shape(plan.prompt_chunks * layout.chunk_tokens)).to(layout.dtype)
    res: dict[str, Any] = {"layout": plan.layout_name, "bytes": plan.total, "path": plan.path}
    per_prompt = plan.prompt_chunks * layout.chunk_nbytes
    # staging memory for the results callers hold at once (one batch), populated before the first request
    staging = {"staging_bytes": max(64 << 20, min(plan.concurrency, plan.n_prompts) * per_prompt + (64 << 20))}
    try:
        async with KVPool.open(layout=layout, model_id="kvpool-bench", backends=[spec]) as pool:
            tier = pool.tiers[0]
            assert isinstance(tier, UringBackend)
            prog = Progress("fill", plan.total)
            t0 = time.perf_counter()
            for i, p in enumerate(prompts):
                kv[0, 0, 0, 0, 0] = float(i)  # distinct contents per prompt
                await pool.put(p, kv)
                prog.advance(per_prompt)
            await pool.flush()
            res["put_GBps"] = plan.total / (time.perf_counter() - t0) / 1e9
            geo = tier.geometry  # the data region's end bounds what fio reads
            fio_size = geo.d_off + tier.used_bytes if geo else plan.total
        if not plan.no_fio:
            res["fio"] = _fio_reference(plan.path, fio_size)
        runs: dict[str, list[tuple[float, float]]] = {"cold": [], "warm": []}
        ready: list[float] = []
        prog = Progress("restore", plan.total * plan.repeat * 2)
        for _ in range(plan.repeat):
            t0 = time.perf_counter()
            async with KVPool.open(layout=layout, model_id="kvpool-bench", backends=[spec], config=staging) as pool:
                await pool.ready()
                ready.append(time.perf_counter() - t0)
                for phase in ("cold", "warm"):
                    runs[phase].append(await _restore(pool, prompts, plan, prog))
                res["tier"] = pool.tiers[0].stats()
        res["open_to_ready_s"] = float(np.median(ready))
        for phase, rs in runs.items():
            res[f"get_{phase}_GBps"] = plan.total / float(np.median([t for t, _ in rs])) / 1e9
            res[f"get_{phase}_cpu_s_per_GB"] = float(np.median([c for _, c in rs])) / (plan.total / 1e9)
        res["get_into_GBps"] = res["get_cold_GBps"]  # the name earlier versions reported
        best = res.get("fio", {}).get("huge_pages") or res.get("fio", {}).get("ordinary")
        if best:
            res["get_cold_vs_device_best"] = res["get_cold_GBps"] / best["GBps"]
            res["get_warm_vs_device_best"] = res["get_warm_GBps"] / best["GBps"]
    finally:
        if plan.tmpdir and not plan.keep:
            shutil.rmtree(plan.tmpdir, ignore_errors=True)
    res["kept"] = plan.keep
    return res


def report(res: dict[str, Any], plan: Plan) -> None:
    fio = res.get("fio", {})
    best = fio.get("huge_pages") or fio.get("ordinary")
    print(f"put                 {res['put_GBps']:6.2f} GB/s")
    print(f"open -> ready       {res['open_to_ready_s']:6.2f} s (staging memory populated)")
    for phase in ("cold", "warm"):
        ratio = f"   {res[f'get_{phase}_GBps'] / best['GBps']:.2f}x device best" if best else ""
        print(f"get, {phase:4s}           {res[f'get_{phase}_GBps']:6.2f} GB/s   "
              f"{res[f'get_{phase}_cpu_s_per_GB']:.3f} CPU-s/GB{ratio}")
    for kind, label in (("huge_pages", "fio, device best"), ("ordinary", "fio, plain buffers")):
        if kind in fio:
            f = fio[kind]
            print(f"{label:19s} {f['GBps']:6.2f} GB/s   {f['cpu_s_per_GB']:.3f} CPU-s/GB   "
                  f"(bs={format_size(f['bs'])}, iodepth={int(f['iodepth'])})")
    if not plan.no_fio and not fio:
        print("fio not installed: no device reference (apt-get install fio)")
    elif not plan.no_fio and "huge_pages" not in fio:
        print("(no huge pages could be reserved for fio: its best is with plain buffers; run as root)")
    print("cold = first restore of a freshly opened pool, warm = its second;\n"
          "page cache dropped before each")
    if res.get("kept") and not plan.block_device:
        print(f"pool kept: {plan.path}\n  look inside: kvpool inspect {plan.path}")
