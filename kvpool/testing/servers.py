"""Real server subprocesses to stop (SIGSTOP), resume, kill and restart under a pool.

- :class:`RedisServer`: one ``redis-server`` on 127.0.0.1.
- :class:`QemuStorageDaemon`: one ``qemu-storage-daemon`` exporting an image file as a vhost-user-blk device
  (the stand-in for SPDK's vhost target that the ``vhost://`` tests and benchmarks run against).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self

__all__ = ["QemuStorageDaemon", "RedisServer", "qemu_storage_daemon"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` on 127.0.0.1 (no persistence), its log in ``workdir``.

    Raises
    ------
    RuntimeError
        When redis-server is not installed or does not start.
    """

    def __init__(self, workdir: Path | str, *extra: str) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.extra = extra
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (or restart, on the same port) the server and wait until it answers."""
        for _attempt in range(5):
            log = self.workdir / f"redis-{self.port}.log"
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(self.workdir), "--logfile", str(log), *self.extra],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None:
                if _ping(self.port):
                    return
                time.sleep(0.02)
            self.kill()
            time.sleep(0.2)
        raise RuntimeError(f"redis-server did not start on port {self.port}; see {self.workdir}")

    def pause(self) -> None:
        """SIGSTOP: the server keeps its connections but answers nothing (a hung node)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: the node is gone (its data with it)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(5)
            self.kills += 1

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def qemu_storage_daemon() -> str | None:
    """Path of ``qemu-storage-daemon`` (Debian: ``qemu-system-common``), or None when it is not installed."""
    return shutil.which("qemu-storage-daemon")


class QemuStorageDaemon:
    """One ``qemu-storage-daemon`` exporting ``image`` as vhost-user-blk on the Unix socket ``sock``.

    The file is opened with ``cache.direct=on,aio=io_uring`` (O_DIRECT, as SPDK's NVMe driver bypasses the
    page cache). Not started by the constructor: :meth:`start` (again after :meth:`kill` for a restart on the
    same socket). A context manager stops it on exit.

    Parameters
    ----------
    image
        The file (or block device) to export.
    sock
        The socket path (removed and re-created by :meth:`start`).
    queues
        ``num-queues`` of the export.
    writable
        Export read-write (``False``: the device is read-only, ``VIRTIO_BLK_F_RO``).
    capture_stderr
        Keep the daemon's stderr in a pipe, quoted when it exits during :meth:`start`; ``False`` discards it
        (a long benchmark must not fill a pipe nobody reads).

    Raises
    ------
    RuntimeError
        When qemu-storage-daemon is not installed, exits at start, or creates no socket within 10 s.
    """

    def __init__(self, image: Path | str, sock: Path | str, queues: int = 2, *, writable: bool = True,
                 capture_stderr: bool = True) -> None:
        exe = qemu_storage_daemon()
        if exe is None:
            raise RuntimeError("qemu-storage-daemon is not installed (apt-get install qemu-system-common)")
        self.exe = exe
        self.image, self.sock, self.queues = Path(image), Path(sock), queues
        self.writable = writable
        self.capture_stderr = capture_stderr
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The running daemon's pid (for its CPU time in /proc/PID/stat)."""
        assert self.proc is not None, "not started"
        return self.proc.pid

    def argv(self) -> list[str]:
        """The command line :meth:`start` runs."""
        return [self.exe,
                "--blockdev", f"driver=file,node-name=f0,filename={self.image},cache.direct=on,aio=io_uring",
                "--export", (f"type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={self.sock},"
                             f"writable={'on' if self.writable else 'off'},num-queues={self.queues}")]

    def start(self) -> None:
        """Start the daemon and wait until its socket exists."""
        self.sock.unlink(missing_ok=True)
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE if self.capture_stderr else subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self.sock.exists():
            if self.proc.poll() is not None:
                err: IO[bytes] | None = self.proc.stderr
                raise RuntimeError(f"qemu-storage-daemon exited ({self.proc.returncode}): "
                                   f"{err.read() if err is not None else b''!r}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"qemu-storage-daemon did not create {self.sock} within 10 s")
            time.sleep(0.01)

    def signal(self, sig: int) -> None:
        """Send ``sig`` (SIGSTOP: a hung target that keeps its connection)."""
        assert self.proc is not None, "not started"
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL (also ends a stopped process: no SIGCONT first, it would run again before dying)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._close_pipe()
        self.proc = None

    def stop(self) -> None:
        """SIGTERM (after SIGCONT, so a stopped daemon can act on it); SIGKILL after 10 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close_pipe()
        self.proc = None

    def _close_pipe(self) -> None:
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()

    def __enter__(self) -> Self:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
