from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import torch

from harness.local_raw import UringRawHooks
from kvpool import BackendError, ConfigError, PoolLockedError
from kvpool.ssd import format as fmt
from kvpool.ssd.errors import NotAPoolError
from kvpool.ssd.store import UringBackend
from kvpool.config import BackendSpec
from kvpool.testing import BackendTests
from kvpool.testing.backend_tests import rand_bytes, rand_key

MiB = 1 << 20


class TestUringFileConformance(UringRawHooks, BackendTests):
    async def make_backend(self, tmp_path: Path, capacity: int) -> UringBackend:
        tmp_path.mkdir(parents=True, exist_ok=True)
        return UringBackend(tmp_path / "pool.kv", capacity + 256 * 1024, bounce=8 * MiB)


class TestUringBounceOnlyConformance(UringRawHooks, BackendTests):
    """Same contract when nothing is read straight into caller memory."""

    async def make_backend(self, tmp_path: Path, capacity: int) -> UringBackend:
        tmp_path.mkdir(parents=True, exist_ok=True)
        return UringBackend(tmp_path / "pool.kv", capacity + 256 * 1024, bounce=4 * MiB, direct=False)


def aligned_empty(n: int) -> torch.Tensor:
    t = torch.empty(n + 4096, dtype=torch.uint8)
    s = (-t.data_ptr()) % 4096
    return t[s : s + n]


async def test_direct_and_bounce_paths(tmp_path: Path) -> None:
    async with UringBackend(tmp_path / "p", 32 * MiB) as b:
        k, d = rand_key(), rand_bytes(2 * MiB)
        await b.write(k, d)
        out = aligned_empty(2 * MiB)
        assert await b.read_into(k, out)
        assert torch.equal(out, d)
        assert b.stats()["direct_reads"] == 1
        raw = torch.empty(2 * MiB + 1024, dtype=torch.uint8)
        shift = (-raw.data_ptr()) % 512 + 64  # 64 bytes past a 512-byte boundary: never O_DIRECT-aligned
        odd = raw[shift : shift + 2 * MiB]
        assert await b.read_into(k, odd)
        assert torch.equal(odd, d)
        assert b.stats()["bounce_reads"] >= 1
        # an unaligned range inside a part: read the covering parts, verify, copy the slice
        sub = torch.empty(1000, dtype=torch.uint8)
        assert await b.read_into(k, sub, 12345)
        assert torch.equal(sub, d[12345:13345])


async def test_odd_sizes_roundtrip(tmp_path: Path) -> None:
    async with UringBackend(tmp_path / "p", 32 * MiB) as b:
        for n in (1, 511, 4097, 65536 + 3, 3 * MiB + 17):
            k, d = rand_key(), rand_bytes(n)
            await b.write(k, d)
            out = torch.empty(n, dtype=torch.uint8)
            assert await b.read_into(k, out)
            assert torch.equal(out, d)


async def test_object_larger_than_bounce(tmp_path: Path) -> None:
    async with UringBackend(tmp_path / "p", 64 * MiB, bounce=4 * MiB) as b:
        k, d = rand_key(), rand_bytes(9 * MiB + 100)
        await b.write(k, d)
        out = torch.empty_like(d)
        assert await b.read_into(k, out)
        assert torch.equal(out, d)


async def test_verify_off_trusts_the_device_and_on_again_catches_it(tmp_path: Path) -> None:
    """``verify=0`` is what it says: the same flipped bytes are returned as data, and a pool reopened with
    verification (the checksums were written all along) catches them again."""
    path = tmp_path / "p"
    spec = BackendSpec.parse(f"uring://{path}?capacity=16MiB&verify=0")
    async with UringBackend(path, 16 * MiB) as b:
        k = rand_key()
        d = rand_bytes(MiB, 3)
        await b.write(k, d)
        e = b._index[k]
        data_off = b._geo.d_off  # type: ignore[union-attr]
    with open(path, "r+b") as f:
        f.seek(data_off + e.offset + 4096)
        f.write(b"\x01\x02\x03")
    async with UringBackend.from_spec(spec) as b:
        out = torch.empty(MiB, dtype=torch.uint8)
        assert await b.read_into(k, out)
        assert b.stats()["corrupt"] == 0 and not torch.equal(out, d)
        assert bytes(out[4096:4099].tolist()) == b"\x01\x02\x03"
    async with UringBackend(path, 16 * MiB) as b:
        assert await b.read_into(k, out) is False and b.stats()["corrupt"] == 1


