"""The SSD family's errors and its one error boundary (:func:`ssd_errors`).

Everything the family does with the kernel -- opening, registering, submitting to the ring -- runs inside
:func:`ssd_errors`, which turns what the OS and the native engine raise (OSError, and RuntimeError /
ValueError / MemoryError from :mod:`kvpool._uring` and the engine) into :class:`~kvpool.errors.BackendError`.
The read path then turns a BackendError of its I/O into misses (counted as ``read_errors``); the write path
lets it propagate (the pool skips and counts the tier). Bad arguments (TypeError / ValueError raised by the
store's own checks before any I/O) are not inside the boundary and reach the caller as they are.

Both error classes are :class:`~kvpool.errors.BackendError` subclasses (so ``KVPoolError`` and ``OSError``
with ``errno`` and ``filename``): a caller that handles backend failures handles them, and one that opens
pools can tell "this is not a pool" from "this pool is damaged".
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator

from ..errors import BackendError, KVPoolError

__all__ = ["NotAPoolError", "PoolDamagedError", "ssd_errors"]


class NotAPoolError(BackendError):
    """The path holds something that is not a kvpool pool (a filesystem, zeros, unknown data); nothing was
    written. The message says what is there and how to format it anyway (``?format=1``)."""


class PoolDamagedError(BackendError):
    """The path holds a kvpool pool whose superblock or size does not check out; nothing was written."""


@contextlib.contextmanager
def ssd_errors(path: str, what: str) -> Iterator[None]:
    """Map native and OS errors raised inside the block to :class:`BackendError` (errno and path kept).
    kvpool's own errors and cancellation pass through unchanged."""
    try:
        yield
    except KVPoolError:
        raise
    except OSError as exc:
        raise BackendError(exc.errno or errno.EIO, f"{what}: {exc.strerror or exc}", path) from exc
    except (RuntimeError, ValueError, TypeError, MemoryError) as exc:
        raise BackendError(errno.EIO, f"{what}: {exc}", path) from exc
