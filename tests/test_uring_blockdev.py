"""The uring:// tier on a raw block device (a loop device from the shared testbed, or our own): no filesystem
in the data path. Needs root and loop devices; skipped with the reason otherwise."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kvpool import KVLayout, KVPool, PoolLockedError
from kvpool.ssd.store import UringBackend
from kvpool.testing import BackendTests
from harness.local_raw import UringRawHooks
from kvpool.testing.backend_tests import rand_bytes, rand_key

MiB = 1 << 20
pytestmark = pytest.mark.blockdev


@pytest.fixture(scope="module")
def loopdev(module_loops: Callable[[int], str]) -> str:
    return module_loops(64 * MiB)


class TestUringBlockDeviceConformance(UringRawHooks, BackendTests):
    capacity = 8 * MiB

    @pytest.fixture(autouse=True)
    def _dev(self, loopdev: str) -> None:
        self.dev = loopdev

    async def make_backend(self, tmp_path: Path, capacity: int) -> UringBackend:
        # A new test starts from a freshly formatted device (format=True: the device holds the previous test's
        # pool, of another size); a reopen within a test recovers it.
        marker = tmp_path / ".device-formatted"
        first = not marker.exists()
        if first:
            tmp_path.mkdir(parents=True, exist_ok=True)
            marker.touch()
            wipe_superblock(self.dev)  # format=True keeps a valid pool of the same size: empty it first
        return UringBackend(self.dev, capacity + 256 * 1024, format=first)


def wipe_superblock(dev: str) -> None:
    """Overwrite a device's first 4 KiB with zeros: what is left is "not a kvpool pool" (format=True formats it)."""
    with open(dev, "r+b", buffering=0) as f:
        f.write(b"\0" * 4096)
        os.fsync(f.fileno())


async def test_blockdev_pool_roundtrip_and_reopen(loopdev: str) -> None:
    layout = KVLayout(num_layers=4, num_kv_heads=4, head_dim=64, dtype=torch.float16, chunk_tokens=64)
    tokens = list(range(256))
    kv = torch.randn(layout.kv_shape(256)).half()
    spec = f"uring://{loopdev}?capacity=32MiB"
    async with await KVPool.open(layout=layout, model_id="m", backends=[spec + "&format=1"]) as pool:
        assert pool.tiers[0].stats()["block_device"] is True
        await pool.put(tokens, kv)
        with pytest.raises(PoolLockedError):
            await UringBackend(loopdev, 32 * MiB).open()
    async with await KVPool.open(layout=layout, model_id="m", backends=[spec]) as pool:
        assert await pool.lookup(tokens) == 256
        assert torch.equal(await pool.get(tokens), kv)
        layers = [x async for _, x in pool.stream(tokens)]
        assert all(torch.equal(x, kv[i]) for i, x in enumerate(layers))


async def test_blockdev_capacity_larger_than_device(loopdev: str) -> None:
    from kvpool import ConfigError

    with pytest.raises(ConfigError, match="exceeds"):
        await UringBackend(loopdev, 1 << 40, format=True).open()


async def test_blockdev_whole_device_default_capacity(loopdev: str) -> None:
    wipe_superblock(loopdev)  # the previous test's pool would be recovered at its own size
    async with UringBackend(loopdev, format=True) as b:
        assert b.capacity is not None and 60 * MiB < b.capacity < 64 * MiB
        k, d = rand_key(), rand_bytes(3 * MiB)
        await b.write(k, d)
        out = torch.empty_like(d)
        assert await b.read_into(k, out) and torch.equal(out, d)


def _device_flushes(dev: str) -> int:
    """Flush requests the block device has completed (field 16 of /sys/block/<dev>/stat, Linux >= 5.5)."""
    fields = open(f"/sys/block/{os.path.basename(os.path.realpath(dev))}/stat").read().split()
    if len(fields) < 17:
        pytest.skip("this kernel does not count flush requests")
    return int(fields[15])


async def test_flush_reaches_the_device(loopdev: str) -> None:
    # A put is journalled but not flushed (that would cost a device flush per put); flush() is one
    # fdatasync that the device sees as a flush request (what makes its write cache durable).
    async with UringBackend(loopdev, 16 * MiB, format=True) as b:
        await b.write(rand_key(), rand_bytes(8192))
        before = _device_flushes(loopdev)
        await b.write(rand_key(), rand_bytes(8192))
        assert _device_flushes(loopdev) == before
        await b.flush()
        assert _device_flushes(loopdev) > before
