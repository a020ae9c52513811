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
    import mooncake.store  # noqa: F401 - the module is skipped without the client
except ImportError as _exc:  # the wheel, or a shared library it needs (libfabric.so.1, libcuda.so.1), is missing
    pytest.skip(
        f"the Mooncake Store client cannot be imported ({_exc}); pip install mooncake-transfer-engine-non-cuda "
        "(the efa-non-cuda build also needs apt-get install libfabric1)",
        allow_module_level=True,
    )

from harness.procs import put_then_get
from harness.raw import RemoteRaw, in_thread
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


@pytest.fixture
def cluster(mooncake_cluster: MooncakeCluster) -> MooncakeCluster:
    return mooncake_cluster


def _part_names(cluster: MooncakeCluster, b: MooncakeBackend, key: bytes) -> list[str]:
    head = f"{b.prefix}{key.hex()}:"
    names = [n for n in cluster.all_keys() if n.startswith(head)]
    return sorted(names, key=lambda n: int(n.rsplit(":", 1)[1]))


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
class TestMooncakeConformance(RemoteRaw, BackendTests):
    """The shipped suite; its raw hooks go through a second, plain Mooncake client
    (:class:`harness.raw.RemoteRaw`)."""

    bounded = False

    @pytest.fixture(autouse=True)
    def _cluster(self, mooncake_cluster: MooncakeCluster, mooncake_raw: Any) -> Iterator[None]:
        self.cluster = mooncake_cluster
        self.raw_client = mooncake_raw
        yield
        # pytest keeps test instances to the end: a client referenced here would be destroyed (and log)
        # after the summary
        del self.raw_client

    async def _get(self, name: str) -> bytes | None:
        v = await in_thread(self.raw_client.get, name)
        return bytes(v) if v else None

    async def _put(self, name: str, value: bytes) -> None:
        assert await in_thread(self.raw_client.upsert, name, value) == 0

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


# --- buffer, replacement, lookups (the format shared with redis:// is in tests/remote/test_objects.py) -------
async def test_readers_share_a_small_buffer(cluster: MooncakeCluster) -> None:
    # many readers at once share a 2.5 MiB transfer buffer: they wait for room, none fails
    async with cluster.backend(part_size=MiB, buffer=5 * MiB // 2) as b:
        items = [(rand_key(), rand_bytes(3 * MiB // 2, i)) for i in range(6)]
        await b.write_many(items)
        outs = [torch.empty_like(x) for _, x in items]
        res = await asyncio.gather(*(b.read_into(kk, o) for (kk, _), o in zip(items, outs)))
        assert res == [True] * 6
        assert all(torch.equal(o, x) for (_, x), o in zip(items, outs))
        st = b.stats()
        assert st["buffer_waits"] >= 1 and st["buffer_free"] == st["buffer"]


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
        eviction_hints=False, host_memory="none", read_bandwidth=None,
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
