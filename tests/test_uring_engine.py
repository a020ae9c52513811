"""Tests for the native io_uring engine: real rings, real files, no mocks."""

from __future__ import annotations

import asyncio
import errno
import gc
import mmap
import os
import select
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from kvpool import _uring
from kvpool.errors import PoolClosedError
from kvpool.ssd.uring_engine import (
    OP_FSYNC,
    OP_READ,
    OP_WRITE,
    UringEngine,
    alloc_aligned,
    buffer_address,
    probe,
)

try:
    _PROBE = _uring.probe()
except OSError as exc:  # ENOSYS (seccomp), EPERM (kernel.io_uring_disabled), ...
    pytest.skip(f"io_uring unavailable here: {exc}", allow_module_level=True)

BS = 4096  # O_DIRECT alignment used throughout (>= any logical block size)
PAGE = mmap.PAGESIZE
T = TypeVar("T")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Callable[[], Coroutine[Any, Any, T]]], T]:
    """Run a coroutine function on a fresh loop of the requested kind; fail on
    any error the loop's exception handler saw (leaked futures, callback errors)."""
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop

    def _run(fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
        errors: list[dict[str, Any]] = []
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.get_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
            result = runner.run(fn())
            gc.collect()
        assert not errors, errors
        return result

    return _run


def _open_direct(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
    except OSError as e:
        if e.errno == errno.EINVAL:
            pytest.skip(f"O_DIRECT not supported by the filesystem holding {path.parent}")
        raise


@pytest.fixture
def direct_fd(tmp_path: Path) -> Iterator[int]:
    fd = _open_direct(tmp_path / "direct.bin")
    yield fd
    os.close(fd)


@pytest.fixture
def plain_fd(tmp_path: Path) -> Iterator[int]:
    fd = os.open(tmp_path / "plain.bin", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    yield fd
    os.close(fd)


def pattern(n: int, seed: int) -> bytes:
    block = bytes((seed * 31 + i * 7) & 0xFF for i in range(251))
    return (block * (n // len(block) + 1))[:n]


def fixed(kind: int, off: int, buf: int, boff: int, length: int, file: int = 0) -> tuple[Any, ...]:
    return (kind, 0, file, off, ("fixed", buf, boff, length))


# --------------------------------------------------------------------------- probe / helpers


def test_probe() -> None:
    info = probe()
    assert set(info) == {"kernel_features", "ops", "sqpoll"}
    assert isinstance(info["kernel_features"], int)
    assert info["kernel_features"] & _uring.IORING_FEAT_NODROP
    assert isinstance(info["sqpoll"], bool)
    ops = info["ops"]
    assert isinstance(ops, set) and all(isinstance(o, int) for o in ops)
    for op in ("READV", "WRITEV", "FSYNC", "READ_FIXED", "WRITE_FIXED"):
        assert getattr(_uring, f"IORING_OP_{op}") in ops
    assert (_uring.OP_READ, _uring.OP_WRITE, _uring.OP_FSYNC) == (0, 1, 2)


def test_alloc_aligned_and_buffer_address() -> None:
    for size, huge in ((BS, True), (3 * BS, False), (2 << 20, True), (4 << 20, False)):
        buf = alloc_aligned(size, hugepages=huge)
        assert len(buf) == size
        assert buffer_address(buf) % PAGE == 0
        buf[0:4] = b"abcd"
        buf[-1:] = b"z"
        assert buf[0:4] == b"abcd"
        buf.close()
    with pytest.raises(ValueError):
        alloc_aligned(0)
    ba = bytearray(b"xyz")
    assert buffer_address(ba) != 0
    with pytest.raises(TypeError):
        buffer_address(b"read-only")


# --------------------------------------------------------------------------- Ring (sync API)


def test_ring_attributes_and_eventfd(plain_fd: int) -> None:
    ring = _uring.Ring(6)
    assert ring.entries == 8  # kernel rounds up to a power of two
    assert ring.cq_entries >= 2 * ring.entries
    assert ring.eventfd >= 0 and ring.in_flight == 0 and not ring.closed
    ring.register_files([plain_fd])
    ring.submit([(OP_FSYNC, 42, 0, 0, None)])
    assert ring.in_flight == 1
    ring.wait()
    r, _, _ = select.select([ring.eventfd], [], [], 1.0)
    assert r, "eventfd was not signalled for a completion"
    assert ring.reap() == [(42, 0)]
    r, _, _ = select.select([ring.eventfd], [], [], 0)
    assert not r, "reap() must drain the eventfd"
    assert ring.reap() == [] and ring.in_flight == 0
    ring.wait(5)  # nothing in flight: returns at once instead of blocking forever
    ring.close()
    assert ring.closed and ring.eventfd == -1


def test_ring_fixed_roundtrip_odirect(direct_fd: int) -> None:
    ring = _uring.Ring(8)
    wbuf, rbuf = alloc_aligned(8 * BS), alloc_aligned(8 * BS)
    wbuf[:] = pattern(8 * BS, 1)
    ring.register_files([direct_fd])
    ring.register_buffers([wbuf, rbuf])
    assert ring.submit([(OP_WRITE, 1, 0, 0, ("fixed", 0, 0, 8 * BS))]) == 1
    ring.wait()
    assert ring.reap() == [(1, 8 * BS)]
    # two reads into the two halves of the read buffer, plus a datasync
    ops = [
        (OP_READ, 2, 0, 4 * BS, ("fixed", 1, 4 * BS, 4 * BS)),
        (OP_READ, 3, 0, 0, ("fixed", 1, 0, 4 * BS)),
        (OP_FSYNC, 4, 0, 0, None),
    ]
    assert ring.submit(ops) == 3
    got: dict[int, int] = {}
    while len(got) < 3:
        ring.wait()
        got.update(ring.reap())
    assert got == {2: 4 * BS, 3: 4 * BS, 4: 0}
    assert rbuf[:] == wbuf[:]
    ring.unregister_buffers()
    wbuf.close()  # views released by unregister: the mmap can be closed again
    ring.close()
    rbuf.close()


def test_ring_iov_and_user_data_roundtrip(plain_fd: int) -> None:
    ring = _uring.Ring(4)
    ring.register_files([plain_fd])
    src = [bytearray(pattern(1000 + i, i)) for i in range(3)]
    total = sum(len(b) for b in src)
    big_ud = (1 << 64) - 1
    iov = [(buffer_address(b), len(b)) for b in src]
    ring.submit([(OP_WRITE, big_ud, 0, 100, ("iov", iov))])
    ring.wait()
    assert ring.reap() == [(big_ud, total)]
    dst = bytearray(total)
    ring.submit([(OP_READ, 7, 0, 100, ("iov", [(buffer_address(dst), total)]))])
    ring.wait()
    assert ring.reap() == [(7, total)]
    assert bytes(dst) == b"".join(src)
    assert os.pread(plain_fd, total, 100) == bytes(dst)
    ring.close()


def test_ring_validation_rejects_whole_batch(plain_fd: int) -> None:
    ring = _uring.Ring(8)
    good = (OP_READ, 1, 0, 0, ("fixed", 0, 0, 16))
    with pytest.raises(ValueError, match="no files registered"):
        ring.submit([(OP_FSYNC, 1, 0, 0, None)])
    ring.register_files([plain_fd])
    with pytest.raises(ValueError, match="no buffers registered"):
        ring.submit([good])
    buf = bytearray(64)
    ring.register_buffers([buf])
    addr = buffer_address(buf)
    bad_ops: list[tuple[object, type[Exception]]] = [
        ([1, 2], TypeError),  # op is not a tuple
        (good[:4], ValueError),  # wrong arity
        ((OP_READ, 1, 0, 0, ("fixed", 0, 0, 16), 9), ValueError),
        ((7, 1, 0, 0, None), ValueError),  # unknown kind
        (("r", 1, 0, 0, None), TypeError),
        ((OP_READ, -1, 0, 0, ("fixed", 0, 0, 16)), ValueError),  # user_data < 0
        ((OP_READ, 1 << 64, 0, 0, ("fixed", 0, 0, 16)), ValueError),  # user_data > u64
        ((OP_READ, 1, 1, 0, ("fixed", 0, 0, 16)), ValueError),  # file index out of range
        ((OP_READ, 1, 0, -4096, ("fixed", 0, 0, 16)), ValueError),  # negative offset
        ((OP_READ, 1, 0, 0, ("fixed", 1, 0, 16)), ValueError),  # buf index out of range
        ((OP_READ, 1, 0, 0, ("fixed", 0, 60, 16)), ValueError),  # slice past the end
        ((OP_READ, 1, 0, 0, ("fixed", 0, 65, 0)), ValueError),  # offset past the end
        ((OP_READ, 1, 0, 0, ("fixed", 0, 0)), ValueError),
        ((OP_READ, 1, 0, 0, ("mapped", 0, 0, 16)), ValueError),
        ((OP_READ, 1, 0, 0, None), TypeError),
        ((OP_READ, 1, 0, 0, ("iov", [])), ValueError),
        ((OP_READ, 1, 0, 0, ("iov", [(addr,)])), ValueError),
        ((OP_READ, 1, 0, 0, ("iov", [addr])), TypeError),
        ((OP_READ, 1, 0, 0, ("iov", [(addr, -1)])), ValueError),
        ((OP_READ, 1, 0, 0, ("iov", "nope")), TypeError),
        ((OP_READ, 1, 0, 0, ("iov", [(addr, 1)] * 1025)), ValueError),
        ((OP_FSYNC, 1, 0, 0, ("fixed", 0, 0, 16)), ValueError),
        ((OP_FSYNC, 1, 0, 8, None), ValueError),
    ]
    for bad, exc_type in bad_ops:
        # the bad op comes last: the good ones before it must not be queued either
        with pytest.raises(exc_type):
            ring.submit([good, good, bad])
        with pytest.raises(exc_type):
            ring.check([bad])
        assert ring.in_flight == 0
    with pytest.raises(TypeError):
        ring.submit(op for op in [good])
    with pytest.raises(ValueError, match="exceeds ring entries"):
        ring.submit([good] * (ring.entries + 1))
    ring.check([good] * (ring.entries + 1))  # check() has no size limit
    assert ring.submit([]) == 0
    assert ring.in_flight == 0 and ring.reap() == []
    # nothing was queued behind our back: the next valid op is the only completion
    ring.submit([(OP_FSYNC, 99, 0, 0, None)])
    ring.wait()
    assert ring.reap() == [(99, 0)]
    ring.close()


def test_ring_registration_rules(plain_fd: int, tmp_path: Path) -> None:
    ring = _uring.Ring(4)
    with pytest.raises(ValueError):
        ring.register_files([])
    with pytest.raises(ValueError):
        ring.register_files([-2])
    with pytest.raises(TypeError):
        ring.register_files(["0"])
    ring.register_files([plain_fd])
    with pytest.raises(RuntimeError, match="already registered"):
        ring.register_files([plain_fd])
    other = os.open(tmp_path / "other.bin", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        ring.unregister_files()
        with pytest.raises(ValueError):
            ring.unregister_files()
        ring.register_files([other, plain_fd])
    finally:
        os.close(other)  # the ring holds its own reference to the file
    with pytest.raises(TypeError):
        ring.register_buffers([b"read-only bytes"])
    with pytest.raises(ValueError):
        ring.register_buffers([bytearray()])
    buf = bytearray(128)
    ring.register_buffers([buf])
    with pytest.raises(BufferError):
        buf.extend(b"x")  # the exported view pins the buffer while registered
    with pytest.raises(RuntimeError, match="already registered"):
        ring.register_buffers([bytearray(8)])
    ring.submit([(OP_FSYNC, 1, 0, 0, None)])
    with pytest.raises(RuntimeError, match="in flight"):
        ring.unregister_buffers()
    ring.wait()
    ring.reap()
    ring.unregister_buffers()
    buf.extend(b"x")
    with pytest.raises(ValueError):
        _uring.Ring(0)
    with pytest.raises(ValueError):
        _uring.Ring(1 << 20)
    ring.close()


def test_ring_close_waits_for_in_flight(direct_fd: int) -> None:
    ring = _uring.Ring(16)
    buf = alloc_aligned(1 << 20)
    buf[:] = pattern(1 << 20, 5)
    ring.register_files([direct_fd])
    ring.register_buffers([buf])
    ring.submit([fixed(OP_WRITE, i << 20, 0, 0, 1 << 20) for i in range(16)])
    ring.close()  # must wait for all 16 writes before unmapping/unpinning
    assert ring.closed and ring.in_flight == 0
    assert os.fstat(direct_fd).st_size == 16 << 20
    ring.close()  # idempotent
    for call in (ring.reap, ring.wait, lambda: ring.submit([]), ring.unregister_files):
        with pytest.raises(ValueError, match="closed"):
            call()
    buf.close()  # views were released by close()


def test_ring_dealloc_with_in_flight(direct_fd: int) -> None:
    ring = _uring.Ring(8)
    buf = alloc_aligned(1 << 20)
    ring.register_files([direct_fd])
    ring.register_buffers([buf])
    ring.submit([fixed(OP_WRITE, i << 20, 0, 0, 1 << 20) for i in range(8)])
    del ring
    gc.collect()
    assert os.fstat(direct_fd).st_size == 8 << 20
    buf.close()


def test_ring_cq_overflow_is_not_lost(plain_fd: int) -> None:
    """More completions than the CQ holds (NODROP): none may be lost."""
    ring = _uring.Ring(4)
    assert ring.cq_entries == 8
    ring.register_files([plain_fd])
    uds: set[int] = set()
    for batch in range(6):  # 24 ops in flight, 3x the CQ size, nothing reaped
        ops = [(OP_FSYNC, batch * 10 + i, 0, 0, None) for i in range(4)]
        assert ring.submit(ops) == 4
        uds.update(op[1] for op in ops)
    assert ring.in_flight == 24
    got: list[tuple[int, int]] = []
    while ring.in_flight:
        ring.wait(ring.in_flight)
        got.extend(ring.reap())
    assert sorted(ud for ud, _ in got) == sorted(uds)
    assert all(res == 0 for _, res in got)
    ring.close()


def test_ring_sqpoll(plain_fd: int) -> None:
    if not _PROBE["sqpoll"]:
        pytest.skip("SQPOLL rings are not permitted for this process (needs Linux 5.11+ or privileges)")
    ring = _uring.Ring(8, sqpoll=True, sq_thread_idle_ms=10)
    assert ring.sqpoll
    ring.register_files([plain_fd])
    buf = bytearray(pattern(3 * BS, 9))
    ring.register_buffers([buf])
    # more ops than SQ entries across several submits, with idle gaps so the
    # kernel thread goes to sleep and must be woken up again
    done: list[tuple[int, int]] = []
    for rnd in range(3):
        ring.submit([(OP_WRITE, rnd * 8 + i, 0, i * BS, ("fixed", 0, 0, BS)) for i in range(3)])
        while ring.in_flight:
            ring.wait(ring.in_flight)
            done.extend(ring.reap())
        select.select([], [], [], 0.03)
    assert sorted(ud for ud, _ in done) == [0, 1, 2, 8, 9, 10, 16, 17, 18]
    assert all(res == BS for _, res in done)
    ring.close()


# --------------------------------------------------------------------------- UringEngine


def test_engine_fixed_odirect_roundtrip(run: Any, direct_fd: int) -> None:
    size = 2 << 20

    async def main() -> None:
        engine = UringEngine(32)
        wbuf, rbuf = alloc_aligned(size), alloc_aligned(size)
        wbuf[:] = pattern(size, 3)
        engine.register_files([direct_fd])
        engine.register_buffers([wbuf, rbuf])
        assert await engine.submit([fixed(OP_WRITE, 0, 0, 0, size)]) == [size]
        res = await engine.submit(
            [fixed(OP_READ, size // 2, 1, size // 2, size // 2), fixed(OP_READ, 0, 1, 0, size // 2)]
        )
        assert res == [size // 2, size // 2]
        assert rbuf[:] == wbuf[:]
        assert engine.in_flight == 0
        await engine.aclose()

    run(main)


def test_engine_iov_odirect_and_buffered(run: Any, direct_fd: int, plain_fd: int) -> None:
    async def main() -> None:
        engine = UringEngine(16)
        engine.register_files([direct_fd, plain_fd])
        src = alloc_aligned(3 * BS, hugepages=False)
        dst = alloc_aligned(3 * BS, hugepages=False)
        src[:] = pattern(3 * BS, 11)
        s, d = buffer_address(src), buffer_address(dst)
        # O_DIRECT writev/readv with page-aligned iovecs in a different split
        w = (OP_WRITE, 0, 0, BS, ("iov", [(s, BS), (s + BS, 2 * BS)]))
        assert await engine.submit([w]) == [3 * BS]
        r = (OP_READ, 0, 0, BS, ("iov", [(d + 2 * BS, BS), (d, 2 * BS)]))
        assert await engine.submit([r]) == [3 * BS]
        assert dst[2 * BS :] == src[:BS] and dst[: 2 * BS] == src[BS:]
        # buffered file: arbitrary (unaligned) bytearrays
        a, b = bytearray(b"hello "), bytearray(b"io_uring")
        out = bytearray(14)
        wv = (OP_WRITE, 0, 1, 3, ("iov", [(buffer_address(a), 6), (buffer_address(b), 8)]))
        rv = (OP_READ, 0, 1, 3, ("iov", [(buffer_address(out), 14)]))
        assert await engine.submit([wv]) == [14]
        assert await engine.submit([rv]) == [14]
        assert out == b"hello io_uring"
        await engine.aclose()

    run(main)


def test_engine_batch_of_64_and_fsync(run: Any, direct_fd: int) -> None:
    async def main() -> None:
        engine = UringEngine(64)
        wbuf, rbuf = alloc_aligned(64 * BS), alloc_aligned(64 * BS)
        for i in range(64):
            wbuf[i * BS : (i + 1) * BS] = pattern(BS, i)
        engine.register_files([direct_fd])
        engine.register_buffers([wbuf, rbuf])
        # block i of the buffer goes to file block 63 - i
        writes = [fixed(OP_WRITE, (63 - i) * BS, 0, i * BS, BS) for i in range(64)]
        assert await engine.submit(writes) == [BS] * 64
        assert await engine.submit([(OP_FSYNC, 0, 0, 0, None)]) == [0]
        reads = [fixed(OP_READ, i * BS, 1, i * BS, BS) for i in range(64)]
        assert await engine.submit(reads) == [BS] * 64
        for i in range(64):
            assert rbuf[i * BS : (i + 1) * BS] == pattern(BS, 63 - i)
        await engine.aclose()

    run(main)


def test_engine_error_results(run: Any, direct_fd: int, plain_fd: int) -> None:
    async def main() -> None:
        engine = UringEngine(8)
        engine.register_files([direct_fd, -1, plain_fd])  # slot 1 is empty (sparse)
        buf = alloc_aligned(4 * BS)
        engine.register_buffers([buf])
        assert await engine.submit([fixed(OP_WRITE, 0, 0, 0, BS)]) == [BS]
        res = await engine.submit(
            [
                fixed(OP_READ, 0, 0, 0, BS, file=1),  # empty registered slot -> -EBADF
                fixed(OP_READ, 0, 0, 0, 4 * BS),  # file is 1 block: short read
                fixed(OP_READ, 8 * BS, 0, 0, BS),  # entirely past EOF
                fixed(OP_READ, 1, 0, 0, BS),  # misaligned O_DIRECT offset -> -EINVAL
                (OP_FSYNC, 0, 0, 0, None),
            ]
        )
        assert res == [-errno.EBADF, BS, 0, -errno.EINVAL, 0]
        with pytest.raises(ValueError, match="file_index"):
            await engine.submit([fixed(OP_READ, 0, 0, 0, BS, file=3)])
        assert engine.in_flight == 0
        await engine.aclose()

    run(main)


def test_engine_rejects_bad_batches_before_submitting(run: Any, plain_fd: int) -> None:
    async def main() -> None:
        engine = UringEngine(4)
        engine.register_files([plain_fd])
        buf = bytearray(BS)
        engine.register_buffers([buf])
        good = fixed(OP_WRITE, 0, 0, 0, 16)
        bad_batches: list[tuple[list[Any], type[Exception]]] = [
            ([good] * 9 + [fixed(OP_WRITE, 0, 0, BS - 8, 16)], ValueError),  # slice out of range
            ([good] * 9 + [(OP_WRITE, 0, 0, 0)], ValueError),  # short tuple
            ([good] * 9 + [[OP_WRITE, 0, 0, 0, None]], TypeError),  # list, not tuple
            ([good, (OP_WRITE, 0, 0, 0, ("iov", 5))], TypeError),
        ]
        for ops, exc_type in bad_batches:
            with pytest.raises(exc_type):
                await engine.submit(ops)
            assert engine.in_flight == 0
        assert os.fstat(plain_fd).st_size == 0  # not even the chunk before the bad op ran
        assert await engine.submit([]) == []
        await engine.aclose()

    run(main)


def test_engine_backpressure_many_submitters(run: Any, plain_fd: int) -> None:
    """20 concurrent submitters x 10 ops = 200 ops through an 8-entry ring."""
    nblocks = 200
    os.pwrite(plain_fd, b"".join(pattern(512, i) for i in range(nblocks)), 0)

    class Spy:
        """Records the ring's in-flight count right after every submit."""

        def __init__(self, ring: Any) -> None:
            self.ring, self.peak = ring, 0

        def __getattr__(self, name: str) -> Any:
            return getattr(self.ring, name)

        def submit(self, ops: Any) -> int:
            n: int = self.ring.submit(ops)
            self.peak = max(self.peak, self.ring.in_flight)
            return n

    async def main() -> None:
        engine = UringEngine(8)
        spy = Spy(engine._ring)
        engine._ring = spy
        engine.register_files([plain_fd])
        buf = bytearray(nblocks * 512)
        engine.register_buffers([buf])

        async def submitter(k: int) -> list[int]:
            ops = [fixed(OP_READ, b * 512, 0, b * 512, 512) for b in range(k * 10, k * 10 + 10)]
            return await engine.submit(ops)

        results = await asyncio.gather(*(submitter(k) for k in range(20)))
        assert results == [[512] * 10] * 20
        assert bytes(buf) == os.pread(plain_fd, nblocks * 512, 0)
        assert spy.peak == engine.entries  # the limit was reached and never exceeded
        assert engine.in_flight == 0
        await engine.aclose()

    run(main)


def test_engine_cancellation(run: Any, direct_fd: int) -> None:
    async def main() -> None:
        engine = UringEngine(4)
        buf = alloc_aligned(32 * BS)
        buf[:] = pattern(32 * BS, 2)
        engine.register_files([direct_fd])
        engine.register_buffers([buf])
        big = [fixed(OP_WRITE, i * BS, 0, i * BS, BS) for i in range(32)]

        # cancelled while waiting for results (ops already in the kernel)
        t1 = asyncio.create_task(engine.submit(big[:2]))
        await asyncio.sleep(0)
        assert engine.in_flight == 2
        t1.cancel()
        # cancelled while queued for room behind another submitter
        t2 = asyncio.create_task(engine.submit(big))
        t3 = asyncio.create_task(engine.submit(big[:8]))
        await asyncio.sleep(0)
        t2.cancel()
        for t in (t1, t2):
            with pytest.raises(asyncio.CancelledError):
                await t
        assert await t3 == [BS] * 8
        # the engine keeps working and reaps the orphaned completions
        assert await engine.submit(big[8:12]) == [BS] * 4
        for _ in range(200):
            if engine.in_flight == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.in_flight == 0
        assert not engine._room_waiters or all(f.done() for f in engine._room_waiters)
        await engine.aclose()

    run(main)


def test_engine_aclose_with_in_flight(run: Any, direct_fd: int) -> None:
    async def main() -> None:
        engine = UringEngine(16)
        buf = alloc_aligned(1 << 20)
        engine.register_files([direct_fd])
        engine.register_buffers([buf])
        task = asyncio.create_task(engine.submit([fixed(OP_WRITE, i << 20, 0, 0, 1 << 20) for i in range(8)]))
        await asyncio.sleep(0)
        assert engine.in_flight == 8
        await asyncio.gather(engine.aclose(), engine.aclose())
        assert engine.closed and engine.in_flight == 0
        assert task.done() and task.result() == [1 << 20] * 8
        await engine.aclose()
        with pytest.raises(PoolClosedError):  # a KVPoolError, not a plain RuntimeError
            await engine.submit([fixed(OP_READ, 0, 0, 0, BS)])
        with pytest.raises(PoolClosedError):
            engine.register_files([direct_fd])

    run(main)
    assert os.fstat(direct_fd).st_size == 8 << 20


def test_engine_loop_binding(run: Any, plain_fd: int) -> None:
    async def never_used() -> None:
        await UringEngine(4).aclose()

    run(never_used)

    engine = UringEngine(4)
    engine.register_files([plain_fd])
    fsync = [(OP_FSYNC, 0, 0, 0, None)]

    async def use() -> list[int]:
        return await engine.submit(fsync)

    first = asyncio.new_event_loop()
    try:
        assert first.run_until_complete(use()) == [0]

        async def while_first_alive() -> None:
            with pytest.raises(RuntimeError, match="different event loop"):
                await engine.submit(fsync)

        run(while_first_alive)
    finally:
        first.close()
    # the first loop is closed and idle: the engine moves to the new loop
    assert run(use) == [0]

    async def close() -> None:
        await engine.aclose()

    run(close)  # bound loop closed, nothing in flight: closing from another loop is fine
    assert engine.closed


def test_ring_concurrent_threads(plain_fd: int) -> None:
    """Several threads submitting on one ring while another waits and reaps."""
    ring = _uring.Ring(64)
    ring.register_files([plain_fd])
    nthreads, per_thread = 4, 200
    errors: list[BaseException] = []

    def submitter(t: int) -> None:
        try:
            for i in range(per_thread):
                assert ring.submit([(OP_FSYNC, t * per_thread + i, 0, 0, None)]) == 1
        except BaseException as e:  # noqa: BLE001  (re-reported by the main thread)
            errors.append(e)

    threads = [threading.Thread(target=submitter, args=(t,)) for t in range(nthreads)]
    for th in threads:
        th.start()
    got: list[tuple[int, int]] = []
    while len(got) < nthreads * per_thread:
        ring.wait(1)
        got.extend(ring.reap())
    for th in threads:
        th.join()
    assert not errors
    assert sorted(ud for ud, _ in got) == list(range(nthreads * per_thread))
    assert all(res == 0 for _, res in got) and ring.in_flight == 0
    ring.close()


@pytest.mark.skipif(not _PROBE["sqpoll"], reason="SQPOLL rings not permitted for this process")
def test_engine_sqpoll(run: Any, plain_fd: int) -> None:
    async def main() -> None:
        engine = UringEngine(8, sqpoll=True)
        engine.register_files([plain_fd])
        buf = bytearray(pattern(40 * 256, 4))
        engine.register_buffers([buf])
        res = await engine.submit([fixed(OP_WRITE, i * 256, 0, i * 256, 256) for i in range(40)])
        assert res == [256] * 40
        await engine.aclose()

    run(main)
    assert os.pread(plain_fd, 40 * 256, 0) == pattern(40 * 256, 4)


# --------------------------------------------------------------------------- ASYNC_CANCEL

_HAS_CANCEL = _uring.IORING_OP_ASYNC_CANCEL in _PROBE["ops"]


@pytest.mark.skipif(not _HAS_CANCEL, reason="kernel lacks IORING_OP_ASYNC_CANCEL")
def test_ring_async_cancel_by_user_data() -> None:
    # A read of an empty pipe blocks until data arrives: only a cancel ends it.
    r, w = os.pipe()
    ring = _uring.Ring(8)
    try:
        ring.register_files([r])
        buf = bytearray(64)
        addr = buffer_address(buf)
        assert ring.submit([(OP_READ, 41, 0, 0, ("iov", [(addr, 64)]))]) == 1
        assert ring.in_flight == 1
        # a cancel names its target by user_data; one naming nothing in flight gets -ENOENT
        assert ring.submit([(_uring.OP_CANCEL, 1, 0, 0, 41), (_uring.OP_CANCEL, 2, 0, 0, 999)]) == 2
        got: dict[int, int] = {}
        while len(got) < 3:
            ring.wait(1)
            got.update(ring.reap())
        assert got[41] in (-errno.ECANCELED, -errno.EINTR)
        assert got[1] == 0 and got[2] == -errno.ENOENT
        assert ring.in_flight == 0 and buf == bytearray(64)
        with pytest.raises(ValueError, match="cancel takes file_index 0"):
            ring.check([(_uring.OP_CANCEL, 1, 1, 0, 41)])
        with pytest.raises(TypeError, match="cancel target user_data must be an int"):
            ring.check([(_uring.OP_CANCEL, 1, 0, 0, None)])
    finally:
        ring.close()
        os.close(r)
        os.close(w)


@pytest.mark.skipif(not _HAS_CANCEL, reason="kernel lacks IORING_OP_ASYNC_CANCEL")
def test_engine_cancel_stops_blocked_reads(run: Any) -> None:
    # Without ASYNC_CANCEL these pipe reads would never complete and the cancelled submit would hang:
    # that it returns at all shows the kernel was asked to stop them, and it still waited for them.
    r, w = os.pipe()

    async def main() -> None:
        engine = UringEngine(8)
        engine.register_files([r])
        bufs = [bytearray(64) for _ in range(4)]
        ops = [(OP_READ, 0, 0, 0, ("iov", [(buffer_address(b), 64)])) for b in bufs]
        task = asyncio.ensure_future(engine.submit(ops))
        await asyncio.sleep(0.05)
        assert engine.in_flight == 4
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
        assert engine.in_flight == 0
        os.write(w, b"x" * 256)  # data arriving now must not land in the caller's buffers
        await asyncio.sleep(0.05)
        assert all(b == bytearray(64) for b in bufs)
        await engine.aclose()

    try:
        run(main)
    finally:
        os.close(r)
        os.close(w)


# --------------------------------------------------------------------------- the C core without Python

REPO = Path(__file__).resolve().parents[1]
NATIVE = REPO / "kvpool/native"


@pytest.mark.parametrize("tool", ["plain", "asan", "valgrind"])
def test_native_ring_selftest(tool: str, tmp_path: Path) -> None:
    """tests/ssd/uring_selftest.c drives uring_ring.c + uring_ops.c with no Python: O_DIRECT fixed and
    vectored I/O read back, fdatasync, a batch of 3x the ring, -EBADF/-EINVAL results, validation, cancel."""
    import shutil
    import subprocess

    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    if tool == "valgrind" and shutil.which("valgrind") is None:
        pytest.skip("valgrind not installed")
    exe = tmp_path / f"uring_selftest_{tool}"
    flags = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"] if tool == "asan" else []
    subprocess.run([cc, "-g", "-O1", "-std=gnu11", "-Wall", "-Wextra", "-Werror", *flags, f"-I{NATIVE}",
                    str(REPO / "tests/ssd/uring_selftest.c"), str(NATIVE / "uring_ring.c"),
                    str(NATIVE / "uring_ops.c"), "-o", str(exe)], check=True)
    # O_DIRECT needs a real filesystem (tmpfs refuses it); pytest's tmp_path is on one here
    cmd = [str(exe), str(tmp_path)]
    if tool == "valgrind":
        cmd = ["valgrind", "-q", "--error-exitcode=3", "--leak-check=full", *cmd]
    env = dict(os.environ, UBSAN_OPTIONS="halt_on_error=1", ASAN_OPTIONS="detect_leaks=1")
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith("ok "), res.stdout


# --------------------------------------------------------------------------- sparse buffer table


def test_sparse_table_filled_from_a_thread_while_reads_run(direct_fd: int, tmp_path: Path) -> None:
    """IORING_REGISTER_BUFFERS2 (sparse) + IORING_REGISTER_BUFFERS_UPDATE: a slot is filled from another thread
    while this one keeps submitting and reaping; an empty slot is refused by validation, a filled one cannot
    be filled twice, and fixed ops into it move the right bytes."""
    data = pattern(8 << 20, 3)
    with open(tmp_path / "direct.bin", "r+b") as f:  # the same file, through the page cache
        f.write(data)
    ring = _uring.Ring(64)
    ring.register_files([direct_fd])
    ring.register_buffers_sparse(4)
    with pytest.raises(RuntimeError):
        ring.register_buffers_sparse(4)  # one table per ring
    with pytest.raises(ValueError, match="out of range"):
        ring.check([fixed(OP_READ, 0, 1, 0, 4096)])  # slot 1 is still empty
    big = alloc_aligned(64 << 20)
    memoryview(big)[:: 4096] = b"\1" * (len(big) // 4096)  # populated, as an arena is
    small = alloc_aligned(1 << 20)
    err: list[BaseException] = []

    def fill() -> None:
        try:
            ring.update_buffers(1, big)
        except BaseException as exc:  # noqa: BLE001 - reported below
            err.append(exc)

    th = threading.Thread(target=fill)
    th.start()
    reads = 0
    while th.is_alive() or reads < 4:  # plain READV all along, each checked
        assert ring.submit([(OP_READ, 7, 0, 4096 * reads, ("iov", [(buffer_address(small), 4096)]))]) == 1
        ring.wait(1)
        assert ring.reap() == [(7, 4096)]
        assert bytes(small[:4096]) == data[4096 * reads : 4096 * (reads + 1)]
        reads += 1
    th.join()
    assert not err, err
    with pytest.raises(ValueError, match="filled"):
        ring.update_buffers(1, small)
    assert ring.submit([fixed(OP_READ, 1 << 20, 1, (32 << 20) + 512, 1 << 20)]) == 1
    ring.wait(1)
    assert ring.reap() == [(0, 1 << 20)]
    assert bytes(big[(32 << 20) + 512 : (33 << 20) + 512]) == data[1 << 20 : 2 << 20]
    with pytest.raises(BufferError):
        big.close()  # the ring holds an export of the registered memory...
    ring.close()
    big.close()  # ...until it is closed
