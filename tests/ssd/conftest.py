"""Shared harness of the SSD-family tests: loop devices (real ones, via losetup) over sparse files, and
vhost-user-blk targets (real qemu-storage-daemon processes) over image files."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# The loop-device harness lives in tests/harness/loopdev.py (its make_loop fixture in tests/conftest.py);
# re-exported here for the SSD tests that import it from this conftest.
from harness.loopdev import attach_loop, detach_loop, loop_unavailable  # noqa: F401

MiB = 1 << 20
IMAGE_BYTES = 64 * MiB
QSD = shutil.which("qemu-storage-daemon")


class Daemon:
    """One qemu-storage-daemon exporting ``image`` as vhost-user-blk on ``sock``."""

    def __init__(self, image: Path, sock: Path, queues: int = 2) -> None:
        self.image, self.sock, self.queues = image, sock, queues
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert QSD is not None
        self.sock.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [QSD,
             "--blockdev", f"driver=file,node-name=f0,filename={self.image},cache.direct=on,aio=io_uring",
             "--export", (f"type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={self.sock},"
                         f"writable=on,num-queues={self.queues}")],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not self.sock.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"qemu-storage-daemon exited: {self.proc.stderr.read()!r}")  # type: ignore[union-attr]
            if time.monotonic() > deadline:
                raise RuntimeError("qemu-storage-daemon did not create its socket")
            time.sleep(0.01)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # SIGKILL also ends a stopped process; no SIGCONT, it would run first
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


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


