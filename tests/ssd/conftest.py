"""Shared harness of the SSD-family tests: loop devices (real ones, via losetup) over sparse files."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

MiB = 1 << 20


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
    with open(img, "wb") as f:
        f.truncate(size)
    return subprocess.run(
        ["losetup", "--find", "--show", "--direct-io=on", str(img)], check=True, capture_output=True, text=True
    ).stdout.strip()


def detach_loop(dev: str) -> None:
    subprocess.run(["losetup", "-d", dev], check=False, capture_output=True)


@pytest.fixture
def make_loop(tmp_path: Path) -> Iterator[Callable[[int], str]]:
    """Factory of loop devices of a given size, all detached at the end of the test."""
    why = loop_unavailable()
    if why:
        pytest.skip(why)
    devs: list[str] = []

    def make(size: int = 64 * MiB) -> str:
        try:
            dev = attach_loop(tmp_path / f"loop{len(devs)}.img", size)
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"losetup failed: {exc.stderr.strip()}")
        devs.append(dev)
        return dev

    try:
        yield make
    finally:
        for d in devs:
            detach_loop(d)
