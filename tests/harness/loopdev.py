"""Real loop block devices (losetup) over sparse image files, for the tests of the SSD tier on raw devices.

The one home of this harness: ``tests/conftest.py`` builds its ``make_loop`` and ``module_loops`` fixtures
from it; tests that need a device outside a fixture (a child process, a device detached mid-test) call
:func:`attach_loop`/:func:`detach_loop` themselves.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

__all__ = ["attach_loop", "detach_loop", "loop_factory", "loop_unavailable"]


def loop_unavailable() -> str | None:
    """Why loop devices cannot be used here, or None."""
    if os.geteuid() != 0:
        return "needs root for losetup"
    if not shutil.which("losetup"):
        return "losetup not installed"
    if not os.path.exists("/dev/loop-control"):
        return "no loop device support"
    return None


def attach_loop(img: Path, size: int) -> str:
    """A loop device (direct I/O to its backing file) over a new sparse image ``img`` of ``size`` bytes."""
    with open(img, "wb") as f:
        f.truncate(size)
    return subprocess.run(
        ["losetup", "--find", "--show", "--direct-io=on", str(img)], check=True, capture_output=True, text=True
    ).stdout.strip()


def detach_loop(dev: str) -> None:
    subprocess.run(["losetup", "-d", dev], check=False, capture_output=True)


@contextmanager
def loop_factory(directory: Path) -> Iterator[Callable[[int], str]]:
    """A factory of loop devices of a given size with images in ``directory``, all detached on exit; skips
    the test where loop devices cannot be made."""
    why = loop_unavailable()
    if why:
        pytest.skip(why)
    devs: list[str] = []

    def make(size: int) -> str:
        try:
            dev = attach_loop(directory / f"loop{len(devs)}.img", size)
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"losetup failed: {exc.stderr.strip()}")
        devs.append(dev)
        return dev

    try:
        yield make
    finally:
        for d in devs:
            detach_loop(d)
