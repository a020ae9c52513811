"""The SSD family's errors and its one error boundary.

Both error classes are :class:`~kvpool.errors.BackendError` subclasses (so ``KVPoolError`` and ``OSError``
with ``errno`` and ``filename``): a caller that handles backend failures handles them, and one that opens
pools can tell "this is not a pool" from "this pool is damaged".
"""

from __future__ import annotations

from ..errors import BackendError

__all__ = ["NotAPoolError", "PoolDamagedError"]


class NotAPoolError(BackendError):
    """The path holds something that is not a kvpool pool (a filesystem, zeros, unknown data); nothing was
    written. The message says what is there and how to format it anyway (``?format=1``)."""


class PoolDamagedError(BackendError):
    """The path holds a kvpool pool whose superblock or size does not check out; nothing was written."""
