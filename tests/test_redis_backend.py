"""The redis:// tier against real redis-server processes on loopback ports (no mocks).

The servers are the shared harness's (``tests/harness``, fixtures in ``conftest.py``): one session-wide
server serves most tests (each test uses its own key prefix); the cluster test starts three nodes of its own.
The fault tests (SIGKILL, SIGSTOP) are in ``tests/remote/test_faults.py``, run against both remote tiers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("redis", reason="redis-py is not installed (pip install 'kvpool[redis]')")

import redis.asyncio as aredis
from harness.procs import put_then_get
from harness.servers import RedisClusterNodes, RedisServer, listening
from harness.servers import free_port as _free_port
from harness.servers import unique_prefix as _prefix

import kvpool
from kvpool import BackendError, ConfigError
from kvpool.config import BackendSpec
from kvpool.remote.redis import RedisBackend
from kvpool.storage.backend import ReadRequest
from kvpool.storage.registry import backend_from_spec
from kvpool.testing import BackendTests
from kvpool.testing.backend_tests import rand_bytes, rand_key

KiB = 1 << 10
MiB = 1 << 20


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[aredis.Redis]:
    r = aredis.Redis(host="127.0.0.1", port=redis_server.port)
    try:
        yield r
    finally:
        await r.aclose()


async def _part_names(r: aredis.Redis, b: RedisBackend, key: bytes) -> list[bytes]:
    names = [n async for n in r.scan_iter(match=f"{b.prefix}{{{key.hex()}}}:*")]
    return sorted(names, key=lambda n: int(n.rsplit(b":", 1)[1]))


# --- the conformance suite ----------------------------------------------------------------------------------
class TestRedisConformance(BackendTests):
    bounded = False

    @pytest.fixture(autouse=True)
    def _server(self, redis_server: RedisServer) -> None:
        self.url = redis_server.url

    async def make_backend(self, tmp_path: Path, capacity: int) -> RedisBackend:
        return RedisBackend(self.url, prefix=_prefix())


class TestRedisMultipartConformance(TestRedisConformance):
    """The same contract when every object of the suite is split into several parts."""

    async def make_backend(self, tmp_path: Path, capacity: int) -> RedisBackend:
        return RedisBackend(self.url, prefix=_prefix(), part_size=16 * KiB)


# --- format, parts, faults ----------------------------------------------------------------------------------
async def test_multipart_objects_and_partial_reads(redis_server: RedisServer, raw: aredis.Redis) -> None:
    async with RedisBackend(redis_server.url, prefix=_prefix(), part_size=64 * KiB) as b:
        k, d = rand_key(), rand_bytes(MiB + 123, 1)  # 17 parts, the last one short
        await b.write(k, d)
        assert len(await _part_names(raw, b, k)) == 17
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
        view = kv[:, :, 8:40]  # 128 KiB... in 8 runs
        k2 = rand_key()
        await b.write(k2, view)
        full = torch.zeros_like(kv)
        assert await b.read_into(k2, full[:, :, 8:40])
        assert torch.equal(full[:, :, 8:40], view)
        assert torch.count_nonzero(full[:, :, :8].float()) == 0
        # a range read fetches only the covering parts: removing another part does not affect it
        names = await _part_names(raw, b, k)
        await raw.delete(names[0])
        sub = torch.empty(1000, dtype=torch.uint8)
        assert await b.read_into(k, sub, 5 * 64 * KiB + 10)
        assert torch.equal(sub, d[5 * 64 * KiB + 10 : 5 * 64 * KiB + 1010])
        assert await b.read_into(k, sub, 10) is False


async def test_large_objects_verify_off_the_event_loop(redis_server: RedisServer) -> None:
    # >= 8 MiB: checksums and copies run in a worker thread, on both sides
    async with RedisBackend(redis_server.url, prefix=_prefix(), part_size=MiB) as b:
        k, d = rand_key(), rand_bytes(9 * MiB + 1, 8)
        await b.write(k, d)
        lo, hi = torch.empty(4 * MiB + 1, dtype=torch.uint8), torch.empty(5 * MiB, dtype=torch.uint8)
        assert await b.read_many([ReadRequest(k, lo), ReadRequest(k, hi, 4 * MiB + 1)]) == [True, True]
        assert torch.equal(torch.cat([lo, hi]), d)
        assert b.stats()["bytes_read"] == 9 * MiB + 1


async def test_part_deleted_underneath_is_a_miss(redis_server: RedisServer, raw: aredis.Redis) -> None:
    async with RedisBackend(redis_server.url, prefix=_prefix(), part_size=16 * KiB) as b:
        k, d = rand_key(), rand_bytes(100 * KiB, 2)
        await b.write(k, d)
        names = await _part_names(raw, b, k)
        assert len(names) == 7
        await raw.delete(names[3])  # as if the server had evicted that one part
        out = torch.full_like(d, 7)
        assert await b.read_into(k, out) is False
        st = b.stats()
        assert st["missing_parts"] == 1 and st["misses"] == 1 and st["hits"] == 0
        assert await b.read_many([ReadRequest(k, out)]) == [False]
        # rewriting heals it
        await b.write(k, d)
        assert await b.read_into(k, out)
        assert torch.equal(out, d)


async def test_flipped_bytes_are_misses_never_data(redis_server: RedisServer, raw: aredis.Redis) -> None:
    async with RedisBackend(redis_server.url, prefix=_prefix(), part_size=16 * KiB) as b:
        big, small = rand_key(), rand_key()
        d_big, d_small = rand_bytes(64 * KiB, 3), rand_bytes(4 * KiB, 4)
        await b.write(big, d_big)
        await b.write(small, d_small)
        out = torch.empty_like(d_big)
        # a byte flipped in a stored part
        part = (await _part_names(raw, b, big))[2]
        orig = await raw.getrange(part, 100, 100)
        await raw.setrange(part, 100, bytes([orig[0] ^ 0x40]))
        assert await b.read_into(big, out) is False
        assert b.stats()["corrupt"] == 1
        # a range that does not touch the damaged part still reads
        assert await b.read_into(big, out[: 16 * KiB])
        assert torch.equal(out[: 16 * KiB], d_big[: 16 * KiB])
        # a byte flipped in the data of an inline object, and in a header
        name = f"{b.prefix}{{{small.hex()}}}"
        n = await raw.strlen(name)
        last = await raw.getrange(name, n - 1, n - 1)
        await raw.setrange(name, n - 1, bytes([last[0] ^ 1]))
        o2 = torch.empty_like(d_small)
        assert await b.read_into(small, o2) is False
        await b.write(small, d_small)
        await raw.setrange(name, 20, b"\xff")
        assert await b.read_into(small, o2) is False
        assert b.stats()["corrupt"] == 3
        # a value copied under another key's name (misplaced) is detected by the key in the header
        other = rand_key()
        await b.write(small, d_small)
        await raw.set(f"{b.prefix}{{{other.hex()}}}", await raw.get(name))
        assert await b.read_into(other, o2) is False
        assert b.stats()["corrupt"] == 4
        assert await b.read_into(small, o2) and torch.equal(o2, d_small)


async def test_overwrite_expires_the_old_parts(redis_server: RedisServer, raw: aredis.Redis) -> None:
    async with RedisBackend(redis_server.url, prefix=_prefix(), part_size=16 * KiB) as b:
        k = rand_key()
        await b.write(k, rand_bytes(64 * KiB, 5))
        old = await _part_names(raw, b, k)
        assert all([await raw.pttl(n) == -1 for n in old])
        d2 = rand_bytes(40 * KiB, 6)
        await b.write(k, d2)
        # the replaced version stays readable for a grace period, then goes
        assert all([0 < await raw.pttl(n) <= b._grace_ms for n in old])
        out = torch.empty_like(d2)
        assert await b.read_into(k, out) and torch.equal(out, d2)
        # deleting removes header and parts
        assert await b.delete(k)
        new = [n for n in await _part_names(raw, b, k) if n not in old]
        assert new == []
        assert not await b.contains(k)


async def test_ttl_and_keys(redis_server: RedisServer, raw: aredis.Redis) -> None:
    spec = f"redis://127.0.0.1:{redis_server.port}/0?ttl=30&part_size=16KiB&prefix={_prefix()}"
    b = backend_from_spec(spec)
    assert isinstance(b, RedisBackend)
    async with b:
        ks = {rand_key() for _ in range(6)}
        await b.write_many([(k, rand_bytes(40 * KiB)) for k in ks])
        names = [n async for n in raw.scan_iter(match=f"{b.prefix}*")]
        assert len(names) == 6 * 4  # 6 headers + 3 parts each
        assert all([0 < await raw.pttl(n) <= 30_000 for n in names])
        assert {k async for k in b.keys()} == ks  # headers only, exactly once each


async def test_unreachable_server_fails_open() -> None:
    b = RedisBackend(f"redis://127.0.0.1:{_free_port()}/0", timeout=0.5)
    with pytest.raises(BackendError):
        await b.open()
    assert not b.is_open


def test_spec_parsing() -> None:
    b = RedisBackend.from_spec(
        BackendSpec.parse("redis://10.1.2.3:6390/2?timeout=0.5&part_size=1MiB&prefix=x:&ttl=30")
    )
    assert (b.address, b.timeout, b.part_size, b.prefix, b.ttl, b.cluster, b.tls) == (
        "10.1.2.3:6390/2", 0.5, MiB, "x:", 30.0, False, False
    )
    d = RedisBackend.from_spec(BackendSpec.parse("redis://127.0.0.1:6379"))
    assert (d.timeout, d.part_size, d.prefix, d.ttl) == (2.0, 4 * MiB, "kvpool:", None)
    assert d.capabilities == kvpool.Capabilities(
        persistent=False, durable=False, device_memory=False, partial_reads=True, remote=True, queued_io=True,
        eviction_hints=False, read_bandwidth=None,
    )
    assert d.capacity is None
    assert RedisBackend.from_spec(BackendSpec.parse("rediss://u:secret@cache:6380/1")).tls
    assert "secret" not in RedisBackend.from_spec(BackendSpec.parse("rediss://u:secret@cache:6380/1")).address
    v = RedisBackend.from_spec(BackendSpec.parse("valkey://127.0.0.1:7000/0?timeout=250ms"))
    assert v.url == "redis://127.0.0.1:7000/0" and v.timeout == 0.25
    c = RedisBackend.from_spec(BackendSpec.parse("redis+cluster://127.0.0.1:7000"))
    assert c.cluster and c.address == "127.0.0.1:7000"
    for scheme in ("redis", "rediss", "valkey", "redis+cluster"):
        assert isinstance(backend_from_spec(f"{scheme}://127.0.0.1:7000"), RedisBackend)
    with pytest.raises(ConfigError, match="unknown option"):
        RedisBackend.from_spec(BackendSpec.parse("redis://127.0.0.1:6379/0?timout=1"))
    for bad in (
        "redis://127.0.0.1:6379/0?timeout=fast",
        "redis://127.0.0.1:6379/0?timeout=-1",
        "redis://127.0.0.1:6379/0?part_size=1KiB",
        "redis://127.0.0.1:6379/0?part_size=lots",
        "redis://127.0.0.1:6379/0?prefix={x}",
        "redis://127.0.0.1:6379/0?ttl=0",
        "redis://127.0.0.1:6379/zero",
        "redis+cluster://127.0.0.1:7000/3",
        "redis://127.0.0.1:port/0",
    ):
        with pytest.raises(ConfigError):
            RedisBackend.from_spec(BackendSpec.parse(bad))


async def test_lookup_of_many_keys(redis_server: RedisServer, raw: aredis.Redis) -> None:
    async with RedisBackend(redis_server.url, prefix=_prefix()) as b:
        keys = [rand_key() for _ in range(600)]
        await b.write_many([(k, rand_bytes(64)) for k in keys[::3]])
        want = [i % 3 == 0 for i in range(600)]
        assert await b.contains_many(keys) == want  # one script call
        b._exists_script = None
        assert await b.contains_many(keys) == want  # one pipeline
    # a user who may not run scripts gets the pipeline
    await raw.execute_command("ACL", "SETUSER", "noscript", "on", "nopass", "~*", "+@all", "-@scripting")
    async with RedisBackend(f"redis://noscript:@127.0.0.1:{redis_server.port}/0", prefix=_prefix()) as b:
        keys = [rand_key() for _ in range(20)]
        await b.write(keys[5], rand_bytes(64))
        assert await b.contains_many(keys) == [i == 5 for i in range(20)]
        assert b._exists_script is None
        assert b.stats()["errors"] == 0
        assert await b.contains_many(keys) == [i == 5 for i in range(20)]


async def test_keys_must_be_16_bytes(redis_server: RedisServer) -> None:
    async with RedisBackend(redis_server.url, prefix=_prefix()) as b:
        with pytest.raises(ValueError):
            await b.write(b"short", rand_bytes(16))


# --- Redis Cluster ------------------------------------------------------------------------------------------
async def test_cluster_roundtrip(redis_cluster: RedisClusterNodes) -> None:
    spec = f"redis+cluster://127.0.0.1:{redis_cluster.ports[0]}?part_size=64KiB&prefix={_prefix()}"
    b = backend_from_spec(spec)
    assert isinstance(b, RedisBackend)
    async with b:
        k, d = rand_key(), rand_bytes(MiB + 5, 9)  # 17 parts, one hash slot
        await b.write(k, d)
        out = torch.empty_like(d)
        assert await b.read_into(k, out) and torch.equal(out, d)
        sub = torch.empty(200_000, dtype=torch.uint8)
        assert await b.read_into(k, sub, 100_000) and torch.equal(sub, d[100_000:300_000])
        await b.write(k, d)  # an overwrite in a cluster
        assert await b.read_into(k, out) and torch.equal(out, d)
        # a batch spread over every node
        items = [(rand_key(), rand_bytes(n, i)) for i, n in enumerate([4 * KiB, 100 * KiB] * 16)]
        await b.write_many(items)
        outs = [torch.empty_like(x) for _, x in items]
        assert await b.read_many([ReadRequest(kk, o) for (kk, _), o in zip(items, outs)]) == [True] * 32
        assert all(torch.equal(o, x) for (_, x), o in zip(items, outs))
        keys = [kk for kk, _ in items]
        assert await b.contains_many(keys + [rand_key()]) == [True] * 32 + [False]
        listed = {kk async for kk in b.keys()}
        assert listed == set(keys) | {k}
        assert await b.delete(k) and not await b.contains(k)
    # every node holds some of it
    for port in redis_cluster.ports:
        assert listening(port)


# --- two processes sharing the remote tier ------------------------------------------------------------------
def test_two_processes_share_the_remote_tier(redis_server: RedisServer, tmp_path: Path) -> None:
    a, b = put_then_get(f"redis://127.0.0.1:{redis_server.port}/0?prefix={_prefix()}", tmp_path)
    assert a["n"] == 192
    # a fresh process: its DRAM is empty, everything comes from the remote tier
    assert b == {"n": 192, "dram_hits": 0, "remote_hits": 6}