async def test_corruption_is_a_miss_never_data(tmp_path: Path) -> None:
    path = tmp_path / "p"
    async with UringBackend(path, 16 * MiB) as b:
        k1, k2 = rand_key(), rand_key()
        d1, d2 = rand_bytes(MiB, 1), rand_bytes(MiB, 2)
        await b.write(k1, d1)
        await b.write(k2, d2)
        e1 = b._index[k1]
        data_off = b._geo.d_off  # type: ignore[union-attr]
    with open(path, "r+b") as f:  # flip bytes in the middle of object 1
        f.seek(data_off + e1.offset + 300_000)
        f.write(b"\xff\x00\xee")
    async with UringBackend(path, 16 * MiB) as b:
        out = torch.empty(MiB, dtype=torch.uint8)
        assert await b.read_into(k1, out) is False
        assert b.stats()["corrupt"] == 1
        # a layer-sized range that does not touch the damaged part still reads
        part = b._index[k1].part_size
        assert await b.read_into(k1, out[:part], 0)
        assert torch.equal(out[:part], d1[:part])
        assert await b.read_into(k2, out)
        assert torch.equal(out, d2)


async def test_damaged_metadata_still_opens(tmp_path: Path) -> None:
    path = tmp_path / "p"
    async with UringBackend(path, 16 * MiB) as b:
        k = rand_key()
        await b.write(k, rand_bytes(MiB))
        geo = b._geo
    assert geo is not None
    with open(path, "r+b") as f:  # both checkpoints and the journal trashed
        for off in (geo.ckpt_a, geo.ckpt_b, geo.j_off):
            f.seek(off + 10)
            f.write(os.urandom(100))
    async with UringBackend(path, 16 * MiB) as b:
        assert not await b.contains(k)  # a damaged cache is a smaller cache
        k2, d2 = rand_key(), rand_bytes(MiB)
        await b.write(k2, d2)
        out = torch.empty_like(d2)
        assert await b.read_into(k2, out) and torch.equal(out, d2)
    with open(path, "r+b") as f:  # superblock trashed: no longer recognisable as ours, so refused ...
        f.write(os.urandom(4096))
    with pytest.raises(NotAPoolError, match="unknown data"):
        await UringBackend(path, 16 * MiB).open()
    async with UringBackend(path, 16 * MiB, format=True) as b:  # ... unless the user asks to format it
        assert len(b) == 0


async def test_journal_wrap_and_recovery(tmp_path: Path) -> None:
    # many small puts and deletes: the journal fills, checkpoints fold it, reopen finds exactly the live set
    path = tmp_path / "p"
    live: dict[bytes, torch.Tensor] = {}
    async with UringBackend(path, 16 * MiB) as b:
        for i in range(300):
            k, d = rand_key(), rand_bytes(4096, i)
            await b.write(k, d)
            live[k] = d
            if i % 3 == 0:
                victim = next(iter(live))
                await b.delete(victim)
                del live[victim]
        assert b.stats()["checkpoints"] >= 2
        live = {k: v for k, v in live.items() if await b.contains(k)}
    async with UringBackend(path, 16 * MiB) as b:
        assert set([k async for k in b.keys()]) == set(live)
        for k, d in live.items():
            out = torch.empty(4096, dtype=torch.uint8)
            assert await b.read_into(k, out) and torch.equal(out, d)


async def test_recovery_without_clean_close(tmp_path: Path) -> None:
    # no close(): the journal alone must bring the objects back
    path = tmp_path / "p"
    b = UringBackend(path, 16 * MiB)
    await b.open()
    k, d = rand_key(), rand_bytes(MiB)
    await b.write(k, d)
    gone = rand_key()
    await b.write(gone, rand_bytes(8192))
    await b.delete(gone)
    await b._teardown()  # drop everything without a checkpoint, like a crash after the put returned
    async with UringBackend(path, 16 * MiB) as b2:
        out = torch.empty_like(d)
        assert await b2.read_into(k, out) and torch.equal(out, d)
        assert not await b2.contains(gone)


