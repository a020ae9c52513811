"""The SSD object store over ``vhost://`` against real qemu-storage-daemon targets, no mocks.

The whole conformance suite (raw hooks through ``os.pread`` of the image file: an independent channel), the
cross-transport test (written over vhost, read over uring on the same image, and back), corruption, the
target killed and restarted mid-restore, concurrent restores over several queues, and SIGKILL of the pool
process mid-write.
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import QSD, Daemon, MiB, make_image  # type: ignore[import-not-found]
from harness.local_raw import uring_where
from kvpool import BackendError, ConfigError, KVLayout, KVPool
from kvpool.ssd.store import UringBackend
from kvpool.ssd.vhost_store import VhostBackend
from kvpool.storage.backend import Backend, ReadRequest
from kvpool.storage.registry import backend_from_spec
from kvpool.testing import BackendTests
from kvpool.testing.backend_tests import rand_bytes, rand_key

sys.path.insert(0, str(Path(__file__).parent))
from concurrent_writer import data_of, key_of, size_of  # noqa: E402

pytestmark = pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon not installed (qemu-system-common)")

WRITER = str(Path(__file__).parent / "concurrent_writer.py")


def flip_byte(image: Path, pos: int) -> None:
    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        (v,) = os.pread(fd, 1, pos)
        os.pwrite(fd, bytes([v ^ 0xFF]), pos)
        os.fsync(fd)
    finally:
        os.close(fd)


class TestVhostConformance(BackendTests):
    """Every BackendTests case over ``vhost://``: one daemon per image, the image read back with os.pread."""

    queues = 2
    poll = False
    _daemons: dict[str, Daemon]

    @pytest.fixture(autouse=True)
    def _reap_daemons(self) -> Iterator[None]:
        self._daemons = {}
        yield
        for d in self._daemons.values():
            d.kill()

    async def make_backend(self, tmp_path: Path, capacity: int) -> Backend:
        tmp_path.mkdir(parents=True, exist_ok=True)
        sock = str(tmp_path / "vhost.sock")
        if sock not in self._daemons:  # the same tmp_path reopens the same image through the same target
            d = Daemon(make_image(tmp_path / "disk.img", capacity + 256 * 1024), Path(sock), queues=self.queues)
            d.start()
            self._daemons[sock] = d
        return backend_from_spec(f"vhost://{sock}?format=1&bounce=8MiB&timeout=5&poll={int(self.poll)}")

    def _image(self, backend: Backend) -> Path:
        assert isinstance(backend, VhostBackend)
        return self._daemons[backend.path].image

    async def get_raw(self, backend: Backend, key: bytes) -> bytes | None:
        where = uring_where(backend, key)
        if where is None:
            return None
        fd = os.open(self._image(backend), os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.pread(fd, where[1], where[0])
        finally:
            os.close(fd)

    async def corrupt_raw(self, backend: Backend, key: bytes) -> None:
        where = uring_where(backend, key)
        assert where is not None
        flip_byte(self._image(backend), where[0] + where[1] // 2)


class TestVhostPollConformance(TestVhostConformance):
    """The same contract with completions busy-polled (``?poll=1``)."""

    poll = True


# --- spec, capacity, cross-transport ------------------------------------------------------------------------


async def test_spec_capacity_bounds_the_device(daemon: Daemon) -> None:
    b = backend_from_spec(f"vhost://{daemon.sock}?capacity=32MiB&format=1&queues=1")
    assert isinstance(b, VhostBackend)
    async with b:
        assert b.geometry is not None and b.geometry.total == 32 * MiB
        assert b.stats()["transport"] == "vhost" and b.stats()["queues"] == 1
    with pytest.raises(ConfigError, match="exceeds"):
        async with backend_from_spec(f"vhost://{daemon.sock}?capacity=1GiB&format=1"):
            pass
    with pytest.raises(ConfigError, match="unknown option"):
        backend_from_spec(f"vhost://{daemon.sock}?capacty=1GiB")


async def test_unformatted_device_is_refused(daemon: Daemon) -> None:
    from kvpool.ssd.errors import NotAPoolError

    with pytest.raises(NotAPoolError):
        async with backend_from_spec(f"vhost://{daemon.sock}"):
            pass


async def test_cross_transport(tmp_path: Path) -> None:
    """Formatted and written over vhost, read (and written) over uring on the image file, and back."""
    image = make_image(tmp_path / "disk.img", 64 * MiB)
    d = Daemon(image, tmp_path / "v.sock")
    objs_v = {rand_key(): rand_bytes(n) for n in (4096, 3 * MiB + 17, 1 * MiB)}
    objs_u = {rand_key(): rand_bytes(n) for n in (8192, 2 * MiB + 5)}
    d.start()
    try:
        async with backend_from_spec(f"vhost://{d.sock}?format=1&bounce=8MiB") as vb:
            for k, v in objs_v.items():
                await vb.write(k, v)
    finally:
        d.kill()
    async with UringBackend(image) as ub:  # no daemon now: nothing else has the image open
        for k, v in objs_v.items():
            out = torch.empty_like(v)
            assert await ub.read_into(k, out) and torch.equal(out, v)
        for k, v in objs_u.items():
            await ub.write(k, v)
        await ub.delete(next(iter(objs_v)))
    d.start()
    try:
        async with backend_from_spec(f"vhost://{d.sock}") as vb:
            assert len(vb) == len(objs_v) - 1 + len(objs_u)
            for k, v in list(objs_v.items())[1:] + list(objs_u.items()):
                out = torch.empty_like(v)
                assert await vb.read_into(k, out) and torch.equal(out, v)
            assert not await vb.contains(next(iter(objs_v)))
    finally:
        d.kill()


async def test_corruption_is_a_miss(daemon: Daemon) -> None:
    async with backend_from_spec(f"vhost://{daemon.sock}?format=1&bounce=8MiB") as b:
        k, v = rand_key(), rand_bytes(2 * MiB)
        await b.write(k, v)
        where = uring_where(b, k)
        assert where is not None
        flip_byte(daemon.image, where[0] + 12345)
        out = torch.zeros_like(v)
        assert await b.read_into(k, out) is False
        assert b.stats()["corrupt"] == 1
        # the other parts of the object still verify: a range read outside the flipped part is data
        part = torch.empty(4096, dtype=torch.uint8)
        assert await b.read_into(k, part, 2 * MiB - 4096)
        assert torch.equal(part, v[-4096:])


# --- faults ----------------------------------------------------------------------------------------------


async def test_target_killed_and_restarted_mid_restore(daemon: Daemon) -> None:
    b = backend_from_spec(f"vhost://{daemon.sock}?format=1&bounce=16MiB&timeout=1")
    assert isinstance(b, VhostBackend)
    async with b:
        objs = {rand_key(): rand_bytes(1 * MiB) for _ in range(12)}
        for k, v in objs.items():
            await b.write(k, v)  # acknowledged: on the image before write returns
        outs = {k: torch.zeros_like(v) for k, v in objs.items()}
        daemon.signal(signal.SIGSTOP)  # the restore below is in flight when the target dies
        t0 = time.monotonic()
        task = asyncio.ensure_future(b.read_many([ReadRequest(k, o) for k, o in outs.items()]))
        await asyncio.sleep(0.2)
        daemon.kill()
        res = await task
        assert time.monotonic() - t0 < 3  # bounded by the deadline, never a hang
        assert not any(res)  # misses, not exceptions, not data
        t = b.transport
        assert t is not None and t.counters["faults"] >= 1
        with pytest.raises(BackendError):  # writes while the target is down fail (the pool skips the tier)
            await b.write(rand_key(), rand_bytes(4096))
        t1 = time.monotonic()
        assert await b.read_into(next(iter(objs)), torch.empty(1 * MiB, dtype=torch.uint8)) is False
        assert time.monotonic() - t1 < 2.5  # a call while it is down fails fast (one bounded attempt at most)
        daemon.start()
        deadline = time.monotonic() + 10
        ok = False
        while not ok and time.monotonic() < deadline:  # the next call after the back-off reconnects
            ok = await b.read_into(next(iter(objs)), outs[next(iter(objs))])
            if not ok:
                await asyncio.sleep(0.1)
        assert ok and t.counters["reconnects"] >= 1
        res = await b.read_many([ReadRequest(k, o) for k, o in outs.items()])
        assert all(res)
        for k, v in objs.items():
            assert torch.equal(outs[k], v)  # acknowledged bytes intact after the reconnect
        k2, v2 = rand_key(), rand_bytes(64 * 1024)
        await b.write(k2, v2)  # and the tier takes writes again
    async with backend_from_spec(f"vhost://{daemon.sock}") as b2:  # and all of it survives a reopen
        assert len(b2) == len(objs) + 1


async def test_concurrent_restores_over_queues(tmp_path: Path) -> None:
    d = Daemon(make_image(tmp_path / "disk.img", 128 * MiB), tmp_path / "v.sock", queues=4)
    d.start()
    try:
        b = backend_from_spec(f"vhost://{d.sock}?format=1&bounce=32MiB&queues=4")
        assert isinstance(b, VhostBackend)
        async with b:
            objs = {rand_key(): rand_bytes(2 * MiB) for _ in range(24)}
            await b.write_many(list(objs.items()))
            keys = list(objs)
            random.Random(1).shuffle(keys)
            outs = {k: torch.empty(2 * MiB, dtype=torch.uint8) for k in keys}

            async def restore(ks: list[bytes]) -> list[bool]:
                return await b.read_many([ReadRequest(k, outs[k]) for k in ks])

            parts = await asyncio.gather(*(restore(keys[i::6]) for i in range(6)))
            assert all(all(p) for p in parts)
            for k, v in objs.items():
                assert torch.equal(outs[k], v)
            t = b.transport
            assert t is not None and t.raw.num_queues == 4
            reaped = [t.raw.queue_info(q)["reaped"] for q in range(4)]
            assert sum(1 for r in reaped if r > 0) >= 2, reaped  # the requests spread over the queues
    finally:
        d.kill()


# --- SIGKILL of the pool process mid-write ----------------------------------------------------------------


def _run_and_kill(spec: str, run: int, kill_after: int) -> set[int]:
    proc = subprocess.Popen([sys.executable, WRITER, spec, str(run), "16", "600"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    acked: set[int] = set()
    assert proc.stdout is not None
    deadline = time.time() + 60
    try:
        while len(acked) < kill_after and time.time() < deadline:
            line = proc.stdout.readline()
            if not line or line.startswith("done"):
                break
            acked.add(int(line.split()[2]))
        os.kill(proc.pid, signal.SIGKILL)
        for line in proc.stdout.read().splitlines():
            if line.startswith("ack"):
                acked.add(int(line.split()[2]))
    finally:
        proc.kill()
        proc.wait()
    return acked


async def test_sigkill_mid_write_keeps_acknowledged_puts(tmp_path: Path) -> None:
    d = Daemon(make_image(tmp_path / "disk.img", 16 * MiB), tmp_path / "v.sock")
    d.start()
    try:
        spec = f"vhost://{d.sock}?format=1&bounce=4MiB"
        for run, kill_after in enumerate((40, 250)):
            # the target notices the killed frontend and waits for the next one on the same socket
            acked = await asyncio.to_thread(_run_and_kill, spec, run, kill_after)
            assert len(acked) >= kill_after
            async with backend_from_spec(spec) as b:
                for i in sorted(acked):
                    out = torch.empty(size_of(i), dtype=torch.uint8)
                    assert await b.read_into(key_of(run, i), out), f"acknowledged put {i} of run {run} lost"
                    assert torch.equal(out, data_of(run, i))
    finally:
        d.kill()


# --- under a KVPool: the staging arena shared with the target ---------------------------------------------


def _small_layout() -> KVLayout:
    # 4 KiB per (layer, k/v) run of a chunk: every run of a chunk view is a whole number of sectors
    return KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.float16, chunk_tokens=16)


def _vhost_tier(pool: KVPool) -> VhostBackend:
    (tier,) = pool.tiers
    assert isinstance(tier, VhostBackend)
    return tier


async def test_pool_reads_into_the_shared_arena_with_no_copy(daemon: Daemon) -> None:
    lay = _small_layout()
    tokens = np.arange(64, dtype=np.int64)
    kv = torch.randn(lay.kv_shape(64), dtype=lay.dtype)
    async with await KVPool.open(layout=lay, model_id="vhost-arena",
                                 backends=[f"vhost://{daemon.sock}?format=1"]) as pool:
        await pool.ready()  # only populated arena memory is handed out
        tier = _vhost_tier(pool)
        st = tier.stats()
        assert st["arena_shared"] and st["mem_table_updates"] == 1  # sent again on the live connection
        t = tier.transport
        assert t is not None and (pool._staging.address, pool._staging.nbytes) in t.raw.shared_memory
        assert await pool.put(tokens, kv) == 64
        s0 = tier.stats()
        got = await pool.get(tokens)
        out = pool.empty(64)
        assert await pool.get_into(tokens, out) == 64
        s1 = tier.stats()
        assert torch.equal(got, kv) and torch.equal(out, kv)
        assert pool._staging.contains(got.data_ptr(), got.numel() * 2)  # results live in the arena ...
        assert s1["direct_reads"] - s0["direct_reads"] == 8  # ... and were read there by the target:
        assert s1["bounce_reads"] == s0["bounce_reads"]  # no bounce buffer,
        assert s1["staged_ops"] == s0["staged_ops"]  # no staged copy
        # a caller's own tensor is outside the shared memory: that read does bounce (the counters discriminate)
        mine = torch.empty(lay.kv_shape(64), dtype=lay.dtype)
        assert await pool.get_into(tokens, mine) == 64 and torch.equal(mine, kv)
        s2 = tier.stats()
        assert s2["bounce_reads"] - s1["bounce_reads"] == 4 and s2["direct_reads"] == s1["direct_reads"]


async def test_pool_target_restarted_mid_restore_shares_the_arena_again(daemon: Daemon) -> None:
    lay = _small_layout()
    prompts = [np.arange(64, dtype=np.int64) + i * 1000 for i in range(6)]
    kvs = [torch.randn(lay.kv_shape(64), dtype=lay.dtype) for _ in prompts]
    async with await KVPool.open(layout=lay, model_id="vhost-arena",
                                 backends=[f"vhost://{daemon.sock}?format=1&timeout=1"]) as pool:
        await pool.ready()
        tier = _vhost_tier(pool)
        for p, kv in zip(prompts, kvs):
            assert await pool.put(p, kv) == 64  # acknowledged: on the image
        daemon.signal(signal.SIGSTOP)  # the restore below is in flight when the target dies
        t0 = time.monotonic()
        task = asyncio.ensure_future(asyncio.gather(*(pool.get(p) for p in prompts)))
        await asyncio.sleep(0.2)
        daemon.kill()
        lost = await task
        assert time.monotonic() - t0 < 3  # bounded by the deadline
        assert all(x.shape[2] == 0 for x in lost)  # misses, not exceptions, not garbage
        del lost
        t = tier.transport
        assert t is not None and t.counters["faults"] >= 1
        daemon.start()
        s0 = tier.stats()
        deadline = time.monotonic() + 10
        got = await pool.get(prompts[0])
        while got.shape[2] == 0 and time.monotonic() < deadline:  # the next call after the back-off reconnects
            await asyncio.sleep(0.1)
            got = await pool.get(prompts[0])
        assert got.shape[2] == 64 and torch.equal(got, kvs[0])
        assert t.counters["reconnects"] >= 1
        # the new connection's table holds the arena again: every read lands in it directly
        outs = await asyncio.gather(*(pool.get(p) for p in prompts))
        for x, kv in zip(outs, kvs):
            assert x.shape[2] == 64 and torch.equal(x, kv)
            assert pool._staging.contains(x.data_ptr(), x.numel() * 2)
        s1 = tier.stats()
        assert s1["bounce_reads"] == s0["bounce_reads"] and s1["direct_reads"] - s0["direct_reads"] >= 4 * 7


async def test_pool_hugetlb_required_keeps_a_4k_page_arena_private(hugepages: int, daemon: Daemon) -> None:
    """``hugetlb=1`` (SPDK in iova=pa mode): the region takes the reserved pages, the 64 MiB arena gets none,
    so it is not offered to the target (SPDK could not DMA into it); reads into it bounce and stay correct."""
    lay = _small_layout()
    tokens = np.arange(32, dtype=np.int64)
    kv = torch.randn(lay.kv_shape(32), dtype=lay.dtype)
    async with await KVPool.open(layout=lay, model_id="vhost-arena",
                                 backends=[f"vhost://{daemon.sock}?format=1&hugetlb=1&bounce=4MiB"]) as pool:
        await pool.ready()
        tier = _vhost_tier(pool)
        st = tier.stats()
        assert st["region_hugetlb"] and not pool._staging.hugetlb
        assert not st["arena_shared"] and st["mem_table_updates"] == 0
        assert await pool.put(tokens, kv) == 32
        s0 = tier.stats()
        got = await pool.get(tokens)
        assert torch.equal(got, kv)
        s1 = tier.stats()
        assert s1["bounce_reads"] - s0["bounce_reads"] == 2 and s1["direct_reads"] == s0["direct_reads"]
        t = tier.transport
        assert t is not None
        start = f"{t.raw.region_address:x}-"
    # the region's huge pages are unmapped once the closed pool is dropped (nothing scheduled keeps it alive)
    del pool, tier, got, t
    gc.collect()
    assert not [m for m in Path("/proc/self/maps").read_text().splitlines() if m.startswith(start)]
