"""Opening never destroys what is not a kvpool pool (issue 15, items 4, 9 and 11 for the SSD tier).

Real files, real ext4 images (mkfs.ext4), real loop devices, a real SIGKILL right after a reformat.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kvpool import ConfigError, KVPoolError
from kvpool.ssd import format as fmt
from kvpool.ssd.errors import NotAPoolError, PoolDamagedError
from kvpool.ssd.store import UringBackend
from kvpool.testing.backend_tests import rand_bytes, rand_key

from conftest import MiB, loop_unavailable  # type: ignore[import-not-found]

sys.path.insert(0, str(Path(__file__).parent))
from concurrent_writer import data_of, key_of, size_of  # noqa: E402

WRITER = str(Path(__file__).parent / "concurrent_writer.py")


def digest(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


async def refused(path: Path | str, exc: type[KVPoolError], match: str, capacity: int = 16 * MiB) -> None:
    before = digest(path)
    with pytest.raises(exc, match=match) as info:
        await UringBackend(path, capacity).open()
    assert str(path) in str(info.value)
    assert digest(path) == before, "a refused open changed the bytes"


async def test_unknown_data_refused_then_formatted_on_request(tmp_path: Path) -> None:
    p = tmp_path / "data.bin"
    p.write_bytes(os.urandom(2 * MiB))
    await refused(p, NotAPoolError, "not a kvpool pool: it holds unknown data.*format=1")
    # the lock and ring of the failed open are released: the next open in this process is not "locked"
    async with UringBackend(p, 16 * MiB, format=True) as b:
        k, d = rand_key(), rand_bytes(MiB)
        await b.write(k, d)
    async with UringBackend(p, format=True) as b:  # a pool now: format=1 recovers it (restarts keep the cache)
        out = torch.empty_like(d)
        assert await b.read_into(k, out) and torch.equal(out, d)


async def test_zeros_refused(tmp_path: Path) -> None:
    p = tmp_path / "zeros.bin"
    with open(p, "wb") as f:
        f.truncate(16 * MiB)
    await refused(p, NotAPoolError, "holds zeros")


@pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="mkfs.ext4 not installed")
async def test_ext4_image_refused(tmp_path: Path) -> None:
    p = tmp_path / "fs.img"
    with open(p, "wb") as f:
        f.truncate(16 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(p)], check=True, capture_output=True)
    await refused(p, NotAPoolError, "ext2/3/4 filesystem")


@pytest.mark.blockdev
@pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="mkfs.ext4 not installed")
async def test_ext4_block_device_refused(make_loop: Callable[[int], str]) -> None:
    dev = make_loop(32 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True, capture_output=True)
    await refused(dev, NotAPoolError, "ext2/3/4 filesystem")


async def test_damaged_superblock_refused(tmp_path: Path) -> None:
    p = tmp_path / "pool.kv"
    async with UringBackend(p, 16 * MiB) as b:
        await b.write(rand_key(), rand_bytes(MiB))
    with open(p, "r+b") as f:
        f.seek(20)
        f.write(b"\xff\xff")  # magic intact, crc broken
    await refused(p, PoolDamagedError, "superblock is damaged.*fsck")


async def test_old_format_version_refused(tmp_path: Path) -> None:
    p = tmp_path / "v1.kv"
    async with UringBackend(p, 16 * MiB):
        pass
    with open(p, "r+b") as f:  # what a version-1 kvpool wrote: same magic, version 1, valid crc
        body = struct.pack("<8sIQQQQQQQQ", fmt.MAGIC_SB, 1, 16 * MiB, 4096, 4096, 4096, 4096, 4096, 4096, 4096)
        f.write((body + struct.pack("<Q", fmt.crc(body))).ljust(4096, b"\0"))
    await refused(p, NotAPoolError, "format version 1")


async def test_capacity_change_keeps_the_data_or_refuses(tmp_path: Path) -> None:
    p = tmp_path / "pool.kv"
    k, d = rand_key(), rand_bytes(MiB)
    async with UringBackend(p, 16 * MiB) as b:
        await b.write(k, d)
    await refused(p, ConfigError, "capacity=33554432 would destroy it.*capacity=16777216", capacity=32 * MiB)
    await refused(p, ConfigError, "keep its data", capacity=8 * MiB)
    for cap in (None, 16 * MiB):
        async with UringBackend(p, cap) as b:
            out = torch.empty_like(d)
            assert await b.read_into(k, out) and torch.equal(out, d)


async def test_readonly_open_of_a_pool_held_open(tmp_path: Path) -> None:
    p = tmp_path / "pool.kv"
    k, d = rand_key(), rand_bytes(MiB)
    async with UringBackend(p, 16 * MiB) as writer:
        await writer.write(k, d)
        before = digest(p)
        async with UringBackend.open_readonly(p) as ro:  # no lock taken: works while the writer holds it
            assert [x async for x in ro.keys()] == [k]
            out = torch.empty_like(d)
            assert await ro.read_into(k, out) and torch.equal(out, d)
            with pytest.raises(KVPoolError, match="read-only"):
                await ro.write(rand_key(), d)
            with pytest.raises(KVPoolError, match="read-only"):
                await ro.delete(k)
        assert digest(p) == before, "a read-only open wrote"
    q = tmp_path / "other.bin"
    q.write_bytes(os.urandom(MiB))
    with pytest.raises(NotAPoolError):
        await UringBackend.open_readonly(q).open()
    with pytest.raises(KVPoolError, match="does not exist"):
        await UringBackend.open_readonly(tmp_path / "missing").open()
    assert not (tmp_path / "missing").exists()


def test_crash_right_after_a_reformat_cannot_resurrect_the_old_pool(tmp_path: Path) -> None:
    """Reformat a pool that holds objects (a capacity change with format=1), put a few, SIGKILL with the pool
    open: after reopen the old format's objects are gone and the new puts are there, whichever checkpoint slot
    the old pool used."""
    for trial in range(4):
        p = tmp_path / f"pool{trial}.kv"

        async def old_pool() -> list[bytes]:
            keys = [rand_key() for _ in range(3)]
            async with UringBackend(p, 32 * MiB) as b:  # the child reformats it to 16 MiB (format=1)
                for j in range(trial + 1):  # a different number of checkpoints: both slots get used
                    for k in keys:
                        await b.write(k, rand_bytes(64 * 1024))
                    await b._checkpoint()
            return keys

        old = asyncio.run(old_pool())
        proc = subprocess.Popen([sys.executable, WRITER, f"uring://{p}?capacity={16 * MiB}&format=1", str(trial),
                                 "4", "20", "hold"], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        acked = set()
        for line in proc.stdout:
            if line.startswith("done"):
                break
            acked.add(int(line.split()[2]))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert len(acked) == 20

        async def check() -> None:
            async with UringBackend(p, 16 * MiB) as b:
                for k in old:
                    assert not await b.contains(k), "the previous format's object came back"
                for i in acked:
                    out = torch.empty(size_of(i), dtype=torch.uint8)
                    assert await b.read_into(key_of(trial, i), out) and torch.equal(out, data_of(trial, i))

        asyncio.run(check())


@pytest.mark.blockdev
async def test_detached_loop_device_reported() -> None:
    why = loop_unavailable()
    if why:
        pytest.skip(why)
    dev = subprocess.run(["losetup", "-f"], check=True, capture_output=True, text=True).stdout.strip()
    if not os.path.exists(dev):
        pytest.skip(f"{dev} has no device node")
    with pytest.raises(KVPoolError, match="size 0.*loop device with no backing file"):
        await UringBackend(dev, 16 * MiB).open()


@pytest.mark.blockdev
async def test_short_write_is_a_failed_write(tmp_path: Path) -> None:
    """A device shrunk under an open pool: a write straddling its new end completes short (a positive count
    below the length). That put must fail, and its object must not be visible."""
    why = loop_unavailable()
    if why:
        pytest.skip(why)
    from conftest import attach_loop, detach_loop  # type: ignore[import-not-found]

    img = tmp_path / "shrink.img"
    dev = attach_loop(img, 64 * MiB)
    try:
        async with UringBackend(dev, format=True) as b:
            geo = fmt.Geometry.for_size(64 * MiB)
            # the data region now ends 4 KiB before the end of the first extent: only the write op that
            # covers that extent's tail straddles the new end (no op starts beyond it, which would be ENOSPC)
            os.truncate(img, geo.d_off + 2 * MiB - 4096)
            subprocess.run(["losetup", "-c", dev], check=True)
            k, d = rand_key(), rand_bytes(2 * MiB)
            with pytest.raises(KVPoolError, match="short write"):
                await b.write(k, d)
            assert not await b.contains(k)
    finally:
        detach_loop(dev)


def test_hash_in_a_path_is_part_of_the_path(tmp_path: Path) -> None:
    from kvpool.config import BackendSpec

    spec = BackendSpec.parse(f"uring://{tmp_path}/kv#1.pool?capacity=16MiB")
    assert spec.location == f"{tmp_path}/kv#1.pool"
    assert spec.params == {"capacity": "16MiB"}

    async def roundtrip() -> None:
        b = UringBackend.from_spec(spec)
        async with b:
            await b.write(rand_key(), rand_bytes(4096))
        assert (tmp_path / "kv#1.pool").exists() and not (tmp_path / "kv").exists()

    asyncio.run(roundtrip())
