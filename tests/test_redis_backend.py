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
from harness.raw import RemoteRaw
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
class TestRedisConformance(RemoteRaw, BackendTests):
    """The shipped suite; its raw hooks go through a plain redis-py client (:class:`harness.raw.RemoteRaw`)."""

    bounded = False

    @pytest.fixture(autouse=True)
    async def _server(self, redis_server: RedisServer) -> AsyncIterator[None]:
        self.url = redis_server.url
        self.raw_client = aredis.Redis(host="127.0.0.1", port=redis_server.port)
        try:
            yield
        finally:
            await self.raw_client.aclose()

    async def _get(self, name: str) -> bytes | None:
        v = await self.raw_client.get(name)
        return None if v is None else bytes(v)

    async def _put(self, name: str, value: bytes) -> None:
        await self.raw_client.set(name, value)

    async def make_backend(self, tmp_path: Path, capacity: int) -> RedisBackend:
        return RedisBackend(self.url, prefix=_prefix())


class TestRedisMultipartConformance(TestRedisConformance):
    """The same contract when every object of the suite is split into several parts."""

    async def make_backend(self, tmp_path: Path, capacity: int) -> RedisBackend:
        return RedisBackend(self.url, prefix=_prefix(), part_size=16 * KiB)


# --- parts, expiry, lookups (the format shared with mooncake:// is in tests/remote/test_objects.py) ----------
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
        eviction_hints=False, host_memory="none", read_bandwidth=None,
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