async def test_lock_excludes_second_pool(tmp_path: Path) -> None:
    path = tmp_path / "p"
    async with UringBackend(path, 16 * MiB):
        with pytest.raises(PoolLockedError, match=str(path)):
            await UringBackend(path, 16 * MiB).open()
    async with UringBackend(path, 16 * MiB):
        pass  # released on close


async def test_bad_paths_and_options(tmp_path: Path) -> None:
    with pytest.raises(BackendError) as ei:
        await UringBackend(tmp_path / "missing" / "p", 16 * MiB).open()
    assert ei.value.errno == 2 and "missing" in str(ei.value)
    with pytest.raises(ConfigError, match="capacity"):
        await UringBackend(tmp_path / "new", None).open()
    with pytest.raises(ConfigError, match="too small"):
        await UringBackend(tmp_path / "tiny", 64 * 1024).open()
    with pytest.raises(ConfigError):
        UringBackend.from_spec(BackendSpec.parse(f"uring://{tmp_path}/x?capacity=1GiB&color=red"))
    d = tmp_path / "ro"
    d.mkdir()
    os.chmod(d, 0o500)
    try:
        if os.geteuid() != 0:
            with pytest.raises(BackendError) as ei:
                await UringBackend(d / "p", 16 * MiB).open()
            assert ei.value.errno == 13
    finally:
        os.chmod(d, 0o700)
    b = UringBackend.from_spec(BackendSpec.parse(f"uring://{tmp_path}/spec.kv?capacity=16MiB&entries=64"))
    async with b:
        assert b.capacity is not None and b.capacity < 16 * MiB


async def test_enospc_is_a_clear_error(tmp_path: Path) -> None:
    # a tmpfs-free check: ask for more than the filesystem has
    st = os.statvfs(tmp_path)
    free = st.f_bavail * st.f_frsize
    with pytest.raises(BackendError) as ei:
        await UringBackend(tmp_path / "huge", free + (1 << 40)).open()
    assert ei.value.errno == 28 and "huge" in str(ei.value)
    assert not (tmp_path / "huge").exists()  # nothing left behind


async def test_concurrent_batches_many_objects(tmp_path: Path) -> None:
    async with UringBackend(tmp_path / "p", 64 * MiB, entries=32) as b:
        data = {rand_key(): rand_bytes(256 * 1024, i) for i in range(64)}
        await asyncio.gather(*(b.write(k, d) for k, d in data.items()))
        outs = {k: aligned_empty(256 * 1024) for k in data}
        from kvpool import ReadRequest

        res = await b.read_many([ReadRequest(k, outs[k]) for k in data])
        assert all(res)
        for k, d in data.items():
            assert torch.equal(outs[k], d)


async def test_flush(tmp_path: Path) -> None:
    # What flush promises: once it returns, the file alone (no close, no checkpoint) holds every put. A copy
    # of the file taken right then, as a power cut would leave it, opens with the objects intact.
    import shutil

    k1, k2, d1, d2 = rand_key(), rand_key(), rand_bytes(8192, 1), rand_bytes(3 * 4096 + 5, 2)
    async with UringBackend(tmp_path / "p", 16 * MiB) as b:
        await b.write(k1, d1)
        await b.write(k2, d2)
        await b.delete(k1)
        await b.flush()
        shutil.copyfile(tmp_path / "p", tmp_path / "snapshot")
        await b.write(rand_key(), rand_bytes(4096))  # after the snapshot: irrelevant to it
    async with UringBackend(tmp_path / "snapshot", 16 * MiB) as c:
        out = torch.empty_like(d2)
        assert await c.read_into(k2, out) and torch.equal(out, d2)
        assert not await c.contains(k1)  # the delete is durable too


def test_part_sizes() -> None:
    assert fmt.part_size_for(32 * MiB) == 256 * 1024
    assert fmt.part_size_for(256 * 1024) == 64 * 1024
    assert fmt.part_size_for(100) == 4096
    for n in (1, 4096, 10**6, 32 * MiB, 100 * MiB):
        assert -(-n // fmt.part_size_for(n)) <= fmt.MAX_PARTS
