"""``pool.get`` restores over ``vhost://`` beside ``uring://`` on the same backing file, same run (issue 12).

One pool file is filled once (over ``uring://``), then restored by a freshly opened ``KVPool`` per case, page
cache dropped before every timed restore:

  uring           ``uring://FILE`` (io_uring, O_DIRECT in the kvpool process)
  vhost eventfd   ``vhost://SOCK`` to a qemu-storage-daemon on FILE (``cache.direct=on,aio=io_uring``),
                  completions through the call eventfds; the pool's staging arena (huge pages) is in the
                  memory table, so the daemon reads straight into the ``get`` results
  vhost poll      the same with ``?poll=1``
  vhost eventfd, 4 KiB-page arena
                  huge pages withdrawn before the pool opens: arena and region are ordinary shmem

Reported per case: GB/s, the kvpool process's CPU-s/GB (getrusage RUSAGE_SELF, usr+sys), direct and bounce
reads (the store's counters), whether the arena was hugetlb and shared and, for vhost, the daemon's CPU-s/GB
(/proc/PID/stat). qemu-storage-daemon's own data path is the kernel's (it stands in for SPDK's protocol, not
for SPDK's NVMe driver), so the vhost GB/s here is bounded by that daemon on this disk.

    python benchmarks/bench_vhost_store.py [--dir /var/tmp] [--prompts 6] [--chunks 4] [--repeat 2]

Needs root for drop_caches and qemu-storage-daemon on PATH. Writes benchmarks/results/vhost_store.json.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _util import drop_caches, save  # noqa: E402

import kvpool  # noqa: E402
from kvpool.testing.servers import QemuStorageDaemon, qemu_storage_daemon  # noqa: E402

MiB, GB = 1 << 20, 1e9
CLK = os.sysconf("SC_CLK_TCK")


def cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_pid(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def layout() -> kvpool.KVLayout:
    return kvpool.KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype=torch.float16, chunk_tokens=256)


def prompts_of(n: int, chunks: int) -> list[np.ndarray]:
    T = chunks * layout().chunk_tokens
    return [np.arange(T, dtype=np.int64) + i * 1_000_000 for i in range(n)]


async def fill(spec: str, prompts: list[np.ndarray], chunks: int) -> None:
    T = chunks * layout().chunk_tokens
    async with await kvpool.KVPool.open(layout=layout(), model_id="bench-vhost", backends=[spec]) as pool:
        kv = torch.randn(layout().kv_shape(T), dtype=torch.float16)
        for i, p in enumerate(prompts):
            kv[:, :, :, 0, 0] = float(i)
            await pool.put(p, kv)
        await pool.flush()
        for p in prompts:
            assert await pool.lookup(p) == T


async def restore(spec: str, prompts: list[np.ndarray], chunks: int, daemon_pid: int | None) -> dict[str, Any]:
    T = chunks * layout().chunk_tokens
    total = len(prompts) * chunks * layout().chunk_nbytes
    # the staging arena holds every result: no request falls back to fresh (first-touch) memory
    cfg = {"staging_bytes": total + 256 * MiB}
    pool = await kvpool.KVPool.open(layout=layout(), model_id="bench-vhost", backends=[spec], config=cfg)
    try:
        await pool.ready()
        drop_caches()
        tier = pool.tiers[0]
        s0 = tier.stats()
        c0, d0 = cpu_self(), cpu_pid(daemon_pid) if daemon_pid else 0.0
        t0 = time.perf_counter()
        got = await asyncio.gather(*(pool.get(p) for p in prompts))
        dt = time.perf_counter() - t0
        c1, d1 = cpu_self(), cpu_pid(daemon_pid) if daemon_pid else 0.0
        s1 = tier.stats()
        for i, x in enumerate(got):
            assert x is not None and x.shape[2] == T and bool((x[:, :, :, 0, 0] == float(i)).all()), "wrong bytes"
        del got
        gc.collect()
        out = {"s": dt, "GBps": total / dt / GB, "cpu_s_per_GB": (c1 - c0) / (total / GB),
               "direct": s1["direct_reads"] - s0["direct_reads"], "bounce": s1["bounce_reads"] - s0["bounce_reads"],
               "misses": s1["misses"] - s0["misses"], "arena_hugetlb": pool._staging.hugetlb,
               "arena_shared": bool(s1.get("arena_shared", False)),
               "region_hugetlb": bool(s1.get("region_hugetlb", False))}
        if daemon_pid:
            out["daemon_cpu_s_per_GB"] = (d1 - d0) / (total / GB)
        return out
    finally:
        await pool.close()


def set_hugepages(n: int) -> None:
    """Set vm.nr_hugepages (root); pages still mapped stay until unmapped."""
    try:
        Path("/proc/sys/vm/nr_hugepages").write_text(f"{n}\n")
    except OSError:
        pass


def reserve_hugepages(n: int) -> int:
    """Make at least ``n`` 2 MiB pages available (root); the number free afterwards."""
    p = Path("/proc/sys/vm/nr_hugepages")
    try:
        have = int(p.read_text())
        if have < n:
            p.write_text(f"{n}\n")
    except OSError:
        pass
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("HugePages_Free:"):
            return int(line.split()[1])
    return 0


def med(runs: list[dict[str, Any]], k: str) -> float:
    return statistics.median(r[k] for r in runs)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--queues", type=int, default=2)
    ap.add_argument("--bounce", default=None,
                    help="bounce= for every spec (default: each scheme's own; restores into the arena bypass it)")
    ap.add_argument("--opts", default="", help="spec options added to every case, e.g. verify=0")
    ap.add_argument("--name", default="vhost_store", help="results file name (benchmarks/results/NAME.json)")
    ap.add_argument("--hugepages", type=int, default=1024,
                    help="2 MiB huge pages to reserve (the pool's staging arena takes them first, then the shared "
                    "region; 0: ordinary memory only)")
    args = ap.parse_args()
    if qemu_storage_daemon() is None:
        sys.exit("qemu-storage-daemon not on PATH (apt-get install qemu-system-common)")
    work = Path(tempfile.mkdtemp(dir=args.dir, prefix="kvpool-vhost-"))
    image, sock = work / "pool.img", work / "vhost.sock"
    prompts = prompts_of(args.prompts, args.chunks)
    total = args.prompts * args.chunks * layout().chunk_nbytes
    capacity = total + total // 4 + 64 * MiB
    try:
        await fill(f"uring://{image}?capacity={capacity}&format=1", prompts, args.chunks)
        old_huge = int(Path("/proc/sys/vm/nr_hugepages").read_text())
        huge = reserve_hugepages(args.hugepages) if args.hugepages else 0
        # (case, spec options, withdraw huge pages first so the arena and region are 4 KiB-page shmem)
        modes = [("vhost_eventfd", "poll=0&hugetlb=0", False), ("vhost_poll", "poll=1&hugetlb=0", False)]
        if huge:
            # 4 KiB pages cap the daemon's O_DIRECT requests at the disk's 254 segments (~1 MiB); huge pages
            # do not, and SPDK needs them anyway (iova=pa)
            modes = [("vhost_eventfd", "poll=0&hugetlb=1", False), ("vhost_poll", "poll=1&hugetlb=1", False),
                     ("vhost_eventfd_4k_pages", "poll=0&hugetlb=0", True)]
        # spec options every case shares (bounce size, --opts)
        extra = (f"&bounce={args.bounce}" if args.bounce else "") + (f"&{args.opts}" if args.opts else "")
        cases: dict[str, list[dict[str, Any]]] = {"uring": [], **{m: [] for m, _, _ in modes}}
        for _ in range(args.repeat):  # interleaved, so drift in the disk hits every case alike
            cases["uring"].append(await restore(f"uring://{image}?{extra[1:]}", prompts, args.chunks, None))
            gc.collect()
            for mode, opts, small_pages in modes:
                d = QemuStorageDaemon(image, sock, args.queues, capture_stderr=False)
                d.start()
                try:
                    if small_pages:
                        set_hugepages(0)
                    spec = f"vhost://{sock}?{opts}{extra}&queues={args.queues}"
                    cases[mode].append(await restore(spec, prompts, args.chunks, d.pid))
                finally:
                    d.kill()
                    if small_pages:
                        reserve_hugepages(args.hugepages)
                gc.collect()  # the closed pool's arena and region go back before the next case maps its own
                r = cases[mode][-1]
                if huge and r["arena_hugetlb"] == small_pages:
                    print(f"warning: {mode}: the arena got {'huge' if small_pages else '4 KiB'} pages", file=sys.stderr)
        summary: dict[str, dict[str, Any]] = {
            k: {m: med(v, m) for m in v[0] if isinstance(v[0][m], float)} for k, v in cases.items()}
        for k, v in cases.items():  # what every run of the case had (page sizes, sharing), and its read counts
            for flag in ("arena_hugetlb", "arena_shared", "region_hugetlb"):
                summary[k][flag] = all(r[flag] for r in v) if all(r[flag] == v[0][flag] for r in v) else "mixed"
            summary[k]["direct"], summary[k]["bounce"] = v[0]["direct"], v[0]["bounce"]
        for k in cases:
            summary[k]["x_uring_GBps"] = summary[k]["GBps"] / summary["uring"]["GBps"]
        res = {"opts": args.opts, "bytes": total, "prompts": args.prompts, "chunks": args.chunks, "queues": args.queues,
               "repeat": args.repeat, "bounce": args.bounce or "scheme default", "hugepages_reserved": huge,
               "cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg(), "daemon": "qemu-storage-daemon cache.direct=on aio=io_uring",
               "summary": summary, "runs": cases}
        path = save(args.name, res)
        print(f"{'case':<24}{'GB/s':>7}{'x uring':>9}{'CPU-s/GB':>10}{'daemon CPU-s/GB':>17}"
              f"{'direct':>8}{'bounce':>8}  arena")
        for k, s in summary.items():
            print(f"{k:<24}{s['GBps']:>7.2f}{s.get('x_uring_GBps', 1.0):>9.2f}{s['cpu_s_per_GB']:>10.3f}"
                  f"{s.get('daemon_cpu_s_per_GB', float('nan')):>17.3f}{s['direct']:>8}{s['bounce']:>8}  "
                  f"{'hugetlb' if s['arena_hugetlb'] is True else s['arena_hugetlb'] or '4k'}"
                  f"{', shared' if s['arena_shared'] is True else ''}")
        print(f"wrote {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if args.hugepages:
            try:
                Path("/proc/sys/vm/nr_hugepages").write_text(f"{old_huge}\n")
            except (OSError, NameError):
                pass


if __name__ == "__main__":
    asyncio.run(main())
