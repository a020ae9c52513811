"""A cancelled read has stopped writing into the caller's memory when the cancellation returns (issue 15.2).

The device is a loop device throttled to 40 MB/s by the shared testbed's blkio cgroup, so a 16 MiB read
takes ~0.4 s and each cancellation lands while the kernel still holds reads into ``out``. After the
cancellation returns, the test fills ``out`` with a sentinel (a caller reusing its buffer) and checks that
nothing overwrites it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import loop_unavailable  # type: ignore[import-not-found]

TESTBED = Path("/work/shared/testbed/devices")
CHILD = str(Path(__file__).parent / "cancel_child.py")


@pytest.fixture
def slow_device(tmp_path: Path) -> Iterator[tuple[str, Path]]:
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


@pytest.mark.blockdev
def test_cancelled_read_into_leaves_caller_memory_alone(slow_device: tuple[str, Path]) -> None:
    dev, bed = slow_device
    res = subprocess.run([str(TESTBED), "run", str(bed), "--", sys.executable, CHILD, dev, "12"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["cancelled"] >= 6, report  # the throttle makes most reads outlast their cancellation
    assert report["direct"] and report["bounce"], report
    assert report["overwritten"] == 0, report
