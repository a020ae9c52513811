"""Striped SSD tier: restore bandwidth of bandwidth-weighted striping against equal striping and against what
the devices can do alone (issue: striping across SSDs of different speeds).

Testbed: two loop block devices throttled (cgroup v1 blkio) to 300 and 600 MB/s, made with
``/work/shared/testbed/devices up DIR 300,600 1024``; everything measured runs inside the throttled cgroup
(this script re-executes itself under ``devices run DIR -- python bench_striping.py --inner``), and the
devices are always taken down at the end. Both devices are filled with zeros first (unthrottled), so that
every read, fio's and kvpool's, hits written blocks of the backing file.

Reference, in the same run: fio on each device alone, randread, ioengine=io_uring, direct=1, bs 1M,
iodepth 16, 3 s (``--fio-repeat`` runs each; the best is kept). "fio sum" = the two figures added.

kvpool: a pool whose only tier is a ``StripedBackend`` over two ``uring://`` raw block devices, 8B-class
layout (32 layers, 8 KV heads, head_dim 128, fp16, 256-token chunks: 32 MiB objects), ``--gib`` of
objects (prompts of 4 chunks). Two placements, each on freshly formatted devices:

  weighted   weights from the bandwidth probe at open (measured inside the cgroup; no hints given)
  equal      weights 1:1 (plain round-robin striping: each device holds half of each object)

Restore, as users run it: a pool opened just before each timed restore (``await pool.ready()``, reported
separately), page cache dropped, ``pool.get_into`` of every prompt concurrently into tensors from
``pool.empty``; "cold" is the first restore of that pool (the reported figure), "warm" its second. Medians of
``--repeat``; no untimed warm-up anywhere. Also reported: put bandwidth, and what a packing copy of one chunk
view would cost (the striped tier splits strided chunk views on row boundaries instead: ``contiguous_copies``).
fio runs at 256 KiB, 1 MiB and 4 MiB requests from huge-page and ordinary memory; each device's best counts.

Targets: weighted >= 0.9 x fio sum, and weighted >= 1.2 x equal.

    python benchmarks/bench_striping.py [--gib 1] [--repeat 5] [--dir /tmp/kvtb]

Needs root (loop devices, cgroups), fio on PATH. Writes benchmarks/results/striping.json and
docs/striping.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))  # measure the checkout this file lives in, whatever is pip-installed

DEVICES = "/work/shared/testbed/devices"
RATES = (300, 600)
DEV_MIB = 1024
MB = 1e6
GB = 1e9
MiB = 1 << 20
TARGET_VS_FIO = 0.9
TARGET_VS_EQUAL = 1.2
# uring's default requests (capped at each device's max_sectors_kb at open), and requests of 1 MiB like fio's
REGIMES: tuple[tuple[str, int | None], ...] = (("default_requests", None), ("requests_1MiB", 1 * MiB))


def log(*a: Any) -> None:
    print(*a, flush=True)


# --- outer: set up the testbed, run the measurement inside the cgroup, tear down ---------------------------
def outer(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise SystemExit("needs root (loop devices, blkio cgroup)")
    for tool in ("fio", "losetup"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found on PATH")
    tb = args.dir
    rates = ",".join(str(r) for r in RATES)
    t0 = time.time()
    try:
        up = subprocess.run([DEVICES, "up", tb, rates, str(DEV_MIB)], check=True, capture_output=True, text=True)
        devs = [line.strip() for line in up.stdout.splitlines() if line.strip()]
        if len(devs) != len(RATES):
            raise SystemExit(f"expected {len(RATES)} devices, got {devs}")
        log(f"testbed {tb}: {', '.join(f'{d} @ {r} MB/s' for d, r in zip(devs, RATES))}")
        for d in devs:  # unthrottled (this process is outside the cgroup): every block written once
            subprocess.run(["dd", "if=/dev/zero", f"of={d}", "bs=4M", f"count={DEV_MIB // 4}", "oflag=direct",
                            "status=none"], check=True)
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out_json = f.name
        cmd = [DEVICES, "run", tb, "--", sys.executable, str(Path(__file__).resolve()), "--inner",
               "--devs", ",".join(devs), "--out", out_json, "--gib", str(args.gib), "--repeat", str(args.repeat),
               "--fio-runtime", str(args.fio_runtime), "--fio-repeat", str(args.fio_repeat), "--dir", tb]
        log("running inside the throttled cgroup: " + " ".join(cmd[4:]))
        subprocess.run(cmd, check=True)
        res = json.loads(Path(out_json).read_text())
        os.unlink(out_json)
    finally:
        subprocess.run([DEVICES, "down", tb], check=False)
        try:
            os.rmdir(tb)  # only if nothing else lives there
        except OSError:
            pass
        log(f"testbed {tb} taken down")
    res["wall_s"] = time.time() - t0
    res["command"] = "python benchmarks/bench_striping.py " + " ".join(sys.argv[1:])
    from _util import save

    p = save("striping", res)
    log(f"wrote {p}")
    if args.plot:
        plot(res, Path(args.plot))
        log(f"wrote {args.plot}")
    return 0


# --- inner: the measurement ---------------------------------------------------------------------------------
def run_fio(dev: str, runtime: float, iomem: str, bs: str = "1M") -> dict[str, Any]:
    cmd = ["fio", "--name=ref", f"--filename={dev}", "--readonly", "--rw=randread", "--ioengine=io_uring",
           "--direct=1", f"--bs={bs}", "--iodepth=16", f"--iomem={iomem}", f"--size={DEV_MIB}M", "--time_based",
           f"--runtime={runtime}", "--norandommap", "--output-format=json"]
    p = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if p.returncode != 0:  # e.g. huge pages taken by someone else meanwhile: that configuration does not count
        log(f"fio {' '.join(cmd[2:])} failed: {(p.stderr or p.stdout).strip()[-200:]}")
        return {"MBps": 0.0, "bs": bs, "iomem": iomem, "cmd": " ".join(cmd), "error": True}
    j = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
    return {"MBps": j["read"]["bw_bytes"] / MB, "bs": bs, "iomem": iomem, "cmd": " ".join(cmd)}


def _hugepages(n: int | None = None) -> int:
    if n is not None:
        with open("/proc/sys/vm/nr_hugepages", "w") as f:
            f.write(str(n))
    with open("/proc/sys/vm/nr_hugepages") as f:
        return int(f.read())


def fio_reference(devs: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """fio on each device alone. Its 1 MiB buffers are huge pages when they can be reserved: a 1 MiB request
    from 4 KiB pages has more segments than a loop device takes (128), is split, and the testbed's throttle
    then charges it about twice (fio in ordinary memory swings between the full and half rate)."""
    old = _hugepages()
    iomems = ["malloc"]
    try:
        try:
            if _hugepages(old + 40) >= old + 40:
                iomems.insert(0, "mmaphuge")
        except OSError:
            pass
        out = []
        for d, r in zip(devs, RATES):
            # several request sizes and both memory kinds; the device's figure is the best of them all
            runs = [run_fio(d, args.fio_runtime, iomem, bs) for iomem in iomems for bs in ("256K", "1M", "4M")
                    for _ in range(args.fio_repeat)]
            best = max(runs, key=lambda x: x["MBps"])
            out.append({"path": d, "throttle_MBps": r, "MBps": best["MBps"], "best_bs": best["bs"],
                        "best_iomem": best["iomem"],
                        "runs": [{k: x[k] for k in ("bs", "iomem", "MBps")} for x in runs], "cmd": best["cmd"]})
            log(f"fio {d} (throttled to {r} MB/s): best {best['MBps']:.0f} MB/s (bs={best['bs']}, "
                f"iomem={best['iomem']}); " + ", ".join(f"{x['bs']}/{x['iomem']} {x['MBps']:.0f}" for x in runs))
        return out
    finally:
        try:
            _hugepages(old)
        except OSError:
            pass


def wipe(dev: str) -> None:
    """Blank a device's superblock: the next open formats a new, empty pool."""
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
    try:
        import mmap

        buf = mmap.mmap(-1, 4096)
        os.write(fd, buf)
        os.fsync(fd)
    finally:
        os.close(fd)


