"""Restore-like sequential reads over vhost-user-blk (eventfd and poll mode) beside io_uring and fio.

Same backing file (default 1 GiB, filled with non-zero data so every read really hits the disk),
page cache dropped before every timed pass.  Each pass reads the whole file as ``--object`` byte
objects (default 8 MiB) with ``--qd`` of them in flight:

  vhost eventfd   VhostBlkTransport, completions through the call eventfds on the loop
  vhost poll      VhostBlkTransport, busy-polling the used rings
  uring           kvpool's own io_uring engine (kvpool.uring_engine.UringEngine), O_DIRECT on the file
  fio             fio --ioengine=io_uring --direct=1 --rw=read, same bs and iodepth

The vhost target is qemu-storage-daemon (``cache.direct=on,aio=io_uring``): a stand-in for SPDK
with the same protocol, but its own data path is the kernel's, so these figures say what the
transport costs the kvpool process, not what SPDK on NVMe would reach.

Reported per engine: GB/s (median of ``--repeat``), and the kvpool process's own CPU seconds per
GB (``getrusage(RUSAGE_SELF)``; fio: its usr+sys).  For vhost also the daemon's CPU-s/GB (from
/proc/PID/stat), because that is where the work went.

    python benchmarks/bench_vhost.py [--path FILE] [--size 1GiB] [--object 8MiB] [--qd 8] [--repeat 3]

Needs root for drop_caches (skipped with a warning otherwise), qemu-storage-daemon and fio on PATH.
Writes benchmarks/results/vhost.json.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
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

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))  # measure the checkout this file lives in
from _util import save, drop_caches

from kvpool.ssd.vhost_transport import VhostBlkTransport, VhostOp
from kvpool.ssd.uring_engine import OP_READ, UringEngine, alloc_aligned, buffer_address
from kvpool.testing.servers import QemuStorageDaemon

MiB = 1 << 20
CLK = os.sysconf("SC_CLK_TCK")


def parse_size(s: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    s = s.strip().lower().removesuffix("ib").removesuffix("b")
    return int(float(s[:-1]) * units[s[-1]]) if s[-1] in units else int(s)




def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK  # utime, stime


def make_file(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size == size:
        return
    chunk = os.urandom(8 * MiB)
    with open(path, "wb") as f:
        f.writelines(chunk for _ in range(size // len(chunk)))
        f.flush()
        os.fsync(f.fileno())


async def run_queue_depth(n_objects: int, qd: int, read_one: Callable[[int, int], Awaitable[int]],
                          obj: int) -> int:
    """Read objects 0..n-1 with ``qd`` workers (worker w owns slot w); returns bytes read."""
    nxt = 0
    done = 0

    async def worker(slot: int) -> None:
        nonlocal nxt, done
        while nxt < n_objects:
            i = nxt
            nxt += 1
            r = await read_one(slot, i * obj)
            if r != obj:
                raise RuntimeError(f"short read at object {i}: {r}")
            done += r

    await asyncio.gather(*(worker(s) for s in range(qd)))
    return done


def run(coro: Any) -> dict[str, float]:
    r: dict[str, float] = asyncio.run(coro)
    gc.collect()  # unmap the finished transport's region now (huge pages are a small reservation)
    return r


async def bench_vhost(sock: str, size: int, obj: int, qd: int, poll: bool, qsd_pid: int,
                      dropped: list[bool], hugetlb: bool = False) -> dict[str, float]:
    t = await VhostBlkTransport.connect(sock, region_bytes=qd * obj, poll=poll, timeout=30,
                                        hugetlb=bool(hugetlb))
    try:
        bufs = [t.alloc(obj) for _ in range(qd)]

        async def read_one(slot: int, off: int) -> int:
            return (await t.submit([VhostOp.read(off, bufs[slot].iov())]))[0]

        dropped.append(drop_caches())
        c0, d0, w0 = self_cpu(), proc_cpu(qsd_pid), time.perf_counter()
        n = await run_queue_depth(size // obj, qd, read_one, obj)
        wall, cpu, dcpu = time.perf_counter() - w0, self_cpu() - c0, proc_cpu(qsd_pid) - d0
        gb = n / 1e9
        return {"gbps": gb / wall, "cpu_s_per_gb": cpu / gb, "target_cpu_s_per_gb": dcpu / gb,
                "kicks": float(t.stats["kicks"]), "kicks_suppressed": float(t.stats["kicks_suppressed"])}
    finally:
        await t.aclose()


async def bench_uring(path: Path, size: int, obj: int, qd: int, dropped: list[bool]) -> dict[str, float]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    eng = UringEngine(entries=max(8, 2 * qd))
    try:
        eng.register_files([fd])
        free0 = hugepages_free()
        bufs = [alloc_aligned(obj) for _ in range(qd)]
        hugetlb = hugepages_free() < free0  # alloc_aligned takes huge pages when enough are free
        addrs = [buffer_address(b) for b in bufs]

        async def read_one(slot: int, off: int) -> int:
            return (await eng.submit([(OP_READ, 0, 0, off, ("iov", [(addrs[slot], obj)]))]))[0]

        dropped.append(drop_caches())
        c0, w0 = self_cpu(), time.perf_counter()
        n = await run_queue_depth(size // obj, qd, read_one, obj)
        wall, cpu = time.perf_counter() - w0, self_cpu() - c0
        gb = n / 1e9
        return {"gbps": gb / wall, "cpu_s_per_gb": cpu / gb, "hugetlb_buffers": float(hugetlb)}
    finally:
        await eng.aclose()
        os.close(fd)


def bench_fio(path: Path, size: int, obj: int, qd: int, dropped: list[bool]) -> dict[str, float]:
    dropped.append(drop_caches())
    out = subprocess.run(
        ["fio", "--name=seq", f"--filename={path}", "--rw=read", f"--bs={obj}", f"--iodepth={qd}",
         "--ioengine=io_uring", "--direct=1", f"--size={size}", "--output-format=json"],
        check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    rt = job["read"]["runtime"] / 1000.0
    gb = job["read"]["io_bytes"] / 1e9
    cpu = (job["usr_cpu"] + job["sys_cpu"]) / 100.0 * rt
    return {"gbps": gb / rt, "cpu_s_per_gb": cpu / gb}


def hugepages_free() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("HugePages_Free:"):
            return int(line.split()[1])
    return 0


def reserve_hugepages(extra: int) -> int | None:
    """Raise vm.nr_hugepages by ``extra`` 2 MiB pages; returns the old value (None if impossible)."""
    p = Path("/proc/sys/vm/nr_hugepages")
    try:
        old = int(p.read_text())
        p.write_text(f"{old + extra}\n")
    except OSError:
        return None
    if hugepages_free() < extra:
        p.write_text(f"{old}\n")
        return None
    return old


def med(runs: list[dict[str, float]]) -> dict[str, Any]:
    keys = runs[0].keys()
    return {k: statistics.median(r[k] for r in runs) for k in keys} | {"runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", type=Path, default=None, help="backing file (default: a temp file in /var/tmp)")
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--object", default="8MiB")
    ap.add_argument("--qd", type=int, default=8)
    ap.add_argument("--queues", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-hugepages", action="store_true",
                    help="do not reserve 2 MiB pages for the hugetlb variant (restored afterwards otherwise)")
    ap.add_argument("--out", default="vhost", help="results file name (benchmarks/results/NAME.json)")
    a = ap.parse_args()
    for tool in ("qemu-storage-daemon", "fio"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not on PATH")
    size, obj = parse_size(a.size), parse_size(a.object)
    tmpdir = tempfile.mkdtemp(prefix="bench_vhost.", dir="/var/tmp")
    path = a.path or Path(tmpdir) / "backing.img"
    make_file(path, size)
    sock = Path(tmpdir) / "vhost.sock"
    qsd = QemuStorageDaemon(path, sock, a.queues, writable=False, capture_stderr=False)
    qsd.start()
    dropped: list[bool] = []
    res: dict[str, list[dict[str, float]]] = {"vhost_eventfd": [], "vhost_poll": [], "uring": [], "fio": []}
    # The region in 2 MiB huge pages (what SPDK needs in iova=pa mode) also lets the target's
    # O_DIRECT reads build large physically contiguous requests; measured beside plain memfd.
    # Twice the pages one connection needs: the target unmaps the previous region asynchronously.
    old_huge = reserve_hugepages(qd_pages := 2 * (a.qd * obj // (2 * MiB) + 2)) if not a.no_hugepages else None
    if old_huge is not None:
        res["vhost_eventfd_hugetlb"] = []
        res["vhost_poll_hugetlb"] = []
    try:
        for _ in range(a.repeat):  # interleaved, so drift hits every engine alike
            res["vhost_eventfd"].append(run(bench_vhost(str(sock), size, obj, a.qd, False, qsd.pid, dropped)))
            res["vhost_poll"].append(run(bench_vhost(str(sock), size, obj, a.qd, True, qsd.pid, dropped)))
            if old_huge is not None:
                res["vhost_eventfd_hugetlb"].append(run(
                    bench_vhost(str(sock), size, obj, a.qd, False, qsd.pid, dropped, hugetlb=True)))
                res["vhost_poll_hugetlb"].append(run(
                    bench_vhost(str(sock), size, obj, a.qd, True, qsd.pid, dropped, hugetlb=True)))
            res["uring"].append(run(bench_uring(path, size, obj, a.qd, dropped)))
            res["fio"].append(bench_fio(path, size, obj, a.qd, dropped))
    finally:
        qsd.stop()
        if old_huge is not None:
            Path("/proc/sys/vm/nr_hugepages").write_text(f"{old_huge}\n")
        if a.path is None:
            shutil.rmtree(tmpdir, ignore_errors=True)
    summary = {k: med(v) for k, v in res.items()}
    u = summary["uring"]["gbps"]
    out = {
        "config": {"size": size, "object": obj, "qd": a.qd, "queues": a.queues, "repeat": a.repeat,
                   "target": "qemu-storage-daemon cache.direct=on aio=io_uring", "caches_dropped": all(dropped),
                   "cpus": os.cpu_count(), "kernel": os.uname().release,
                   "hugepages_reserved": None if old_huge is None else qd_pages,
                   "uring_buffers": "kvpool.buffers.alloc_aligned: hugetlb when free pages suffice (see "
                                    "results.uring.hugetlb_buffers), else THP-advised anonymous memory",
                   "fio_buffers": "fio default (malloc)"},
        "results": summary,
        "ratios": {"vhost_eventfd_over_uring_gbps": summary["vhost_eventfd"]["gbps"] / u,
                   "vhost_poll_over_uring_gbps": summary["vhost_poll"]["gbps"] / u,
                   "vhost_eventfd_over_uring_cpu": summary["vhost_eventfd"]["cpu_s_per_gb"]
                   / summary["uring"]["cpu_s_per_gb"]}
        | ({"vhost_eventfd_hugetlb_over_uring_gbps": summary["vhost_eventfd_hugetlb"]["gbps"] / u,
            "vhost_eventfd_hugetlb_over_uring_cpu": summary["vhost_eventfd_hugetlb"]["cpu_s_per_gb"]
            / summary["uring"]["cpu_s_per_gb"]} if "vhost_eventfd_hugetlb" in summary else {}),
    }
    if not all(dropped):
        print("warning: could not drop caches (not root?); reads may come from the page cache", file=sys.stderr)
    for k, v in summary.items():
        extra = f"  target CPU-s/GB {v['target_cpu_s_per_gb']:.3f}" if "target_cpu_s_per_gb" in v else ""
        print(f"{k:14s} {v['gbps']:6.2f} GB/s  kvpool CPU-s/GB {v['cpu_s_per_gb']:.3f}{extra}")
    save(a.out, out)


if __name__ == "__main__":
    main()
