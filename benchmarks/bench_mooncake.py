"""Remote tier (mooncake://) against the raw Mooncake Store client on the same cluster, in the same run.

Figures (medians; the contenders are interleaved so drift hits them alike):
  get   MooncakeBackend.read_into of a 32 MiB object (4 MiB parts, every part verified, copied into a tensor),
        zero-copy (batch_get_into a registered buffer) and plain (get_batch -> bytes), vs the raw client's
        ``get(k)`` of a 32 MiB value stored directly -- target ratio >= 0.8; and vs the raw client's
        ``batch_get_into`` of the same bytes stored as 4 MiB values into a registered buffer (the transport
        alone: what verification and the copy into the caller's tensor cost)
  put   MooncakeBackend.write of the same object vs the raw client's ``put`` (informational)
  lookup of a 512-chunk prompt: contains_many of 512 keys, one batch_is_exist call, in ms

It starts its own mooncake_master and storage node (the wheel's mooncake_client) on free loopback ports and
stops them at the end.

    python benchmarks/bench_mooncake.py [--repeat 21] [--size-mib 32]
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _remote import atimed, lookup_figures, parse_args  # noqa: E402
from _util import save  # noqa: E402
from harness.servers import MooncakeCluster  # noqa: E402
from mooncake.store import MooncakeDistributedStore  # noqa: E402

from kvpool.remote.mooncake import MooncakeBackend  # noqa: E402

MiB = 1 << 20


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


async def run(cluster: MooncakeCluster, repeat: int, size: int) -> dict[str, float]:
    master = cluster.master_address
    metadata = cluster.metadata
    raw = MooncakeDistributedStore()
    assert raw.setup("127.0.0.1", metadata, 0, 2 * size + 16 * MiB, "tcp", "", master) == 0
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=g)
    raw_bytes = data.numpy().tobytes()
    dest = torch.empty_like(data)
    res: dict[str, float] = {"object_MiB": size / MiB}
    common: dict[str, Any] = {"metadata": metadata, "admin": cluster.admin, "timeout": 5.0}
    zc = MooncakeBackend(master, prefix="bench:zc:", **common)
    plain = MooncakeBackend(master, prefix="bench:plain:", zero_copy=False, buffer=2 * size + 16 * MiB, **common)
    async with zc, plain:
        key = os.urandom(16)
        await zc.write(key, data)
        await plain.write(key, data)
        assert raw.upsert("plain:obj", raw_bytes) == 0
        # the same bytes as plain 4 MiB values, fetched by one batch_get_into a registered buffer: the transport
        # the zero-copy path rides on
        ps = zc.part_size
        nparts = -(-size // ps)
        names = [f"plain:part:{i}" for i in range(nparts)]
        assert raw.upsert_batch(names, [raw_bytes[i * ps : (i + 1) * ps] for i in range(nparts)]) == 0
        reg = torch.empty(size, dtype=torch.uint8)
        assert raw.register_buffer(reg.data_ptr(), size) == 0
        ptrs = [reg.data_ptr() + i * ps for i in range(nparts)]
        lens = [min(ps, size - i * ps) for i in range(nparts)]

        def raw_parts() -> None:
            got = raw.batch_get_into(names, ptrs, lens)
            assert list(got) == lens, got

        raw_parts()
        assert torch.equal(reg, data)
        assert raw.get("plain:obj") == raw_bytes
        assert await zc.read_into(key, dest) and torch.equal(dest, data)
        dest.zero_()
        assert await plain.read_into(key, dest) and torch.equal(dest, data)

        rows: dict[str, list[float]] = {
            k: [] for k in ("raw_get", "raw_parts_get", "read_into", "plain_read_into", "raw_put", "write",
                            "plain_write")
        }
        for _ in range(2):  # warm-up
            raw.get("plain:obj")
            await zc.read_into(key, dest)
            await plain.read_into(key, dest)
        for _ in range(repeat):
            rows["raw_get"].append(timed(lambda: raw.get("plain:obj")))
            rows["raw_parts_get"].append(timed(raw_parts))
            rows["read_into"].append(await atimed(lambda: zc.read_into(key, dest)))
            rows["plain_read_into"].append(await atimed(lambda: plain.read_into(key, dest)))
            rows["raw_put"].append(timed(lambda: raw.upsert("plain:obj2", raw_bytes)))
            rows["write"].append(await atimed(lambda: zc.write(key, data)))
            rows["plain_write"].append(await atimed(lambda: plain.write(key, data)))
        assert await zc.read_into(key, dest) and torch.equal(dest, data)
        for k, v in rows.items():
            res[f"{k}_GBps"] = size / statistics.median(v) / 1e9
        res["get_ratio"] = res["read_into_GBps"] / res["raw_get_GBps"]
        res["plain_get_ratio"] = res["plain_read_into_GBps"] / res["raw_get_GBps"]
        res["get_vs_parts_ratio"] = res["read_into_GBps"] / res["raw_parts_get_GBps"]
        res["zero_copy_vs_plain"] = res["read_into_GBps"] / res["plain_read_into_GBps"]
        res["put_ratio"] = res["write_GBps"] / res["raw_put_GBps"]

        # lookup of a 512-chunk prompt
        res.update(await lookup_figures(zc, repeat))
        res["stats_corrupt"] = zc.stats()["corrupt"] + plain.stats()["corrupt"]
        raw.unregister_buffer(reg.data_ptr())
    return res


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            cluster = MooncakeCluster(Path(tmp), segment="2GB")
        except RuntimeError as exc:
            sys.exit(str(exc))
        try:
            res = asyncio.run(run(cluster, args.repeat, args.size_mib * MiB))
        finally:
            cluster.stop()  # closes this process's idle clients first, while the master is up
    print(f"{'figure':<40}{'value':>12}")
    print(f"{'raw client get':<40}{res['raw_get_GBps']:>9.2f} GB/s")
    print(f"{'MooncakeBackend.read_into (zero-copy)':<40}{res['read_into_GBps']:>9.2f} GB/s")
    print(f"{'  ratio (target >= 0.8)':<40}{res['get_ratio']:>12.2f}")
    print(f"{'MooncakeBackend.read_into (plain)':<40}{res['plain_read_into_GBps']:>9.2f} GB/s")
    print(f"{'  ratio':<40}{res['plain_get_ratio']:>12.2f}")
    print(f"{'  zero-copy / plain':<40}{res['zero_copy_vs_plain']:>12.2f}")
    print(f"{'raw batch_get_into of the parts':<40}{res['raw_parts_get_GBps']:>9.2f} GB/s")
    print(f"{'  read_into / that':<40}{res['get_vs_parts_ratio']:>12.2f}")
    print(f"{'raw client put':<40}{res['raw_put_GBps']:>9.2f} GB/s")
    print(f"{'MooncakeBackend.write (zero-copy)':<40}{res['write_GBps']:>9.2f} GB/s")
    print(f"{'MooncakeBackend.write (plain)':<40}{res['plain_write_GBps']:>9.2f} GB/s")
    print(f"{'  ratio (zero-copy / raw)':<40}{res['put_ratio']:>12.2f}")
    print(f"{'lookup, 512 chunks (1 batch_is_exist)':<40}{res['lookup_512_ms']:>9.2f} ms")
    print(f"{'lookup, 1 chunk':<40}{res['lookup_1_ms']:>9.2f} ms")
    path = save("mooncake", {"repeat": args.repeat, **res})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