async def measure_mode(name: str, devs: list[str], weights: list[float] | None, args: argparse.Namespace,
                       kv: Any, tokens: list[list[int]], max_io: int | None) -> dict[str, Any]:
    """One placement on freshly formatted devices; ``max_io`` caps uring's request size (its module constant,
    set for this run only; ``None``: uring's default)."""
    import kvpool.ssd.store as uring_mod

    for d in devs:
        wipe(d)
    default_io = uring_mod._MAX_IO
    if max_io is not None:
        uring_mod._MAX_IO = max_io
    try:
        return await _measure_mode(name, devs, weights, args, kv, tokens, max_io or default_io)
    finally:
        uring_mod._MAX_IO = default_io
        shutil.rmtree(Path(args.dir) / f"bw-{os.getpid()}-{max_io or default_io}", ignore_errors=True)


async def _measure_mode(name: str, devs: list[str], weights: list[float] | None, args: argparse.Namespace,
                        kv: Any, tokens: list[list[int]], max_io: int) -> dict[str, Any]:
    import gc

    import torch

    from kvpool import KVLayout, KVPool
    from kvpool.ssd.store import UringBackend
    from kvpool.striped.backend import StripedBackend
    from kvpool.striped.placement import BandwidthProbe

    layout = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype=torch.float16, chunk_tokens=256)
    total = sum(kv_i.numel() * kv_i.element_size() for kv_i in kv)
    # a fresh probe cache per placement: the weights are measured here, inside the throttled cgroup
    probe = BandwidthProbe(nbytes=128 * MiB, object_nbytes=8 * MiB,
                           cache_dir=Path(args.dir) / f"bw-{os.getpid()}-{max_io}")
    cfg = {"staging_bytes": -(-total // (2 * MiB)) * 2 * MiB + 64 * MiB}

    async def open_pool() -> tuple[Any, Any]:
        # the devices were blanked just before (wipe): formatting them is what this benchmark means to do
        tier = StripedBackend([UringBackend(d, format=True) for d in devs], weights=weights, probe=probe)
        return tier, await KVPool.open(layout=layout, model_id="bench-striping", backends=[tier], config=cfg)

    t_open = time.perf_counter()
    tier, pool = await open_pool()
    t_open = time.perf_counter() - t_open
    res: dict[str, Any] = {"name": name, "weights": list(tier.weights), "weight_sources": list(tier.weight_sources),
                           "first_open_s": t_open, "uring_request_bytes": max_io}
    log(f"[{name}] weights {', '.join(f'{w / MB:.0f}' if w > 100 else f'{w:g}' for w in tier.weights)} "
        f"({', '.join(tier.weight_sources)}), open {t_open:.2f} s")
    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(pool.put(t, x) for t, x in zip(tokens, kv)))
        t_put = time.perf_counter() - t0
        res["put_MBps"] = total / t_put / MB
        st = tier.stats()
        res["contiguous_copies"] = st["contiguous_copies"]
        res["degraded_writes"] = st["degraded_writes"]
        res["device_bytes"] = [c["used_bytes"] for c in st["children"]]
        res["share_on_device"] = [u / sum(res["device_bytes"]) for u in res["device_bytes"]]
        log(f"[{name}] put {total / MiB:.0f} MiB: {res['put_MBps']:.0f} MB/s; bytes per device "
            f"{[round(u / MiB) for u in res['device_bytes']]} MiB; packing copies {res['contiguous_copies']}")
    finally:
        await pool.close()

    # Every timed restore: a pool opened just before it (ready waited for and reported), page cache dropped,
    # into tensors from pool.empty; "cold" is that pool's first restore, "warm" its second.
    runs: dict[str, list[float]] = {"cold": [], "warm": [], "ready_s": []}
    for rep in range(args.repeat):
        t0 = time.perf_counter()
        tier, pool = await open_pool()
        await pool.ready()
        runs["ready_s"].append(time.perf_counter() - t0)
        try:
            outs = [pool.empty(len(t)) for t in tokens]
            for phase in ("cold", "warm"):
                drop_caches()
                t0 = time.perf_counter()
                got = await asyncio.gather(*(pool.get_into(t, o) for t, o in zip(tokens, outs)))
                runs[phase].append(total / (time.perf_counter() - t0) / MB)
                assert all(g == len(t) for g, t in zip(got, tokens)), got
            if rep == 0:
                for o, x in zip(outs, kv):
                    assert torch.equal(o, x), "restored KV differs"
            res["temp_reads"] = tier.stats()["temp_reads"]
            del outs
            gc.collect()
        finally:
            await pool.close()
    for phase in ("cold", "warm"):
        res[f"restore_{phase}_MBps_runs"] = runs[phase]
        res[f"restore_{phase}_MBps"] = statistics.median(runs[phase])
        log(f"[{name}] restore {phase}: median {res[f'restore_{phase}_MBps']:.0f} MB/s "
            f"(runs {', '.join(f'{x:.0f}' for x in runs[phase])})")
    res["restore_MBps"] = res["restore_cold_MBps"]
    res["ready_s"] = statistics.median(runs["ready_s"])
    return res


def drop_caches() -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
    except OSError:
        pass


async def inner_async(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from kvpool.storage.buffers import aligned_empty

    devs = args.devs.split(",")
    res: dict[str, Any] = {"devices": [{"path": d, "throttle_MBps": r} for d, r in zip(devs, RATES)]}
    # fio reference, each device alone
    fio = fio_reference(devs, args)
    res["fio"] = fio
    res["fio_sum_MBps"] = sum(f["MBps"] for f in fio)

    # the KV: prompts of 4 chunks of 32 MiB
    chunk_tokens, per_prompt = 256, 4
    n_prompts = max(1, round(args.gib * 1024 / (32 * per_prompt)))
    g = torch.Generator().manual_seed(0)
    # one random chunk, stamped differently in every chunk slot (random KV of 1 GiB takes long on 2 cores)
    base = torch.randn((32, 2, chunk_tokens, 8, 128), generator=g).half()
    kv = []
    tokens = []
    for p in range(n_prompts):
        x = aligned_empty((32, 2, chunk_tokens * per_prompt, 8, 128), torch.float16)
        for c in range(per_prompt):
            x[:, :, c * chunk_tokens : (c + 1) * chunk_tokens].copy_(base)
            x[:, :, c * chunk_tokens, 0, 0] = float(p * per_prompt + c)
        kv.append(x)
        tokens.append([p * 100_000 + i for i in range(chunk_tokens * per_prompt)])
    total = sum(x.numel() * 2 for x in kv)
    res["object_MiB"] = 32
    res["objects"] = n_prompts * per_prompt
    res["total_MiB"] = total / MiB
    # what a packing copy of one strided chunk view costs (the striped tier avoids it by splitting on rows)
    view = kv[0][:, :, :chunk_tokens]
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        view.contiguous()
        ts.append(time.perf_counter() - t0)
    res["packing_copy_ms_per_32MiB"] = statistics.median(ts) * 1e3

    # Two request regimes. The testbed's blkio throttle charges a request that the block layer splits
    # (larger than the loop device's max_sectors_kb, 1280 KiB) about twice: uring's default requests of up
    # to 8 MiB then run at half the throttled rate, while fio's 1 MiB requests do not (when its buffer is
    # physically contiguous). So both are measured: uring's default, and requests capped at 1 MiB like fio's.
    for regime, max_io in REGIMES:
        w_res = await measure_mode(f"weighted/{regime}", devs, None, args, kv, tokens, max_io)
        e_res = await measure_mode(f"equal/{regime}", devs, [1.0, 1.0], args, kv, tokens, max_io)
        w, e = w_res["restore_cold_MBps"], e_res["restore_cold_MBps"]
        res[regime] = {
            "weighted": w_res,
            "equal": e_res,
            "ratios": {
                "weighted_vs_fio_sum": w / res["fio_sum_MBps"],
                "weighted_vs_equal": w / e,
                "equal_vs_fio_sum": e / res["fio_sum_MBps"],
                "weighted_warm_vs_fio_sum": w_res["restore_warm_MBps"] / res["fio_sum_MBps"],
            },
            "targets_met": w / res["fio_sum_MBps"] >= TARGET_VS_FIO and w / e >= TARGET_VS_EQUAL,
        }
    res["targets"] = {"weighted_vs_fio_sum": TARGET_VS_FIO, "weighted_vs_equal": TARGET_VS_EQUAL}
    return res


def inner(args: argparse.Namespace) -> int:
    res = asyncio.run(inner_async(args))
    for regime in ("default_requests", "requests_1MiB"):
        g = res[regime]
        r = g["ratios"]
        log(f"{regime}: fio sum {res['fio_sum_MBps']:.0f} MB/s | weighted {g['weighted']['restore_MBps']:.0f} MB/s "
            f"({r['weighted_vs_fio_sum']:.2f}x fio sum, target {TARGET_VS_FIO}) | equal "
            f"{g['equal']['restore_MBps']:.0f} MB/s | weighted/equal {r['weighted_vs_equal']:.2f}x "
            f"(target {TARGET_VS_EQUAL}) | targets {'met' if g['targets_met'] else 'MISSED'}")
    Path(args.out).write_text(json.dumps(res, indent=2))
    return 0


# --- plot ---------------------------------------------------------------------------------------------------
def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f0, f1 = res["fio"]
    d, q = res["default_requests"], res["requests_1MiB"]
    labels = [
        f"fio dev0\n({f0['throttle_MBps']} MB/s cap)",
        f"fio dev1\n({f1['throttle_MBps']} MB/s cap)",
        "fio sum",
        "striped equal\n(uring default\nrequests), cold",
        "striped weighted\n(uring default\nrequests), cold",
        "striped equal\n(requests\n<= 1 MiB), cold",
        "striped weighted\n(requests\n<= 1 MiB), cold",
    ]
    vals = [f0["MBps"], f1["MBps"], res["fio_sum_MBps"], d["equal"]["restore_MBps"], d["weighted"]["restore_MBps"],
            q["equal"]["restore_MBps"], q["weighted"]["restore_MBps"]]
    colors = ["#9e9e9e", "#9e9e9e", "#616161", "#fddbc7", "#92c5de", "#ef8a62", "#2166ac"]
    fig, ax = plt.subplots(figsize=(10, 5))
    x = list(range(len(vals)))
    bars = ax.bar(x, vals, color=colors)
    ax.set_xticks(x, labels, fontsize=8)
    for b_, v in zip(bars, vals):
        ax.text(b_.get_x() + b_.get_width() / 2, v, f"{v:.0f}", ha="center", va="bottom", fontsize=9)
    ax.axhline(TARGET_VS_FIO * res["fio_sum_MBps"], ls="--", lw=1, color="#2166ac")
    ax.text(-0.4, TARGET_VS_FIO * res["fio_sum_MBps"], f"target: {TARGET_VS_FIO} x fio sum", va="bottom",
            ha="left", fontsize=8, color="#2166ac")
    ax.set_ylabel("first restore in a fresh pool (get_into), MB/s")
    rd, rq = d["ratios"], q["ratios"]
    ax.set_title(
        f"Striped uring tier over two throttled loop devices ({res['total_MiB'] / 1024:.1f} GiB of 32 MiB objects)\n"
        f"weighted: {rq['weighted_vs_fio_sum']:.2f} x fio sum, {rq['weighted_vs_equal']:.2f} x equal (1 MiB requests); "
        f"{rd['weighted_vs_fio_sum']:.2f} x, {rd['weighted_vs_equal']:.2f} x (default requests)",
        fontsize=9,
    )
    ax.set_ylim(0, max(vals) * 1.15)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0, help="GiB of KV objects in the pool")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--fio-runtime", type=float, default=3.0)
    ap.add_argument("--fio-repeat", type=int, default=1)
    ap.add_argument("--dir", default="/tmp/kvtb", help="testbed directory (device images, cgroup name)")
    ap.add_argument("--plot", default=str(REPO / "docs" / "striping.png"))
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--devs", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    return inner(args) if args.inner else outer(args)


if __name__ == "__main__":
    raise SystemExit(main())
