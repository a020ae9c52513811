"""The ``kvpool`` command: ``bench`` (fill a pool, restore it, compare with the raw device), ``inspect``
(what a pool file or device holds) and ``fsck`` (verify every object's checksums)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .storage.backend import ReadRequest
from .ssd.store import UringBackend
from .storage.buffers import aligned_empty
from .layout import KVLayout
from .pool.facade import KVPool
from .units import format_size, parse_size

_LAYOUTS = {
    "8b": KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype=torch.float16, chunk_tokens=256),
    "70b": KVLayout(num_layers=80, num_kv_heads=8, head_dim=128, dtype=torch.float16, chunk_tokens=256),
    "small": KVLayout(num_layers=8, num_kv_heads=4, head_dim=64, dtype=torch.float16, chunk_tokens=256),
}


class Progress:
    """A one-line progress bar on stderr (plain lines when stderr is not a terminal)."""

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
        print(f"\r{self.label:10s} [{bar:30s}] {pct:3d}% {format_size(self.done):>10s} {rate:6.2f} GB/s",
              end=end, file=sys.stderr, flush=True)


def _fio_best(path: str, size: int) -> dict[str, float] | None:
    if not shutil.which("fio"):
        return None
    best: dict[str, float] | None = None
    for bs, qd in (("1M", 32), ("4M", 8), ("4M", 32)):
        cmd = ["fio", "--name=ref", f"--filename={path}", "--readonly", "--rw=randread", "--ioengine=io_uring",
               "--direct=1", f"--bs={bs}", f"--iodepth={qd}", f"--size={size}", "--time_based", "--runtime=2",
               "--output-format=json"]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
            job = json.loads(out[out.index("{"):])["jobs"][0]
        except (subprocess.SubprocessError, ValueError, KeyError, IndexError):
            continue
        gbps = job["read"]["bw_bytes"] / 1e9
        cpu_s_per_gb = (job["usr_cpu"] + job["sys_cpu"]) / 100 * job["job_runtime"] / 1e3 / max(
            job["read"]["io_bytes"] / 1e9, 1e-9)
        if best is None or gbps > best["GBps"]:
            best = {"GBps": gbps, "cpu_s_per_GB": cpu_s_per_gb, "bs": float(parse_size(bs.replace("M", "MiB"))),
                    "iodepth": float(qd)}
    return best


def _drop_caches() -> None:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass  # not root: O_DIRECT reads bypass the page cache anyway


async def _bench(args: argparse.Namespace) -> dict[str, Any]:
    layout = _LAYOUTS[args.layout]
    fill = parse_size(args.size)
    chunks_per_prompt = args.prompt_chunks
    n_prompts = max(1, fill // (layout.chunk_nbytes * chunks_per_prompt))
    total = n_prompts * chunks_per_prompt * layout.chunk_nbytes
    capacity = int(total * 1.15) + (64 << 20)
    tmpdir = None
    if args.path:
        path = args.path
    else:
        tmpdir = tempfile.mkdtemp(prefix="kvpool-bench-", dir=args.dir)
        path = os.path.join(tmpdir, "pool.kv")
    spec = f"uring://{path}" + ("" if path.startswith("/dev/") else f"?capacity={capacity}")
    print(f"kvpool bench: {args.layout} layout ({format_size(layout.chunk_nbytes)} per chunk), "
          f"{n_prompts} prompts x {chunks_per_prompt} chunks = {format_size(total)} on {path}", file=sys.stderr)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 128_000, chunks_per_prompt * layout.chunk_tokens) for _ in range(n_prompts)]
    kv = torch.randn(layout.kv_shape(chunks_per_prompt * layout.chunk_tokens)).to(layout.dtype)
    res: dict[str, Any] = {"layout": args.layout, "bytes": total, "path": path}
    try:
        async with await KVPool.open(layout=layout, model_id="kvpool-bench", backends=[spec]) as pool:
            tier = pool.tiers[0]
            assert isinstance(tier, UringBackend)
            prog = Progress("fill", total)
            t0 = time.perf_counter()
            for i, p in enumerate(prompts):
                kv[0, 0, 0, 0, 0] = float(i)  # distinct contents per prompt
                await pool.put(p, kv)
                prog.advance(chunks_per_prompt * layout.chunk_nbytes)
            await pool.flush()
            res["put_GBps"] = total / (time.perf_counter() - t0) / 1e9
            ref = _fio_best(path, tier._geo.d_off + tier.used_bytes if tier._geo else total) if not args.no_fio else None
            # page-aligned, THP-advised destinations the SSD can DMA straight into, faulted in before timing
            shape = layout.kv_shape(chunks_per_prompt * layout.chunk_tokens)
            outs = [aligned_empty(shape, layout.dtype).zero_() for _ in range(min(n_prompts, args.concurrency))]
            times, cpus = [], []
            prog = Progress("restore", total * args.repeat)
            for _ in range(args.repeat):
                _drop_caches()
                c0, t0 = time.process_time(), time.perf_counter()
                for s in range(0, n_prompts, len(outs)):
                    batch = prompts[s : s + len(outs)]
                    got = await asyncio.gather(*(pool.get_into(p, o) for p, o in zip(batch, outs)))
                    assert all(g == chunks_per_prompt * layout.chunk_tokens for g in got)
                    prog.advance(len(batch) * chunks_per_prompt * layout.chunk_nbytes)
                times.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
            res["get_into_GBps"] = total / float(np.median(times)) / 1e9
            res["get_into_cpu_s_per_GB"] = float(np.median(cpus)) / (total / 1e9)
            if ref:
                res["fio"] = ref
                res["get_into_vs_fio"] = res["get_into_GBps"] / ref["GBps"]
            res["tier"] = tier.stats()
    finally:
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)
    return res


async def _inspect(args: argparse.Namespace) -> dict[str, Any]:
    async with UringBackend(args.path) as b:
        return b.stats()


async def _fsck(args: argparse.Namespace) -> dict[str, Any]:
    async with UringBackend(args.path) as b:
        keys = [k async for k in b.keys()]
        bad = 0
        prog = Progress("fsck", sum(b._index[k].length for k in keys))
        for k in keys:
            n = b._index[k].length
            ok = await b.read_many([ReadRequest(k, torch.empty(n, dtype=torch.uint8))])
            if not ok[0]:
                bad += 1
                if args.repair:
                    await b.delete(k)
            prog.advance(n)
        return {"objects": len(keys), "bad": bad, "repaired": bad if args.repair else 0}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvpool", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="fill a uring:// pool, restore it, compare with the raw device (fio)")
    b.add_argument("--path", help="pool file or block device (default: a temp file, removed afterwards)")
    b.add_argument("--dir", default=None, help="directory for the temp pool file (must not be tmpfs)")
    b.add_argument("--size", default="1GiB", help="bytes of KV to store (default 1GiB)")
    b.add_argument("--layout", choices=sorted(_LAYOUTS), default="8b")
    b.add_argument("--prompt-chunks", type=int, default=8, help="chunks per prompt (default 8)")
    b.add_argument("--concurrency", type=int, default=4, help="prompts restored at once")
    b.add_argument("--repeat", type=int, default=3)
    b.add_argument("--no-fio", action="store_true", help="skip the fio reference")
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    i = sub.add_parser("inspect", help="print what a pool file or device holds")
    i.add_argument("path")
    f = sub.add_parser("fsck", help="read and verify every object of a pool file or device")
    f.add_argument("path")
    f.add_argument("--repair", action="store_true", help="delete objects that fail verification")
    args = ap.parse_args(argv)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    if args.cmd == "bench":
        res = runner(_bench(args))
        if args.json:
            print(json.dumps(res, indent=2, default=str))
        else:
            print(f"put        {res['put_GBps']:6.2f} GB/s")
            print(f"get_into   {res['get_into_GBps']:6.2f} GB/s   {res['get_into_cpu_s_per_GB']:.3f} CPU-s/GB")
            if "fio" in res:
                fio = res["fio"]
                print(f"fio best   {fio['GBps']:6.2f} GB/s   {fio['cpu_s_per_GB']:.3f} CPU-s/GB  "
                      f"(randread, ordinary buffers, bs={format_size(fio['bs'])} iodepth={int(fio['iodepth'])})")
                print(f"kvpool / fio = {res['get_into_vs_fio']:.2f}")
            elif not args.no_fio:
                print("fio not installed: no device reference (apt-get install fio)")
        return 0
    out = runner(_inspect(args) if args.cmd == "inspect" else _fsck(args))
    print(json.dumps(out, indent=2, default=str))
    return 0 if out.get("bad", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
