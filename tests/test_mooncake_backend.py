"""The mooncake:// tier against a real Mooncake Store on loopback ports (no mocks).

A cluster is one ``mooncake_master`` (with its HTTP metadata server) and one storage node (the wheel's
``mooncake_client``, lending a segment of its memory); the pools under test are pure clients. The cluster is the
shared harness's (``tests/harness``, fixtures in ``conftest.py``): one session-wide cluster serves the tests
here (each test uses its own key prefix), and its finalizer closes this process's idle Mooncake clients before
it stops the master. The fault tests (SIGKILL, SIGSTOP) are in ``tests/remote/test_faults.py``, run against
both remote tiers.

Needs the client wheel: ``pip install mooncake-transfer-engine-non-cuda`` (or the efa-non-cuda build plus
``apt-get install libfabric1``); the module is skipped, with the import error, without it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

try:
    from mooncake.store import MooncakeDistributedStore
except ImportError as _exc:  # the wheel, or a shared library it needs (libfabric.so.1, libcuda.so.1), is missing
    pytest.skip(
        f"the Mooncake Store client cannot be imported ({_exc}); pip install mooncake-transfer-engine-non-cuda "
        "(the efa-non-cuda build also needs apt-get install libfabric1)",
        allow_module_level=True,
    )

from harness.procs import put_then_get
from harness.servers import MooncakeCluster, http_get
from harness.servers import free_port as _free_port
from harness.servers import unique_prefix as _prefix

import kvpool
from kvpool import BackendError, ConfigError
from kvpool.config import BackendSpec
from kvpool.remote.mooncake import MooncakeBackend
from kvpool.storage.backend import ReadRequest
from kvpool.storage.registry import backend_from_spec
from kvpool.testing import BackendTests
from kvpool.testing.backend_tests import rand_bytes, rand_key

KiB = 1 << 10
MiB = 1 << 20


@pytest.fixture(scope="session")
def raw(mooncake_cluster: MooncakeCluster) -> Iterator[Any]:
    """A plain client of the session cluster, to look at and damage what the backend stored."""
    s = MooncakeDistributedStore()
    assert s.setup("127.0.0.1", mooncake_cluster.metadata, 0, 64 * MiB, "tcp", "", mooncake_cluster.master_address) == 0
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def cluster(mooncake_cluster: MooncakeCluster) -> MooncakeCluster:
    return mooncake_cluster


def _part_names(cluster: MooncakeCluster, b: MooncakeBackend, key: bytes) -> list[str]:
    head = f"{b.prefix}{key.hex()}:"
    names = [n for n in cluster.all_keys() if n.startswith(head)]
    return sorted(names, key=lambda n: int(n.rsplit(":", 1)[1]))


def _flip(raw: Any, name: str, at: int) -> None:
    v = bytearray(raw.get(name))
    assert v, name
    v[at] ^= 0x40
    assert raw.upsert(name, bytes(v)) == 0


class _Counting:
    """Wraps a client and counts its calls by name."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self._inner, name)

        def call(*a: Any, **k: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn(*a, **k)

        return call


# --- the conformance suite ----------------------------------------------------------------------------------
class TestMooncakeConformance(BackendTests):
    bounded = False

    @pytest.fixture(autouse=True)
    def _cluster(self, mooncake_cluster: MooncakeCluster) -> None:
        self.cluster = mooncake_cluster

    async def make_backend(self, tmp_path: Path, capacity: int) -> MooncakeBackend:
        return self.cluster.backend()


class TestMooncakeMultipartConformance(TestMooncakeConformance):
    """The same contract when every object of the suite is split into several parts."""

    async def make_backend(self, tmp_path: Path, capacity: int) -> MooncakeBackend:
        return self.cluster.backend(part_size=16 * KiB)


class TestMooncakePlainConformance(TestMooncakeConformance):
    """The same contract through the plain client calls (bytes in, bytes out) instead of zero-copy ones."""

    async def make_backend(self, tmp_path: Path, capacity: int) -> MooncakeBackend:
        return self.cluster.backend(part_size=16 * KiB, zero_copy=False)


# --- format, parts, faults ----------------------------------------------------------------------------------
@pytest.mark.parametrize("zero_copy", [True, False])
async def test_multipart_objects_and_partial_reads(cluster: MooncakeCluster, raw: Any, zero_copy: bool) -> None:
    async with cluster.backend(part_size=64 * KiB, zero_copy=zero_copy) as b:
        k, d = rand_key(), rand_bytes(MiB + 123, 1)  # 17 parts, the last one short
        await b.write(k, d)
        assert len(_part_names(cluster, b, k)) == 17
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
        names = _part_names(cluster, b, k)
        assert raw.remove(names[0], True) == 0
        sub = torch.empty(1000, dtype=torch.uint8)
        assert await b.read_into(k, sub, 5 * 64 * KiB + 10)
        assert torch.equal(sub, d[5 * 64 * KiB + 10 : 5 * 64 * KiB + 1010])
        assert await b.read_into(k, sub, 10) is False
        assert b.stats()["missing_parts"] == 1


async def test_large_objects_and_small_buffer(cluster: MooncakeCluster) -> None:
    # >= 8 MiB: checksums and copies run in a worker thread; a 2.5 MiB transfer buffer moves them in batches
    async with cluster.backend(part_size=MiB, buffer=5 * MiB // 2) as b:
        k, d = rand_key(), rand_bytes(9 * MiB + 1, 8)
        await b.write(k, d)
        lo, hi = torch.empty(4 * MiB + 1, dtype=torch.uint8), torch.empty(5 * MiB, dtype=torch.uint8)
        assert await b.read_many([ReadRequest(k, lo), ReadRequest(k, hi, 4 * MiB + 1)]) == [True, True]
        assert torch.equal(torch.cat([lo, hi]), d)
        assert b.stats()["bytes_read"] == 9 * MiB + 1
        # many readers at once share the buffer: they wait for room, none fails
        items = [(rand_key(), rand_bytes(3 * MiB // 2, i)) for i in range(6)]
        await b.write_many(items)
        outs = [torch.empty_like(x) for _, x in items]
        res = await asyncio.gather(*(b.read_into(kk, o) for (kk, _), o in zip(items, outs)))
        assert res == [True] * 6
        assert all(torch.equal(o, x) for (_, x), o in zip(items, outs))
        st = b.stats()
        assert st["buffer_waits"] >= 1 and st["buffer_free"] == st["buffer"]


async def test_part_deleted_underneath_is_a_miss(cluster: MooncakeCluster, raw: Any) -> None:
    async with cluster.backend(part_size=16 * KiB) as b:
        k, d = rand_key(), rand_bytes(100 * KiB, 2)
        await b.write(k, d)
        names = _part_names(cluster, b, k)
        assert len(names) == 7
        assert raw.remove(names[3], True) == 0  # as if the store had evicted that one part
        out = torch.full_like(d, 7)
        assert await b.read_into(k, out) is False
        st = b.stats()
        assert st["missing_parts"] == 1 and st["misses"] == 1 and st["hits"] == 0
        assert await b.read_many([ReadRequest(k, out)]) == [False]
        # rewriting heals it
        await b.write(k, d)
        assert await b.read_into(k, out)
        assert torch.equal(out, d)


@pytest.mark.parametrize("zero_copy", [True, False])
async def test_flipped_bytes_are_misses_never_data(cluster: MooncakeCluster, raw: Any, zero_copy: bool) -> None:
    async with cluster.backend(part_size=16 * KiB, zero_copy=zero_copy) as b:
        big, small = rand_key(), rand_key()
        d_big, d_small = rand_bytes(64 * KiB, 3), rand_bytes(4 * KiB, 4)
        await b.write(big, d_big)
        await b.write(small, d_small)
        out = torch.empty_like(d_big)
        # a byte flipped in a stored part (read twice: once more in case it was a replacement in progress)
        _flip(raw, _part_names(cluster, b, big)[2], 100)
        assert await b.read_into(big, out) is False
        assert b.stats()["corrupt"] == 1 and b.stats()["retries"] == 1
        # a range that does not touch the damaged part still reads
        assert await b.read_into(big, out[: 16 * KiB])
        assert torch.equal(out[: 16 * KiB], d_big[: 16 * KiB])
        # a byte flipped in the data of an inline object, and in a header
        name = f"{b.prefix}{small.hex()}"
        _flip(raw, name, 64 + 4 * KiB - 1)
        o2 = torch.empty_like(d_small)
        assert await b.read_into(small, o2) is False
        await b.write(small, d_small)
        _flip(raw, name, 20)
        assert await b.read_into(small, o2) is False
        assert b.stats()["corrupt"] == 3
        # a value copied under another key's name (misplaced) is detected by the key in the header
        other = rand_key()
        await b.write(small, d_small)
        assert raw.upsert(f"{b.prefix}{other.hex()}", raw.get(name)) == 0
        assert await b.read_into(other, o2) is False
        assert b.stats()["corrupt"] == 4
        assert await b.read_into(small, o2) and torch.equal(o2, d_small)
        # a foreign value under our name
        assert raw.upsert(name, b"not an object") == 0
        assert await b.read_into(small, o2) is False
        assert await b.object_size(small) is None
        assert b.stats()["errors"] == 0


async def test_overwrite_removes_the_old_parts_later(cluster: MooncakeCluster) -> None:
    async with cluster.backend(part_size=16 * KiB) as b:
        b.grace = 0.3
        k = rand_key()
        await b.write(k, rand_bytes(64 * KiB, 5))
        old = _part_names(cluster, b, k)
        assert len(old) == 4
        d2 = rand_bytes(40 * KiB, 6)
        await b.write(k, d2)
        # the replaced version stays readable for a grace period, then goes
        assert set(old) <= set(_part_names(cluster, b, k))
        await asyncio.sleep(0.6)
        now = _part_names(cluster, b, k)
        assert not set(old) & set(now) and len(now) == 3
        out = torch.empty_like(d2)
        assert await b.read_into(k, out) and torch.equal(out, d2)
        # deleting removes header and parts
        assert await b.delete(k)
        assert _part_names(cluster, b, k) == [] and not await b.contains(k)
        assert b.stats()["cleanup_errors"] == 0


@pytest.mark.parametrize("part_size", [16 * KiB, MiB])
async def test_readers_during_overwrites_see_old_or_new(cluster: MooncakeCluster, part_size: int) -> None:
    # Mooncake's upsert makes readers wait ("not ready") or read a mix: they retry, and never return a mix
    async with cluster.backend(part_size=part_size) as b:
        k = rand_key()
        a, c = rand_bytes(64 * KiB, 11), rand_bytes(64 * KiB, 12)
        await b.write(k, a)
        stop = False

        async def reader() -> int:
            n = 0
            out = torch.empty_like(a)
            while not stop:
                assert await b.read_into(k, out)
                assert torch.equal(out, a) or torch.equal(out, c)
                n += 1
            return n

        tasks = [asyncio.create_task(reader()) for _ in range(3)]
        for i in range(30):
            await b.write(k, c if i % 2 == 0 else a)
            await asyncio.sleep(0.002)
        stop = True
        assert sum(await asyncio.gather(*tasks)) > 30
        assert b.stats()["misses"] == 0


async def test_lookup_of_many_keys_is_one_call(cluster: MooncakeCluster) -> None:
    async with cluster.backend() as b:
        keys = [rand_key() for _ in range(600)]
        await b.write_many([(k, rand_bytes(64)) for k in keys[::3]])
        counting = _Counting(b._store)
        b._store = counting
        try:
            assert await b.contains_many(keys) == [i % 3 == 0 for i in range(600)]
            assert counting.calls == {"batch_is_exist": 1}
            # a batch of reads is one fetch of the headers (inline objects: that is all)
            outs = [torch.empty(64, dtype=torch.uint8) for _ in range(30)]
            assert await b.read_many([ReadRequest(k, o) for k, o in zip(keys[:30], outs)]) == [
                i % 3 == 0 for i in range(30)
            ]
            assert counting.calls == {"batch_is_exist": 1, "batch_get_into": 1}
        finally:
            b._store = counting._inner


async def test_keys_must_be_16_bytes(cluster: MooncakeCluster) -> None:
    async with cluster.backend() as b:
        with pytest.raises(ValueError):
            await b.write(b"short", rand_bytes(16))
        with pytest.raises(ValueError):
            await b.read_into(rand_key(), torch.empty(16, dtype=torch.uint8), -16)


async def test_lent_segment(cluster: MooncakeCluster) -> None:
    # a pool may lend memory of its own to the store as well
    async with cluster.backend(segment=64 * MiB) as b:
        items = [(rand_key(), rand_bytes(100 * KiB, i)) for i in range(8)]
        await b.write_many(items)
        outs = [torch.empty_like(x) for _, x in items]
        assert await b.read_many([ReadRequest(k, o) for (k, _), o in zip(items, outs)]) == [True] * 8
        assert all(torch.equal(o, x) for (_, x), o in zip(items, outs))
    assert any(s.strip() for s in (http_get(cluster.admin_port, "/get_all_segments") or "").splitlines())


async def test_unreachable_master_fails_open() -> None:
    b = MooncakeBackend(f"127.0.0.1:{_free_port()}", timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(BackendError):
        await b.open()
    assert not b.is_open and time.monotonic() - t0 < 2


def test_spec_parsing() -> None:
    b = MooncakeBackend.from_spec(BackendSpec.parse(
        "mooncake://10.1.2.3:50051?metadata=http://10.1.2.3:8080/metadata&local=10.1.2.4:17000&segment=512MiB"
        "&buffer=256MiB&protocol=tcp&timeout=5&prefix=x:&part_size=1MiB&retry_after=0.5&zero_copy=false"
        "&threads=8&admin=10.1.2.3:9100&replicas=2"
    ))
    assert (b.address, b.metadata, b.local, b.segment, b.buffer, b.protocol, b.timeout, b.prefix) == (
        "10.1.2.3:50051", "http://10.1.2.3:8080/metadata", "10.1.2.4:17000", 512 * MiB, 256 * MiB, "tcp", 5.0,
        "x:",
    )
    assert (b.part_size, b.retry_after, b.zero_copy, b.threads, b.admin, b.replicas) == (
        MiB, 0.5, False, 8, "10.1.2.3:9100", 2
    )
    d = MooncakeBackend.from_spec(BackendSpec.parse("mooncake://mc.internal"))
    assert (d.address, d.metadata, d.admin, d.segment, d.buffer, d.timeout, d.part_size, d.prefix) == (
        "mc.internal:50051", "http://mc.internal:8080/metadata", "mc.internal:9003", 0, 256 * MiB, 2.0, 4 * MiB,
        "kvpool:",
    )
    assert d.zero_copy and d.protocol == "tcp" and d.local is None
    assert d.capabilities == kvpool.Capabilities(
        persistent=False, durable=False, device_memory=False, partial_reads=True, remote=True, queued_io=True,
        eviction_hints=False, read_bandwidth=None,
    )
    assert d.capacity is None
    assert MooncakeBackend.from_spec(BackendSpec.parse("mooncake://127.0.0.1:7000?timeout=250ms")).timeout == 0.25
    assert isinstance(backend_from_spec("mooncake://127.0.0.1:50051"), MooncakeBackend)
    with pytest.raises(ConfigError, match="unknown option"):
        MooncakeBackend.from_spec(BackendSpec.parse("mooncake://127.0.0.1:50051?segmnt=1GiB"))
    for bad in (
        "mooncake://127.0.0.1:50051?timeout=fast",
        "mooncake://127.0.0.1:50051?timeout=-1",
        "mooncake://127.0.0.1:50051?part_size=1KiB",
        "mooncake://127.0.0.1:50051?part_size=lots",
        "mooncake://127.0.0.1:50051?part_size=64MiB&buffer=64MiB",
        "mooncake://127.0.0.1:50051?segment=-1",
        "mooncake://127.0.0.1:50051?zero_copy=maybe",
        "mooncake://127.0.0.1:50051?threads=0",
        "mooncake://127.0.0.1:50051?replicas=0",
        "mooncake://127.0.0.1:50051?protocol=t c p",
        "mooncake://127.0.0.1:port",
        "mooncake://127.0.0.1:50051/db",
        "mooncake://127.0.0.1:50051?local=a:b:c",
        "mooncake://127.0.0.1:50051?prefix=a b",
    ):
        with pytest.raises(ConfigError):
            MooncakeBackend.from_spec(BackendSpec.parse(bad))


# --- two processes sharing the remote tier ------------------------------------------------------------------
def test_two_processes_share_the_remote_tier(cluster: MooncakeCluster, tmp_path: Path) -> None:
    a, b = put_then_get(cluster.spec(prefix=_prefix(), part_size="16KiB", buffer="16MiB"), tmp_path)
    assert a["n"] == 192
    # a fresh process: its DRAM is empty, everything comes from the remote tier
    assert b == {"n": 192, "dram_hits": 0, "remote_hits": 6}
