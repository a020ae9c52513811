"""VhostBlkTransport against a real vhost-user-blk server (qemu-storage-daemon), no mocks.

Every test starts its own daemon on a fresh image (``cache.direct=on``, io_uring); data is checked
through an independent channel, the image file itself.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from kvpool.ssd.vhost_transport import (
    VhostBlkTransport,
    VhostDisconnectedError,
    VhostError,
    VhostOp,
    VhostTimeoutError,
    parse_vhost_spec,
)

from conftest import QSD, Daemon  # type: ignore[import-not-found]  # noqa: F401  (daemon fixture there)
pytestmark = pytest.mark.skipif(
    QSD is None, reason="qemu-storage-daemon not installed (apt-get install qemu-system-common)"
)

MiB = 1 << 20
IMAGE_BYTES = 64 * MiB


@pytest.fixture(params=["eventfd", "poll"])
async def transport(request: pytest.FixtureRequest, daemon: Daemon) -> AsyncIterator[VhostBlkTransport]:
    t = await VhostBlkTransport.connect(str(daemon.sock), region_bytes=48 * MiB, poll=request.param == "poll",
                                        timeout=10)
    try:
        yield t
    finally:
        await t.aclose()


def rand(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)


def file_read(path: Path, off: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


# --- configuration --------------------------------------------------------------------------------------


async def test_config_matches_image(transport: VhostBlkTransport) -> None:
    assert transport.capacity_bytes == IMAGE_BYTES
    assert transport.block_size == 512
    assert transport.num_queues == 2
    assert transport.seg_max >= 1
    assert transport.max_segment >= 4096 and transport.max_segment % 4096 == 0
    assert not transport.read_only
    assert transport.region_address % (2 * MiB) == 0
    assert transport.region.numel() == 48 * MiB


async def test_queue_subset_and_too_many_queues(daemon: Daemon) -> None:
    t = await VhostBlkTransport.connect(str(daemon.sock), queues=1, region_bytes=4 * MiB)
    assert t.num_queues == 1
    await t.aclose()
    with pytest.raises(VhostError, match="2 queue"):
        await VhostBlkTransport.connect(str(daemon.sock), queues=4, region_bytes=4 * MiB)


async def test_connect_missing_socket_fails_fast(tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(VhostError) as ei:
        await VhostBlkTransport.connect(str(tmp_path / "nope.sock"), region_bytes=2 * MiB, timeout=5)
    assert ei.value.errno == errno.ENOENT
    assert time.monotonic() - t0 < 2


def test_parse_spec() -> None:
    assert parse_vhost_spec("vhost:///run/spdk/vhost.0") == ("/run/spdk/vhost.0", {})
    assert parse_vhost_spec("vhost:///a/b?capacity=1G") == ("/a/b", {"capacity": "1G"})
    with pytest.raises(ValueError):
        parse_vhost_spec("vhost://host/a")


# --- data path --------------------------------------------------------------------------------------------


async def test_write_then_read_back_vs_image_file(transport: VhostBlkTransport, daemon: Daemon) -> None:
    src = transport.alloc(3 * MiB)
    src.tensor.copy_(rand(3 * MiB, 1))
    offs = [0, 5 * MiB + 4096, IMAGE_BYTES - 3 * MiB]
    res = await transport.submit([VhostOp.write(o, src.iov()) for o in offs])
    assert res == [3 * MiB] * 3
    assert await transport.submit([VhostOp.flush()]) == [0]
    expect = bytes(src.tensor.numpy())
    for o in offs:  # independent channel: the image file
        assert file_read(daemon.image, o, 3 * MiB) == expect
    # ... and the other direction: bytes put into the file are what the transport reads.
    other = rand(1 * MiB, 2)
    with open(daemon.image, "r+b") as f:  # noqa: ASYNC230  (test setup, not on a hot path)
        f.seek(20 * MiB)
        f.write(bytes(other.numpy()))
        f.flush()
        os.fsync(f.fileno())
    dst = transport.alloc(1 * MiB)
    assert await transport.submit([VhostOp.read(20 * MiB, dst.iov())]) == [1 * MiB]
    assert torch.equal(dst.tensor, other)


async def test_many_requests_per_kick(transport: VhostBlkTransport, daemon: Daemon) -> None:
    buf = transport.alloc(128 * 4096)
    buf.tensor.copy_(rand(buf.nbytes, 3))
    before = transport.stats["kicks"] + transport.stats["kicks_suppressed"]
    ops = [VhostOp.write(i * 8192, buf.iov(i * 4096, 4096)) for i in range(128)]
    assert await transport.submit(ops) == [4096] * 128
    publishes = transport.stats["kicks"] + transport.stats["kicks_suppressed"] - before
    assert publishes <= 2 * transport.num_queues  # one publish per queue per pump, not one per request
    raw = file_read(daemon.image, 0, 128 * 8192)
    for i in range(128):
        assert raw[i * 8192:i * 8192 + 4096] == bytes(buf.tensor[i * 4096:(i + 1) * 4096].numpy())


async def test_several_queues_concurrently(transport: VhostBlkTransport, daemon: Daemon) -> None:
    n, size = 16, 1 * MiB
    src = transport.alloc(n * size)
    src.tensor.copy_(rand(n * size, 4))
    await asyncio.gather(*(transport.submit([VhostOp.write(i * size, src.iov(i * size, size))]) for i in range(n)))
    dst = transport.alloc(n * size)
    reaped0 = [transport.queue_info(q)["reaped"] for q in range(2)]
    results = await asyncio.gather(*(transport.submit([VhostOp.read(i * size, dst.iov(i * size, size))])
                                     for i in range(n)))
    assert results == [[size]] * n
    assert torch.equal(src.tensor, dst.tensor)
    assert all(transport.queue_info(q)["reaped"] > reaped0[q] for q in range(2)), "both queues carried I/O"
    assert file_read(daemon.image, 0, n * size) == bytes(src.tensor.numpy())


async def test_multi_segment_requests(transport: VhostBlkTransport, daemon: Daemon) -> None:
    # 300 scattered 4 KiB iovecs: more than seg_max (126 on qemu) so the op spans several requests.
    n = 300
    assert n > transport.seg_max
    pool = transport.alloc(2 * n * 4096)
    iovs = [(pool.addr + (2 * i + 1) * 4096, 4096) for i in range(n)]  # every other page
    data = rand(n * 4096, 5)
    for i in range(n):
        pool.tensor[(2 * i + 1) * 4096:(2 * i + 2) * 4096] = data[i * 4096:(i + 1) * 4096]
    assert await transport.submit([VhostOp.write(MiB, iovs)]) == [n * 4096]
    assert file_read(daemon.image, MiB, n * 4096) == bytes(data.numpy())
    # One iovec larger than size_max is split into several descriptors.
    big = transport.alloc(2 * transport.max_segment + 8192)
    assert await transport.submit([VhostOp.read(MiB, big.iov(0, n * 4096))]) == [n * 4096]
    assert torch.equal(big.tensor[:n * 4096], data)


async def test_ring_smaller_than_batch(daemon: Daemon) -> None:
    # 8-entry rings: a 64-op batch must wait for descriptors and still complete in full.
    t = await VhostBlkTransport.connect(str(daemon.sock), region_bytes=4 * MiB, queue_size=8)
    try:
        buf = t.alloc(64 * 4096)
        buf.tensor.copy_(rand(buf.nbytes, 6))
        assert await t.submit([VhostOp.write(i * 4096, buf.iov(i * 4096, 4096)) for i in range(64)]) == [4096] * 64
        assert file_read(daemon.image, 0, 64 * 4096) == bytes(buf.tensor.numpy())
    finally:
        await t.aclose()


async def test_event_idx_off(daemon: Daemon) -> None:
    # Without VIRTIO_RING_F_EVENT_IDX the VRING_USED_F_NO_NOTIFY / NO_INTERRUPT flags are the protocol.
    for poll in (False, True):
        t = await VhostBlkTransport.connect(str(daemon.sock), region_bytes=4 * MiB, event_idx=False, poll=poll)
        try:
            buf = t.alloc(MiB)
            buf.tensor.copy_(rand(MiB, 7))
            assert await t.submit([VhostOp.write(i * 65536, buf.iov(i * 65536, 65536)) for i in range(16)]) \
                == [65536] * 16
            out = t.alloc(MiB)
            assert await t.submit([VhostOp.read(0, out.iov())]) == [MiB]
            assert torch.equal(out.tensor, buf.tensor)
        finally:
            await t.aclose()


async def test_flush(transport: VhostBlkTransport) -> None:
    buf = transport.alloc(4096)
    res = await transport.submit([VhostOp.write(0, buf.iov())])
    assert res == [4096]
    assert await transport.submit([VhostOp.flush(), VhostOp.flush()]) == [0, 0]


async def test_read_past_end_is_an_error(transport: VhostBlkTransport) -> None:
    buf = transport.alloc(8192)
    cap = transport.capacity_bytes
    res = await transport.submit([VhostOp.read(cap, buf.iov(0, 4096)), VhostOp.read(cap - 4096, buf.iov()),
                                  VhostOp.read(cap - 4096, buf.iov(0, 4096))])
    assert res[0] == -errno.EIO and res[1] == -errno.EIO
    assert res[2] == 4096  # the last block itself is fine, and errors do not poison the batch


async def test_malformed_ops_rejected_before_submission(transport: VhostBlkTransport) -> None:
    outside = torch.empty(4096, dtype=torch.uint8)
    assert not transport.contains(outside.data_ptr(), 4096)
    buf = transport.alloc(4096)
    assert transport.contains(buf.addr, 4096) and not transport.contains(buf.addr, 0)
    assert not transport.contains(transport.region_address + transport.region.numel() - 4096, 8192)
    with pytest.raises(ValueError, match="outside the shared region"):
        await transport.submit([VhostOp.read(0, [(outside.data_ptr(), 4096)])])
    with pytest.raises(ValueError, match="multiple of 512"):
        await transport.submit([VhostOp.read(100, buf.iov())])
    with pytest.raises(ValueError, match="multiple of 512"):
        await transport.submit([VhostOp.read(0, [(buf.addr, 100)])])
    assert transport.in_flight == 0


# --- faults ----------------------------------------------------------------------------------------------


async def test_daemon_killed_mid_restore_fails_promptly(transport: VhostBlkTransport, daemon: Daemon) -> None:
    bufs = [transport.alloc(2 * MiB) for _ in range(8)]
    daemon.signal(signal.SIGSTOP)  # guarantees the requests are in flight when the target dies
    task = asyncio.create_task(transport.submit([VhostOp.read(i * 2 * MiB, b.iov()) for i, b in enumerate(bufs)]))
    await asyncio.sleep(0.2)
    assert not task.done()
    t0 = time.monotonic()
    daemon.kill()
    with pytest.raises(VhostDisconnectedError, match="closed the connection") as ei:
        await asyncio.wait_for(task, 5)
    assert time.monotonic() - t0 < 2
    assert ei.value.results == [None] * 8
    assert not transport.connected
    assert transport.quarantined  # the target had these buffers and never released them
    transport.free(bufs[0])
    with pytest.raises(MemoryError):  # withheld spans are not handed out again...
        for _ in range(100):
            transport.alloc(2 * MiB)
    with pytest.raises(VhostDisconnectedError, match="reconnect"):
        await transport.submit([VhostOp.flush()])
    assert transport.release_quarantine() == 1  # ...until released


async def test_reconnect_after_restart_keeps_acknowledged_writes(transport: VhostBlkTransport,
                                                                 daemon: Daemon) -> None:
    buf = transport.alloc(4 * MiB)
    buf.tensor.copy_(rand(4 * MiB, 8))
    assert await transport.submit([VhostOp.write(8 * MiB, buf.iov())]) == [4 * MiB]
    daemon.kill()
    await asyncio.sleep(0.1)
    assert not transport.connected

    async def restart_later() -> None:
        await asyncio.sleep(0.3)
        daemon.start()

    restarter = asyncio.create_task(restart_later())
    await transport.reconnect(timeout=10)  # waits for the socket to come back
    await restarter
    assert transport.connected and transport.capacity_bytes == IMAGE_BYTES
    out = transport.alloc(4 * MiB)
    assert await transport.submit([VhostOp.read(8 * MiB, out.iov())]) == [4 * MiB]
    assert torch.equal(out.tensor, buf.tensor)
    assert transport.stats["reconnects"] == 1


async def test_hung_target_hits_deadline(transport: VhostBlkTransport, daemon: Daemon) -> None:
    buf = transport.alloc(MiB)
    daemon.signal(signal.SIGSTOP)
    t0 = time.monotonic()
    with pytest.raises(VhostTimeoutError, match="within the deadline"):
        await transport.submit([VhostOp.read(0, buf.iov())], timeout=0.5)
    assert 0.4 < time.monotonic() - t0 < 2
    assert not transport.connected
    assert (buf.addr, MiB) in transport.quarantined
    daemon.signal(signal.SIGCONT)
    await transport.reconnect(timeout=10)
    assert await transport.submit([VhostOp.read(0, transport.alloc(4096).iov())]) == [4096]


async def test_cancel_waits_for_target_to_finish_with_buffers(transport: VhostBlkTransport,
                                                               daemon: Daemon) -> None:
    buf = transport.alloc(4 * MiB)
    daemon.signal(signal.SIGSTOP)
    task = asyncio.create_task(transport.submit([VhostOp.read(i * MiB, buf.iov(i * MiB, MiB)) for i in range(4)]))
    await asyncio.sleep(0.1)
    task.cancel()
    await asyncio.sleep(0.3)
    # The target still holds the descriptors: the cancelled call must not have returned yet.
    assert not task.done()
    daemon.signal(signal.SIGCONT)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert transport.in_flight == 0
    assert transport.connected and not transport.quarantined
    for q in range(transport.num_queues):
        info = transport.queue_info(q)
        assert info["free"] == info["num"] and info["outstanding"] == 0
    # The transport is still usable.
    assert await transport.submit([VhostOp.read(0, buf.iov(0, 4096))]) == [4096]


async def test_cancel_before_submission_touches_nothing(transport: VhostBlkTransport) -> None:
    buf = transport.alloc(4096)
    task = asyncio.create_task(transport.submit([VhostOp.read(0, buf.iov())]))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert transport.in_flight == 0


async def test_aclose_is_idempotent_and_final(daemon: Daemon) -> None:
    t = await VhostBlkTransport.connect(str(daemon.sock), region_bytes=2 * MiB)
    region = t.region
    await t.aclose()
    await t.aclose()
    assert not t.connected
    region[:10] = 1  # the mapping outlives the connection while views exist
    with pytest.raises(VhostDisconnectedError, match="closed"):
        await t.submit([VhostOp.flush()])


# --- memory the caller owns, shared beside the region ----------------------------------------------------


class _Memfd:
    """A MAP_SHARED memfd mapping (what the pool's staging arena is), with its address."""

    def __init__(self, nbytes: int) -> None:
        import ctypes
        import mmap

        self.fd = os.memfd_create("test-extra", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, nbytes)
        self.map = mmap.mmap(self.fd, nbytes, flags=mmap.MAP_SHARED)
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        self.nbytes = nbytes
        self.tensor = torch.frombuffer(self.map, dtype=torch.uint8)


async def test_add_memory_live_then_across_a_restart(transport: VhostBlkTransport, daemon: Daemon) -> None:
    src = transport.alloc(4 * MiB)
    src.tensor.copy_(rand(4 * MiB, 21))
    assert await transport.submit([VhostOp.write(8 * MiB, src.iov())]) == [4 * MiB]
    m = _Memfd(8 * MiB)
    with pytest.raises(ValueError, match="outside the shared region"):  # not shared yet: refused, not sent
        await transport.submit([VhostOp.read(8 * MiB, [(m.addr, 4096)])])
    # requests in flight while the table is replaced: they finish first, new ones wait for the new table
    scratch = transport.alloc(4 * MiB)
    busy = asyncio.ensure_future(transport.submit([VhostOp.read(0, scratch.iov())] * 16))
    await asyncio.sleep(0)
    assert transport.in_flight > 0
    await transport.add_memory(m.fd, m.addr, m.nbytes)
    os.close(m.fd)  # the transport keeps its own descriptor
    assert busy.done() and busy.result() == [4 * MiB] * 16
    assert transport.stats["mem_table_updates"] == 1 and transport.contains(m.addr + 4096, 4096)
    await transport.add_memory(m.fd, m.addr, m.nbytes)  # the same span again: nothing to send
    assert transport.stats["mem_table_updates"] == 1
    assert await transport.submit([VhostOp.read(8 * MiB, [(m.addr + 2 * MiB, 4 * MiB)])]) == [4 * MiB]
    assert torch.equal(m.tensor[2 * MiB:6 * MiB], src.tensor)
    # writes from it too, checked in the image file
    m.tensor[:MiB].copy_(rand(MiB, 22))
    assert await transport.submit([VhostOp.write(30 * MiB, [(m.addr, MiB)])]) == [MiB]
    assert file_read(daemon.image, 30 * MiB, MiB) == bytes(m.tensor[:MiB].numpy())
    # a restarted target gets the memory in the first table of the new connection
    daemon.kill()
    daemon.start()
    with pytest.raises(VhostDisconnectedError):
        await transport.submit([VhostOp.read(0, [(m.addr, 4096)])])
    await transport.reconnect(timeout=5)
    m.tensor.zero_()
    assert await transport.submit([VhostOp.read(8 * MiB, [(m.addr, 4 * MiB)])]) == [4 * MiB]
    assert torch.equal(m.tensor[:4 * MiB], src.tensor)
    assert transport.stats["mem_table_updates"] == 1  # no live update needed: the connect carried it


async def test_add_memory_cancelled_while_draining_shares_nothing(transport: VhostBlkTransport,
                                                                   daemon: Daemon) -> None:
    buf = transport.alloc(MiB)
    m = _Memfd(4 * MiB)
    try:
        daemon.signal(signal.SIGSTOP)  # a request the target holds and does not finish
        busy = asyncio.ensure_future(transport.submit([VhostOp.read(0, buf.iov())]))
        await asyncio.sleep(0.05)
        adding = asyncio.ensure_future(transport.add_memory(m.fd, m.addr, m.nbytes))
        await asyncio.sleep(0.1)
        assert not adding.done()  # waiting for the target to give the request back
        later = asyncio.ensure_future(transport.submit([VhostOp.read(MiB, buf.iov())]))
        await asyncio.sleep(0.05)
        assert not later.done()  # new requests wait while the table is about to change
        adding.cancel()
        with pytest.raises(asyncio.CancelledError):
            await adding
        daemon.signal(signal.SIGCONT)
        assert await busy == [MiB] and await later == [MiB]  # staging resumed
        assert transport.shared_memory == [] and not transport.contains(m.addr, 4096)
        assert transport.stats["mem_table_updates"] == 0
        with pytest.raises(ValueError, match="outside"):
            await transport.submit([VhostOp.read(0, [(m.addr, 4096)])])
    finally:
        daemon.signal(signal.SIGCONT)
        os.close(m.fd)


async def test_add_memory_refuses_what_cannot_be_shared(transport: VhostBlkTransport) -> None:
    m = _Memfd(4 * MiB)
    try:
        with pytest.raises(ValueError, match="4 KiB"):
            await transport.add_memory(m.fd, m.addr + 512, 2 * MiB)
        with pytest.raises(ValueError, match="overlaps"):
            await transport.add_memory(m.fd, transport.region_address, 2 * MiB)
        await transport.add_memory(m.fd, m.addr, 2 * MiB)
        with pytest.raises(ValueError, match="overlaps"):
            await transport.add_memory(m.fd, m.addr + MiB, 2 * MiB)
        assert transport.shared_memory == [(m.addr, 2 * MiB)]
        # the span's end is the end: an op running past it is refused before submission
        with pytest.raises(ValueError, match="outside"):
            await transport.submit([VhostOp.read(0, [(m.addr + 2 * MiB - 4096, 8192)])])
    finally:
        os.close(m.fd)


async def test_hugetlb_region_round_trip(daemon: Daemon, hugepages: int) -> None:
    t = await VhostBlkTransport.connect(str(daemon.sock), region_bytes=8 * MiB, hugetlb=True)
    try:
        assert t.region_hugetlb and t.region_address % (2 * MiB) == 0
        buf = t.alloc(4 * MiB)
        buf.tensor.copy_(rand(4 * MiB, 9))
        assert await t.submit([VhostOp.write(2 * MiB, buf.iov())]) == [4 * MiB]
        assert file_read(daemon.image, 2 * MiB, 4 * MiB) == bytes(buf.tensor.numpy())
        out = t.alloc(4 * MiB)
        assert await t.submit([VhostOp.read(2 * MiB, out.iov())]) == [4 * MiB]
        assert torch.equal(out.tensor, buf.tensor)
    finally:
        await t.aclose()
        del t
        import gc

        gc.collect()


async def test_hugetlb_required_but_missing_is_a_clear_error(daemon: Daemon) -> None:
    if int(Path("/proc/sys/vm/nr_hugepages").read_text()) > 0:
        pytest.skip("huge pages are reserved on this machine")
    with pytest.raises(OSError, match="huge pages"):
        await VhostBlkTransport.connect(str(daemon.sock), region_bytes=4 * MiB, hugetlb=True)


# --- the C core on its own, under sanitizers ------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("tool", ["asan", "valgrind"])
def test_native_core_sanitizer_clean(tool: str, daemon: Daemon, tmp_path: Path) -> None:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    if tool == "valgrind" and shutil.which("valgrind") is None:
        pytest.skip("valgrind not installed")
    exe = tmp_path / f"selftest_{tool}"
    flags = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"] if tool == "asan" else []
    subprocess.run([cc, "-g", "-O1", "-std=gnu11", "-Wall", "-Wextra", "-Werror", *flags,
                    str(REPO / "tests/ssd/vhost_selftest.c"), str(REPO / "kvpool/native/vhost_user.c"),
                    "-o", str(exe)], check=True)
    for mode in ([], ["poll"]):
        cmd = [str(exe), str(daemon.sock), *mode]
        if tool == "valgrind":
            cmd = ["valgrind", "-q", "--error-exitcode=3", "--leak-check=full", *cmd]
        env = dict(os.environ, UBSAN_OPTIONS="halt_on_error=1", ASAN_OPTIONS="detect_leaks=1")
        r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.startswith("ok (2 queues"), r.stdout
