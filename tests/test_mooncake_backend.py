"""The mooncake:// tier against a real Mooncake Store on loopback ports (no mocks).

A cluster is one ``mooncake_master`` (with its HTTP metadata server) and one storage node (the wheel's
``mooncake_client``, lending a segment of its memory); the pools under test are pure clients. One session-wide
cluster serves most tests (each test uses its own key prefix); the fault tests (SIGKILL, SIGSTOP) start a
cluster of their own. Every process is stopped in teardown.

Needs the client wheel: ``pip install mooncake-transfer-engine-non-cuda`` (or the efa-non-cuda build plus
``apt-get install libfabric1``); the module is skipped, with the import error, without it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

try:
    import mooncake
    from mooncake.store import MooncakeDistributedStore
except ImportError as _exc:  # the wheel, or a shared library it needs (libfabric.so.1, libcuda.so.1), is missing
    pytest.skip(
        f"the Mooncake Store client cannot be imported ({_exc}); pip install mooncake-transfer-engine-non-cuda "
        "(the efa-non-cuda build also needs apt-get install libfabric1)",
        allow_module_level=True,
    )


def _binary(name: str) -> str | None:
    here = os.path.join(os.path.dirname(mooncake.__file__), name)
    if os.path.isfile(here) and os.access(here, os.X_OK):
        return here
    return shutil.which(name)


MASTER_BIN = _binary("mooncake_master")
NODE_BIN = _binary("mooncake_client")
if MASTER_BIN is None or NODE_BIN is None:
    pytest.skip("the Mooncake wheel installed no mooncake_master / mooncake_client binary", allow_module_level=True)

import kvpool  # noqa: E402
from kvpool import BackendError, ConfigError, KVLayout, KVPool  # noqa: E402
from kvpool.storage.backend import ReadRequest  # noqa: E402
from kvpool.remote.mooncake import MooncakeBackend  # noqa: E402
from kvpool.config import BackendSpec  # noqa: E402
from kvpool.storage.registry import backend_from_spec  # noqa: E402
from kvpool.testing import BackendTests  # noqa: E402
from kvpool.testing.backend_tests import rand_bytes, rand_key  # noqa: E402

KiB = 1 << 10
MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[1]


# --- servers ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _http(port: int, path: str) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return str(r.read().decode())
    except OSError:
        return None


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        try:
            proc.send_signal(signal.SIGCONT)  # a paused process cannot act on SIGTERM
            proc.terminate()
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class MooncakeCluster:
    """``mooncake_master`` (RPC, HTTP metadata and admin servers on free loopback ports) and one storage node
    lending ``segment`` bytes."""

    def __init__(self, workdir: Path, segment: str = "1GB") -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.master: subprocess.Popen[bytes] | None = None
        self.node: subprocess.Popen[bytes] | None = None
        try:
            self._start_master(workdir)
            self._start_node(workdir, segment)
        except BaseException:
            self.stop()
            raise

    def _start_master(self, workdir: Path) -> None:
        assert MASTER_BIN is not None
        for _attempt in range(5):
            self.port, self.meta_port, self.admin_port = _free_port(), _free_port(), _free_port()
            if len({self.port, self.meta_port, self.admin_port}) < 3:
                continue
            self.master_log = workdir / f"master-{self.port}.log"
            with open(self.master_log, "wb") as log:
                self.master = subprocess.Popen(
                    [MASTER_BIN, f"--rpc_port={self.port}", "--rpc_address=127.0.0.1",
                     "--enable_http_metadata_server=true", "--http_metadata_server_host=127.0.0.1",
                     f"--http_metadata_server_port={self.meta_port}", "--metrics_host=127.0.0.1",
                     f"--metrics_port={self.admin_port}", "--logtostderr"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                )
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self.master.poll() is None:
                if all(_listening(p) for p in (self.port, self.meta_port)) and _http(
                    self.admin_port, "/get_all_segments"
                ) is not None:
                    return
                time.sleep(0.05)
            _stop(self.master)  # a port was taken meanwhile, or the master failed: try others
        raise RuntimeError(f"mooncake_master did not start; see {self.master_log}")

    def _start_node(self, workdir: Path, segment: str) -> None:
        assert NODE_BIN is not None
        for _attempt in range(3):
            self.node_port = _free_port()
            self.node_log = workdir / f"node-{self.node_port}.log"
            with open(self.node_log, "wb") as log:
                self.node = subprocess.Popen(
                    [NODE_BIN, f"--global_segment_size={segment}", "--host=127.0.0.1", f"--port={self.node_port}",
                     f"--master_server_address=127.0.0.1:{self.port}", f"--metadata_server={self.metadata}"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                )
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.node.poll() is None:
                if (_http(self.admin_port, "/get_all_segments") or "").strip():
                    return  # its segment is mounted
                time.sleep(0.05)
            _stop(self.node)
        raise RuntimeError(f"the mooncake storage node did not start; see {self.node_log}")

    @property
    def metadata(self) -> str:
        return f"http://127.0.0.1:{self.meta_port}/metadata"

    @property
    def master_address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def spec(self, **opts: Any) -> str:
        q = {"metadata": self.metadata, "admin": f"127.0.0.1:{self.admin_port}", **opts}
        return f"mooncake://{self.master_address}?" + "&".join(f"{k}={v}" for k, v in q.items())

    def backend(self, **kw: Any) -> MooncakeBackend:
        kw.setdefault("prefix", _prefix())
        kw.setdefault("buffer", 32 * MiB)
        return MooncakeBackend(self.master_address, metadata=self.metadata, admin=f"127.0.0.1:{self.admin_port}",
                               **kw)

    def all_keys(self) -> list[str]:
        return (_http(self.admin_port, "/get_all_keys") or "").split()

    def stop(self) -> None:
        _stop(self.node)
        _stop(self.master)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MooncakeCluster]:
    c = MooncakeCluster(tmp_path_factory.mktemp("mooncake"))
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[MooncakeCluster]:
    """A cluster of this test's own (to kill or pause its master)."""
    c = MooncakeCluster(tmp_path / "own", segment="256MB")
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session")
def raw(cluster: MooncakeCluster) -> Iterator[Any]:
    """A plain client of the session cluster, to look at and damage what the backend stored."""
    s = MooncakeDistributedStore()
    assert s.setup("127.0.0.1", cluster.metadata, 0, 64 * MiB, "tcp", "", cluster.master_address) == 0
    try:
        yield s
    finally:
        s.close()


