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
from pathlib import Path

import pytest

from conftest import TESTBED  # type: ignore[import-not-found]

CHILD = str(Path(__file__).parent / "cancel_child.py")



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
