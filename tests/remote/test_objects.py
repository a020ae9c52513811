"""The object format of both remote tiers against real servers: multi-part objects, range reads that fetch
only the covering parts, a part evicted underneath, flipped bytes and misplaced values -- each a miss, never
data. One test body per property, run on redis, on Mooncake zero-copy and on Mooncake's plain calls; the
damage is done through an independent client (:class:`Raw`), never through the backend under test."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch
from harness.servers import unique_prefix

from kvpool.storage.backend import ReadRequest
from kvpool.testing.backend_tests import rand_bytes, rand_key

KiB = 1 << 10
MiB = 1 << 20


class Raw:
    """Direct access to what a tier stored, by name: list an object's parts, remove, flip a byte, copy."""

    def __init__(self, kind: str, server: Any, client: Any) -> None:
        self.kind = kind
        self.server = server
        self.client = client

    def header(self, b: Any, key: bytes) -> str:
        return b._name(key)  # type: ignore[no-any-return]

    async def part_names(self, b: Any, key: bytes) -> list[str]:
        head = f"{self.header(b, key)}:"
        if self.kind == "redis":
            names = [n.decode() async for n in self.client.scan_iter(match=f"{head}*".replace("{", "\\{")
                                                                    .replace("}", "\\}"))]
        else:
            names = [n for n in self.server.all_keys() if n.startswith(head)]
        return sorted(names, key=lambda n: int(n.rsplit(":", 1)[1]))

    async def remove(self, name: str) -> None:
        if self.kind == "redis":
            assert await self.client.delete(name) == 1
        else:
            assert await asyncio.to_thread(self.client.remove, name, True) == 0

    async def get(self, name: str) -> bytes:
        if self.kind == "redis":
            return bytes(await self.client.get(name))
        return bytes(await asyncio.to_thread(self.client.get, name))

    async def put(self, name: str, value: bytes) -> None:
        if self.kind == "redis":
            await self.client.set(name, value)
        else:
            assert await asyncio.to_thread(self.client.upsert, name, value) == 0

    async def flip(self, name: str, at: int) -> None:
        v = bytearray(await self.get(name))
        assert v, name
        v[at if at >= 0 else len(v) + at] ^= 0x40
        await self.put(name, bytes(v))


class Tier:
    def __init__(self, kind: str, server: Any, raw: Raw, **opts: Any) -> None:
        self.kind = kind
        self.server = server
        self.raw = raw
        self.opts = opts

    def backend(self, **kw: Any) -> Any:
        kw = {**self.opts, **kw}
        if self.kind == "redis":
            from kvpool.remote.redis import RedisBackend

            return RedisBackend(self.server.url, prefix=unique_prefix(), **kw)
        return self.server.backend(**kw)


@pytest.fixture(params=["redis", "mooncake", "mooncake-plain"])
async def tier(request: pytest.FixtureRequest) -> AsyncIterator[Tier]:
    if request.param == "redis":
        pytest.importorskip("redis")
        import redis.asyncio as aredis

        srv = request.getfixturevalue("redis_server")
        client = aredis.Redis(host="127.0.0.1", port=srv.port)
        try:
            yield Tier("redis", srv, Raw("redis", srv, client))
        finally:
            await client.aclose()
        return
    cluster = request.getfixturevalue("mooncake_cluster")
    raw = Raw("mooncake", cluster, request.getfixturevalue("mooncake_raw"))
    yield Tier("mooncake", cluster, raw, zero_copy=request.param == "mooncake")


async def test_multipart_objects_and_partial_reads(tier: Tier) -> None:
    async with tier.backend(part_size=64 * KiB) as b:
        k, d = rand_key(), rand_bytes(MiB + 123, 1)  # 17 parts, the last one short
        await b.write(k, d)
        assert len(await tier.raw.part_names(b, k)) == 17
        assert await b.object_size(k) == MiB + 123
        out = torch.empty_like(d)
        assert await b.read_into(k, out)
        assert torch.equal(out, d)
        # ranges inside one part, across two, across many, ending in the short last part
        for off, n in ((5, 100), (64 * KiB - 7, 20), (100_000, 300_000), (MiB - 1000, 1123), (0, MiB + 123)):
            sub = torch.empty(n, dtype=torch.uint8)
            assert await b.read_into(k, sub, off), (off, n)
            assert torch.equal(sub, d[off : off + n])
        # typed, strided destination of a multi-part object
        kv = torch.randn(4, 2, 64, 4, 64).to(torch.bfloat16)
        view = kv[:, :, 8:40]  # 256 KiB in 8 runs
        k2 = rand_key()
        await b.write(k2, view)
        full = torch.zeros_like(kv)
        assert await b.read_into(k2, full[:, :, 8:40])
        assert torch.equal(full[:, :, 8:40], view)
        assert torch.count_nonzero(full[:, :, :8].float()) == 0
        # a range read fetches only the covering parts: removing another part does not affect it
        await tier.raw.remove((await tier.raw.part_names(b, k))[0])
        sub = torch.empty(1000, dtype=torch.uint8)
        assert await b.read_into(k, sub, 5 * 64 * KiB + 10)
        assert torch.equal(sub, d[5 * 64 * KiB + 10 : 5 * 64 * KiB + 1010])
        assert await b.read_into(k, sub, 10) is False
        assert b.stats()["missing_parts"] == 1


