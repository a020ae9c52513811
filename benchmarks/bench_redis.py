"""Remote tier (redis://) against plain redis-py on the same server, in the same run.

Figures (medians; the contenders are interleaved so drift hits them alike):
  get   RedisBackend.read_into of a 32 MiB object (4 MiB parts, every part verified, copied into a tensor)
        vs ``await r.get(k)`` of a 32 MiB value set directly -- target ratio >= 0.8; and vs a plain pipelined
        GET of the same bytes stored as 4 MiB values (the transport alone: what verification and copy cost)
  put   RedisBackend.write of the same object vs ``await r.set(k, v)`` (informational)
  lookup of a 512-chunk prompt: contains_many of 512 keys, one pipeline, in ms

It starts its own redis-server on a free loopback port and stops it at the end.

    python benchmarks/bench_redis.py [--repeat 21] [--size-mib 32]
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import redis.asyncio as aredis  # noqa: E402
from _remote import atimed, lookup_figures, parse_args  # noqa: E402
from _util import save  # noqa: E402
from harness.servers import RedisServer  # noqa: E402

from kvpool.remote.redis import RedisBackend  # noqa: E402

MiB = 1 << 20


async def run(port: int, repeat: int, size: int) -> dict[str, float]:
    url = f"redis://127.0.0.1:{port}/0"
    r = aredis.Redis(host="127.0.0.1", port=port)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=g)
    raw = data.numpy().tobytes()
    dest = torch.empty_like(data)
    res: dict[str, float] = {"object_MiB": size / MiB}
    async with RedisBackend(url, prefix="bench:") as b:
        key = os.urandom(16)
        await b.write(key, data)
        await r.set("plain:obj", raw)
        # the same bytes as plain 4 MiB values, fetched in one pipeline: the transport RedisBackend rides on
        ps = b.part_size
        nparts = -(-size // ps)
        for i in range(nparts):
            await r.set(f"plain:part:{i}", raw[i * ps : (i + 1) * ps])

        async def plain_parts() -> list[bytes]:
            pipe = r.pipeline(transaction=False)
            for i in range(nparts):
                pipe.get(f"plain:part:{i}")
            return list(await pipe.execute())

        assert b"".join(await plain_parts()) == raw
        assert await b.read_into(key, dest) and torch.equal(dest, data)
        assert await r.get("plain:obj") == raw

        rows: dict[str, list[float]] = {
            k: [] for k in ("plain_get", "plain_parts_get", "read_into", "plain_set", "write")
        }
        for _ in range(2):  # warm-up
            await r.get("plain:obj")
            await b.read_into(key, dest)
        for _ in range(repeat):
            rows["plain_get"].append(await atimed(lambda: r.get("plain:obj")))
            rows["plain_parts_get"].append(await atimed(plain_parts))
            rows["read_into"].append(await atimed(lambda: b.read_into(key, dest)))
            rows["plain_set"].append(await atimed(lambda: r.set("plain:obj2", raw)))
            rows["write"].append(await atimed(lambda: b.write(key, data)))
        assert await b.read_into(key, dest) and torch.equal(dest, data)
        for k, v in rows.items():
            res[f"{k}_GBps"] = size / statistics.median(v) / 1e9
        res["get_ratio"] = res["read_into_GBps"] / res["plain_get_GBps"]
        res["get_vs_parts_ratio"] = res["read_into_GBps"] / res["plain_parts_get_GBps"]
        res["put_ratio"] = res["write_GBps"] / res["plain_set_GBps"]

        # lookup of a 512-chunk prompt
        res.update(await lookup_figures(b, repeat))
        res["stats_corrupt"] = b.stats()["corrupt"]
    await r.aclose()
    return res


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if shutil.which("redis-server") is None:
            sys.exit("redis-server is not installed")
        with RedisServer(Path(tmp)) as srv:
            res = asyncio.run(run(srv.port, args.repeat, args.size_mib * MiB))
    print(f"{'figure':<34}{'value':>12}")
    print(f"{'plain redis-py GET':<34}{res['plain_get_GBps']:>9.2f} GB/s")
    print(f"{'RedisBackend.read_into':<34}{res['read_into_GBps']:>9.2f} GB/s")
    print(f"{'  ratio (target >= 0.8)':<34}{res['get_ratio']:>12.2f}")
    print(f"{'plain pipelined GET of the parts':<34}{res['plain_parts_get_GBps']:>9.2f} GB/s")
    print(f"{'  read_into / that':<34}{res['get_vs_parts_ratio']:>12.2f}")
    print(f"{'plain redis-py SET':<34}{res['plain_set_GBps']:>9.2f} GB/s")
    print(f"{'RedisBackend.write':<34}{res['write_GBps']:>9.2f} GB/s")
    print(f"{'  ratio':<34}{res['put_ratio']:>12.2f}")
    print(f"{'lookup, 512 chunks (1 round trip)':<34}{res['lookup_512_ms']:>9.2f} ms")
    print(f"{'lookup, 1 chunk':<34}{res['lookup_1_ms']:>9.2f} ms")
    path = save("redis", {"repeat": args.repeat, **res})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
