"""Shared harness of the SSD-family tests: loop devices (real ones, via losetup) over sparse files."""

from __future__ import annotations

# The loop-device harness lives in tests/harness/loopdev.py (its make_loop fixture in tests/conftest.py);
# re-exported here for the SSD tests that import it from this conftest.
from harness.loopdev import attach_loop, detach_loop, loop_unavailable  # noqa: F401

MiB = 1 << 20
