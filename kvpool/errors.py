"""The kvpool exception tree.

Every error kvpool raises on purpose derives from one root, so a server can catch ``KVPoolError`` around a
call and know that anything else is a bug. Backends translate their native errors (``OSError`` from the
io_uring engine, ``redis.exceptions.*``) into this tree at their own boundary::

    KVPoolError                      root of everything kvpool raises on purpose
    ├── LayoutError (ValueError)     a kv tensor or layout that does not match the pool's KVLayout
    ├── ConfigError (ValueError)     a bad backend spec string, option or size
    │   └── UnknownBackendError      a spec whose scheme no backend is registered for (lists the known ones)
    ├── CapacityError                an object that cannot fit in a tier even after eviction
    ├── PoolClosedError              a call on a pool or backend that is not open
    ├── RestoreError                 a layer-wise restore lost an object after its first layers were yielded
    └── BackendError (OSError)       a backend failed (I/O error, device gone, server down); carries path/errno
        └── PoolLockedError          a persistent backend's file or device is already held by another pool

Read faults (EIO, a torn or corrupt object, a server that does not answer) are *not* raised on the read path:
they are counted and reported as a miss, because a damaged cache is a smaller cache, never wrong data.
"""

from __future__ import annotations

__all__ = [
    "KVPoolError",
    "LayoutError",
    "ConfigError",
    "UnknownBackendError",
    "CapacityError",
    "PoolClosedError",
    "RestoreError",
    "BackendError",
    "PoolLockedError",
]


class KVPoolError(Exception):
    """Root of every error kvpool raises on purpose."""


class LayoutError(KVPoolError, ValueError):
    """A kv tensor (or a layout) does not match the pool's :class:`~kvpool.KVLayout`."""


class ConfigError(KVPoolError, ValueError):
    """A backend spec, option or size is malformed or out of range."""


class UnknownBackendError(ConfigError):
    """No backend is registered under a spec's scheme."""


class CapacityError(KVPoolError):
    """An object cannot fit in a tier, even after evicting everything that may be evicted."""


class PoolClosedError(KVPoolError):
    """The pool (or a backend) is not open."""


class RestoreError(KVPoolError):
    """A :meth:`KVPool.stream` could not read a later layer of a prefix whose earlier layers it already yielded.

    The layers already yielded were correct; the caller should recompute from ``layer`` on (or the whole
    prefix). ``layer`` is the layer that could not be read.
    """

    def __init__(self, message: str, layer: int) -> None:
        super().__init__(message)
        self.layer = layer


class BackendError(KVPoolError, OSError):
    """A backend failed. ``errno`` and ``filename`` are set where the failure has them."""


class PoolLockedError(BackendError):
    """A persistent backend's file or device is already held by another open pool."""
