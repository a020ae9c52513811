"""Real block devices for failure tests: loop devices that fill up or disappear.

Needs root and ``losetup`` (``available()`` says why not). Nothing here is simulated: a loop device over a
sparse image on a small tmpfs really returns ENOSPC once the tmpfs is full, and ``detach()`` really removes
the device under an open pool (``losetup -d``; the kernel detaches it once its last user lets go, so I/O
after that fails with EIO/ENXIO as it does when an NVMe drive drops off the bus).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

__all__ = ["LoopDevice", "SmallTmpfs", "available"]


def available() -> str | None:
    """None when loop devices can be made here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "needs root for losetup"
    if not shutil.which("losetup"):
        return "losetup is not installed"
    return None


class SmallTmpfs:
    """A tmpfs of ``size`` bytes mounted on a fresh directory (unmounted on exit)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.path = Path(tempfile.mkdtemp(prefix="kvpool-tmpfs-"))
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(self.path)],
                       check=True, capture_output=True, text=True)

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False, capture_output=True)
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> SmallTmpfs:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class LoopDevice:
    """A loop device over a sparse image of ``size`` bytes in ``directory``.

    Parameters
    ----------
    directory
        Where the image lives. On a :class:`SmallTmpfs` smaller than ``size`` the device fills up: writes
        past the tmpfs's room fail with ENOSPC.
    size
        The device's size in bytes.
    direct_io
        Ask the loop driver for direct I/O to its backing file (not possible on tmpfs: off there).
    """

    def __init__(self, directory: Path | str, size: int, *, direct_io: bool = False) -> None:
        self.image = Path(directory) / f"loop-{os.getpid()}-{id(self):x}.img"
        with open(self.image, "wb") as f:
            f.truncate(size)  # sparse: the backing store fills only as the device is written
        args = ["losetup", "--find", "--show"] + (["--direct-io=on"] if direct_io else []) + [str(self.image)]
        out = subprocess.run(args, check=True, capture_output=True, text=True)
        self.path = out.stdout.strip()
        self.attached = True

    def detach(self) -> None:
        """``losetup -d``: the device disappears (at once for new openers, for the pool at its last close)."""
        if self.attached:
            subprocess.run(["losetup", "-d", self.path], check=False, capture_output=True)
            self.attached = False

    def close(self) -> None:
        self.detach()
        try:
            self.image.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> LoopDevice:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