async def test_part_deleted_underneath_is_a_miss(tier: Tier) -> None:
    async with tier.backend(part_size=16 * KiB) as b:
        k, d = rand_key(), rand_bytes(100 * KiB, 2)
        await b.write(k, d)
        names = await tier.raw.part_names(b, k)
        assert len(names) == 7
        await tier.raw.remove(names[3])  # as if the server had evicted that one part
        out = torch.full_like(d, 7)
        assert await b.read_into(k, out) is False
        st = b.stats()
        assert st["missing_parts"] == 1 and st["misses"] == 1 and st["hits"] == 0
        assert await b.read_many([ReadRequest(k, out)]) == [False]
        # rewriting heals it
        await b.write(k, d)
        assert await b.read_into(k, out)
        assert torch.equal(out, d)


async def test_flipped_bytes_are_misses_never_data(tier: Tier) -> None:
    async with tier.backend(part_size=16 * KiB) as b:
        big, small = rand_key(), rand_key()
        d_big, d_small = rand_bytes(64 * KiB, 3), rand_bytes(4 * KiB, 4)
        await b.write(big, d_big)
        await b.write(small, d_small)
        out = torch.empty_like(d_big)
        # a byte flipped in a stored part
        await tier.raw.flip((await tier.raw.part_names(b, big))[2], 100)
        assert await b.read_into(big, out) is False
        assert b.stats()["corrupt"] == 1
        if tier.kind == "mooncake":  # read once more, in case it was a replacement in progress (not atomic there)
            assert b.stats()["retries"] == 1
        # a range that does not touch the damaged part still reads
        assert await b.read_into(big, out[: 16 * KiB])
        assert torch.equal(out[: 16 * KiB], d_big[: 16 * KiB])
        # a byte flipped in the data of an inline object (its last byte), and in a header
        name = tier.raw.header(b, small)
        await tier.raw.flip(name, -1)
        o2 = torch.empty_like(d_small)
        assert await b.read_into(small, o2) is False
        await b.write(small, d_small)
        await tier.raw.flip(name, 20)
        assert await b.read_into(small, o2) is False
        assert b.stats()["corrupt"] == 3
        # a value copied under another key's name (misplaced) is detected by the key in the header
        other = rand_key()
        await b.write(small, d_small)
        await tier.raw.put(tier.raw.header(b, other), await tier.raw.get(name))
        assert await b.read_into(other, o2) is False
        assert b.stats()["corrupt"] == 4
        assert await b.read_into(small, o2) and torch.equal(o2, d_small)
        # a foreign value under our name
        await tier.raw.put(name, b"not an object")
        assert await b.read_into(small, o2) is False
        assert await b.object_size(small) is None
        assert b.stats()["errors"] == 0


async def test_large_objects_are_verified_off_the_event_loop(tier: Tier) -> None:
    # >= 8 MiB: checksums and copies run in a worker thread (for Mooncake, through a buffer of 2.5 MiB that
    # moves them in batches)
    extra = {"buffer": 5 * MiB // 2} if tier.kind == "mooncake" else {}
    async with tier.backend(part_size=MiB, **extra) as b:
        k, d = rand_key(), rand_bytes(9 * MiB + 1, 8)
        await b.write(k, d)
        lo, hi = torch.empty(4 * MiB + 1, dtype=torch.uint8), torch.empty(5 * MiB, dtype=torch.uint8)
        assert await b.read_many([ReadRequest(k, lo), ReadRequest(k, hi, 4 * MiB + 1)]) == [True, True]
        assert torch.equal(torch.cat([lo, hi]), d)
        assert b.stats()["bytes_read"] == 9 * MiB + 1


async def test_keys_must_be_16_bytes(tier: Tier) -> None:
    async with tier.backend() as b:
        with pytest.raises(ValueError):
            await b.write(b"short", rand_bytes(16))
        with pytest.raises(ValueError):
            await b.read_into(rand_key(), torch.empty(16, dtype=torch.uint8), -16)
        with pytest.raises(ValueError):
            await b.write(rand_key(), torch.empty(0, dtype=torch.uint8))