def _prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}:"


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
    def _cluster(self, cluster: MooncakeCluster) -> None:
        self.cluster = cluster

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
    assert any(s.strip() for s in (_http(cluster.admin_port, "/get_all_segments") or "").splitlines())


# --- a master that dies or stalls -----------------------------------------------------------------------------
async def test_master_killed_mid_run(own_cluster: MooncakeCluster) -> None:
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float16, chunk_tokens=16)
    remote = own_cluster.backend(timeout=0.5, retry_after=0.2)
    tokens = np.arange(64)
    kv = torch.randn(layout.kv_shape(64)).to(torch.float16)
    pool = await KVPool.open(layout=layout, model_id="m", backends=["dram://?capacity=1MiB", remote])
    async with pool:
        assert await pool.put(tokens, kv) == 64
        keys = pool.keys_for(tokens)
        assert await remote.contains_many(keys) == [True] * 4
        assert own_cluster.master is not None
        own_cluster.master.send_signal(signal.SIGKILL)
        own_cluster.master.wait(5)
        dest = torch.empty(layout.chunk_nbytes, dtype=torch.uint8)
        for _ in range(2):  # the first call of each round meets the dead master, the others the open breaker
            t0 = time.monotonic()
            assert await remote.read_into(keys[0], dest) is False
            assert await remote.contains(keys[0]) is False
            assert await remote.contains_many(keys) == [False] * 4
            assert await remote.read_many([ReadRequest(k, dest) for k in keys[:2]]) == [False, False]
            assert await remote.object_size(keys[0]) is None
            assert time.monotonic() - t0 < 1.5
            await asyncio.sleep(0.25)
        # the pool keeps serving what DRAM holds
        assert await pool.lookup(tokens) == 64
        got = await pool.get(tokens)
        assert torch.equal(got, kv)
        # writes fail loudly, and the pool rolls the DRAM copy back
        with pytest.raises(BackendError):
            await pool.put(np.arange(100, 132), torch.randn(layout.kv_shape(32)).to(torch.float16))
        assert await pool.lookup(np.arange(100, 132)) == 0
        st = remote.stats()
        assert st["timeouts"] + st["errors"] >= 1 and st["misses"] >= 1
        assert st["address"] == own_cluster.master_address
    assert not remote.is_open


