"""Shared harness of the SSD-family tests: loop devices (real ones, via losetup) over sparse files, and
vhost-user-blk targets (real qemu-storage-daemon processes) over image files."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

# The loop-device harness lives in tests/harness/loopdev.py (its make_loop fixture in tests/conftest.py);
# re-exported here for the SSD tests that import it from this conftest.
from harness.loopdev import attach_loop, detach_loop, loop_unavailable  # noqa: F401

from kvpool.testing.servers import QemuStorageDaemon, qemu_storage_daemon

MiB = 1 << 20
IMAGE_BYTES = 64 * MiB
QSD = qemu_storage_daemon()


#: the shared testbed's throttled loop devices (../shared beside the clone, as CI lays it out)
TESTBED = Path(__file__).resolve().parents[3] / "shared" / "testbed" / "devices"


@pytest.fixture
def slow_device(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A loop device throttled to 40 MB/s by the testbed's blkio cgroup (a 16 MiB read takes ~0.4 s), and the
    testbed directory to run the child under (``devices run DIR -- CMD``); skipped where it cannot exist."""
    why = loop_unavailable()
    if why or not TESTBED.exists() or not Path("/sys/fs/cgroup/blkio").is_dir():
        pytest.skip(why or "no testbed / blkio cgroup")
    bed = tmp_path / "bed"
    up = subprocess.run([str(TESTBED), "up", str(bed), "40", "128"], capture_output=True, text=True)
    if up.returncode != 0:
        pytest.skip(f"testbed: {up.stderr.strip()}")
    try:
        yield up.stdout.split()[0], bed
    finally:
        subprocess.run([str(TESTBED), "down", str(bed)], capture_output=True)


#: one qemu-storage-daemon exporting an image as vhost-user-blk (the starter shipped in kvpool.testing)
Daemon = QemuStorageDaemon


def make_image(path: Path, nbytes: int = IMAGE_BYTES) -> Path:
    """A sparse image file of ``nbytes`` (what the daemon exports)."""
    with open(path, "wb") as f:
        f.truncate(nbytes)
    return path


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A qemu-storage-daemon (2 queues, O_DIRECT, io_uring) on a fresh 64 MiB image; killed at the end."""
    if QSD is None:
        pytest.skip("qemu-storage-daemon not installed (apt-get install qemu-system-common)")
    d = Daemon(make_image(tmp_path / "disk.img"), tmp_path / "vhost.sock")
    d.start()
    try:
        yield d
    finally:
        d.kill()


@pytest.fixture
def hugepages() -> Iterator[int]:
    """Reserve 8 more 2 MiB pages for the test (restored afterwards); skip if that is not possible."""
    p = Path("/proc/sys/vm/nr_hugepages")
    want = 8
    try:
        old = int(p.read_text())
        p.write_text(f"{old + want}\n")
    except OSError as e:
        pytest.skip(f"cannot reserve huge pages: {e}")
    try:
        free = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                    if line.startswith("HugePages_Free:"))
        if free < want:
            pytest.skip(f"only {free} huge pages could be reserved")
        yield want
    finally:
        p.write_text(f"{old}\n")
