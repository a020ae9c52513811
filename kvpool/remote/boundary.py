"""The error boundary of the remote tiers: native errors in, kvpool's tree out (httpcore's ``map_exceptions``).

Each transport names, once, which of its library's exceptions mean what (:data:`ExceptionMap`): redis-py's
``ConnectionError`` is an outage, its ``ResponseError`` a refusal, an ``OSError`` from a socket an outage, a
Mooncake RPC failure code an outage... :func:`map_exceptions` turns any of them raised inside its block into
one :class:`Fault` that carries that classification; :class:`~kvpool.remote.base.RemoteBackend` then decides,
in one place, what a fault becomes: a miss and a counter on the read side, ``False`` and a counter for a
delete, a :class:`~kvpool.BackendError` for a write. So no redis-py, Mooncake or socket exception escapes a
remote tier, and the policy is not repeated per call.

What is never mapped: :class:`~kvpool.KVPoolError` (already ours), ``ValueError``/``TypeError`` (bad
arguments, the documented exception), and ``BaseException`` that is not an ``Exception`` (cancellation,
``KeyboardInterrupt``).
"""

from __future__ import annotations

import contextlib
import enum
import errno as errno_mod
from collections.abc import Iterator, Sequence

from ..errors import BackendError, KVPoolError

__all__ = ["FaultKind", "Fault", "ExceptionMap", "map_exceptions", "backend_error"]


class FaultKind(enum.Enum):
    """What a failed remote call means for the tier."""

    TIMEOUT = "timeout"  # no answer in time: the server is stalled or gone (trips the breaker)
    DOWN = "down"  # refused/reset connection, RPC failure: the server is gone (trips the breaker)
    REFUSED = "refused"  # the server answered and refused this call (the tier itself works)
    BUSY = "busy"  # a local resource (the transfer buffer) had no room in time

    @property
    def outage(self) -> bool:
        """Whether this fault says the server is unreachable (the tier is then skipped for a while)."""
        return self in (FaultKind.TIMEOUT, FaultKind.DOWN)


class Fault(Exception):
    """A remote call failed; ``kind`` says how, ``__cause__`` holds the native exception."""

    def __init__(self, kind: FaultKind, cause: BaseException | str) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}" if isinstance(cause, BaseException) else cause)
        self.kind = kind
        self.errno: int | None = getattr(cause, "errno", None) if isinstance(cause, BaseException) else None


# Ordered: the first class an exception is an instance of decides (list subclasses before their bases, e.g.
# TimeoutError before OSError).
ExceptionMap = Sequence[tuple[type[BaseException], FaultKind]]


@contextlib.contextmanager
def map_exceptions(mapping: ExceptionMap) -> Iterator[None]:
    """Re-raise any exception of ``mapping`` raised in the block as a :class:`Fault` of its kind."""
    try:
        yield
    except (Fault, KVPoolError, ValueError, TypeError):
        raise
    except Exception as exc:
        for cls, kind in mapping:
            if isinstance(exc, cls):
                raise Fault(kind, exc) from exc
        raise


def backend_error(fault: Fault, what: str, address: str) -> BackendError:
    """The :class:`~kvpool.BackendError` a failed write (``what``) raises, with an errno that says why."""
    if fault.kind is FaultKind.TIMEOUT:
        return BackendError(errno_mod.ETIMEDOUT, f"{what}: no answer from {address} in time")
    if fault.kind is FaultKind.BUSY:
        return BackendError(errno_mod.EBUSY, f"{what}: {fault}")
    code = fault.errno or (errno_mod.ECONNREFUSED if fault.kind is FaultKind.DOWN else errno_mod.EIO)
    return BackendError(code, f"{what} on {address}: {fault}")