async def test_paused_master_reads_time_out(own_cluster: MooncakeCluster) -> None:
    async with own_cluster.backend(timeout=0.5, retry_after=0.3, part_size=16 * KiB) as b:
        k1, k2 = rand_key(), rand_key()
        d1, d2 = rand_bytes(4 * KiB, 1), rand_bytes(64 * KiB, 2)
        await b.write_many([(k1, d1), (k2, d2)])
        o1, o2 = torch.empty_like(d1), torch.empty_like(d2)
        assert own_cluster.master is not None
        own_cluster.master.send_signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            assert await b.read_into(k2, o2) is False
            assert 0.4 < time.monotonic() - t0 < 1.2
            t0 = time.monotonic()
            assert await b.read_into(k1, o1) is False  # the breaker answers at once
            assert await b.contains(k1) is False
            assert time.monotonic() - t0 < 0.2
            await asyncio.sleep(0.35)
            t0 = time.monotonic()
            assert await b.contains_many([k1, k2]) == [False, False]
            assert 0.4 < time.monotonic() - t0 < 1.2
            with pytest.raises(BackendError):
                await b.write(rand_key(), d1)
            assert b.stats()["timeouts"] == 2
        finally:
            own_cluster.master.send_signal(signal.SIGCONT)
        # the tier comes back by itself once the master answers again
        await asyncio.sleep(0.35)
        deadline = time.monotonic() + 10
        while not await b.read_into(k2, o2):
            assert time.monotonic() < deadline, b.stats()
            await asyncio.sleep(0.2)
        assert torch.equal(o2, d2)
        assert await b.read_into(k1, o1) and torch.equal(o1, d1)


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
_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys
    import numpy as np, torch, kvpool

    async def main(role: str, spec: str) -> None:
        layout = kvpool.KVLayout(num_layers=4, num_kv_heads=2, head_dim=32, dtype=torch.bfloat16,
                                 chunk_tokens=32)
        tokens = np.random.default_rng(1).integers(0, 50_000, 200)
        kv = torch.randn(layout.kv_shape(200), generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
        async with await kvpool.KVPool.open(layout=layout, model_id="m",
                                            backends=["dram://?capacity=8MiB", spec]) as pool:
            if role == "put":
                n = await pool.put(tokens, kv)
            else:
                n = await pool.lookup(tokens)
                got = await pool.get(tokens)
                assert torch.equal(got, kv[:, :, :n]), "data differs"
            st = pool.stats()["tiers"]
            print(json.dumps({"n": n, "dram_hits": st[0]["hits"], "remote_hits": st[1]["hits"]}))

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


def test_two_processes_share_the_remote_tier(cluster: MooncakeCluster, tmp_path: Path) -> None:
    script = tmp_path / "proc.py"
    script.write_text(_SCRIPT)
    spec = cluster.spec(prefix=_prefix(), part_size="16KiB", buffer="16MiB")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def run(role: str) -> dict[str, int]:
        p = subprocess.run([sys.executable, str(script), role, spec], capture_output=True, text=True, env=env,
                           timeout=60, check=False)
        assert p.returncode == 0, p.stderr[-3000:]
        result: dict[str, int] = json.loads(p.stdout.strip().splitlines()[-1])
        return result

    a = run("put")
    assert a["n"] == 192
    b = run("get")  # a fresh process: its DRAM is empty, everything comes from the remote tier
    assert b == {"n": 192, "dram_hits": 0, "remote_hits": 6}
