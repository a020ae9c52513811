"""Argument checks for the ``kvpool`` command: each failure is a :class:`UsageError` with a hint."""

from __future__ import annotations

import os
import stat

__all__ = ["UsageError", "default_bench_dir", "filesystem_type", "is_tmpfs", "positive", "writable_dir"]

_MEMORY_FS = ("tmpfs", "ramfs", "devtmpfs")


class UsageError(Exception):
    """A mistake in the command line: printed as one line, ``hint`` after it, exit status 2."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


def filesystem_type(path: str) -> str | None:
    """The type of the filesystem holding ``path`` (longest mount point prefix in /proc/self/mounts)."""
    try:
        real = os.path.realpath(path)
        with open("/proc/self/mounts") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return None
    best, fstype = "", None
    for m in mounts:
        if len(m) < 3:
            continue
        point = m[1].replace("\\040", " ")
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, fstype = point, m[2]
    return fstype


def is_tmpfs(path: str) -> bool:
    """True when ``path`` lives in memory (tmpfs/ramfs): a bench there measures RAM, not a disk."""
    return filesystem_type(path) in _MEMORY_FS


def default_bench_dir() -> str:
    """Where ``kvpool bench`` puts its temp pool: the first of /var/tmp, $TMPDIR or /tmp, cwd that is on a
    real disk and writable (/tmp is tmpfs on many laptops)."""
    import tempfile

    candidates = ["/var/tmp", tempfile.gettempdir(), os.getcwd()]
    for d in candidates:
        if os.path.isdir(d) and os.access(d, os.W_OK) and not is_tmpfs(d):
            return d
    return tempfile.gettempdir()


def writable_dir(path: str, flag: str = "--dir") -> str:
    if not os.path.exists(path):
        raise UsageError(f"{flag} {path}: no such directory", "create it first, or pick a directory on the SSD")
    if not os.path.isdir(path):
        kind = "a block device" if stat.S_ISBLK(os.stat(path).st_mode) else "not a directory"
        hint = f"to benchmark the device itself use --path {path}" if kind == "a block device" else (
            "give a directory")
        raise UsageError(f"{flag} {path}: {kind}", hint)
    if not os.access(path, os.W_OK):
        raise UsageError(f"{flag} {path}: not writable by you", "pick a directory you can write to, e.g. /var/tmp")
    return path


def positive(value: int, flag: str, hint: str = "") -> int:
    if value < 1:
        raise UsageError(f"{flag} must be at least 1, got {value}", hint)
    return value
