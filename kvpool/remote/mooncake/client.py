"""The Mooncake Store client as this package uses it: its error codes, the daemon threads its blocking calls
run in, and the per-process cache of clients that backends share.

Clients. Backends of one process with the same master, metadata server, local address, segment and protocol
share one ``MooncakeDistributedStore`` (each backend with its own registered buffer). Closing a client holds
the GIL for about a second (it joins its threads), stalling every thread of the process, so a pure client
outlives its backends for reuse; one that lends a segment is closed (its segment unmounted) when its last
backend closes. :func:`close_idle_clients` closes the idle ones on purpose -- call it before the store goes
away (a test session, a serving process shutting down): a client left to the interpreter's exit is destroyed
after everything else, and logs from its destructor that it could not deregister itself from a metadata
server that is gone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

try:
    from mooncake.store import MooncakeDistributedStore as Store
    from mooncake.store import ReplicateConfig
except ImportError as _exc:  # pragma: no cover - exercised only without the client
    raise ImportError(
        "the mooncake:// backend needs the Mooncake Store client: pip install mooncake-transfer-engine-non-cuda "
        "(CPU-only hosts; the efa-non-cuda build also needs libfabric1, the CUDA build libcuda.so.1) "
        f"[{_exc}]"
    ) from _exc

__all__ = ["Store", "ReplicateConfig", "Workers", "Shared", "close_idle_clients"]

log = logging.getLogger("kvpool.mooncake")
_T = TypeVar("_T")

# Mooncake Store error codes (mooncake-store/include/types.h).
BUFFER_OVERFLOW = -10
INVALID_PARAMS = -600  # also "the buffer given is smaller than the object"
OBJECT_NOT_FOUND = -704
REPLICA_IS_NOT_READY = -703
ABSENT_CODES = frozenset({OBJECT_NOT_FOUND, -710, -712})  # OBJECT_NOT_FOUND, REPLICA_NOT_FOUND, REPLICA_IS_GONE
NOT_READY_CODES = frozenset({REPLICA_IS_NOT_READY, -714})  # not ready, or busy with an in-flight write
TOO_SMALL_CODES = frozenset({INVALID_PARAMS, BUFFER_OVERFLOW})
# The master (or the client's link to it) is down: RPC_FAIL, RPC timeout / heartbeat, ILLEGAL_CLIENT (the
# master restarted and forgot us), UNAVAILABLE_IN_CURRENT_STATUS / _MODE.
TIER_DOWN_CODES = frozenset({-900, -901, -902, -601, -1010, -1011})


class TierDown(Exception):
    """The master did not answer (an RPC failure code): the tier is skipped for a while."""

    def __init__(self, code: int, what: str) -> None:
        super().__init__(f"{what}: Mooncake error {code}")
        self.code = code


class ClientError(Exception):
    """The client raised, or refused a call with an error code."""


def check_code(code: int, what: str) -> None:
    """Raise :class:`TierDown` for a code that says the master is unreachable."""
    if code in TIER_DOWN_CODES:
        raise TierDown(code, what)


def code_status(code: int, absent: str) -> str:
    """The read counter a failed fetch's code goes to (``absent``: the name of "not there")."""
    if code in ABSENT_CODES:
        return absent
    if code in NOT_READY_CODES:
        return "not_ready"
    if code in TOO_SMALL_CODES:
        return "corrupt"  # a value of another size than its header says
    return "errors"


def consume(f: asyncio.Future[Any]) -> None:
    if not f.cancelled():
        f.exception()  # an abandoned call's error is not "never retrieved"


class Workers:
    """Daemon threads that run the client's blocking calls. A call stuck on a dead master (the client retries
    for seconds, ``setup`` for a minute and more) is abandoned by its caller; daemon threads also never hold up
    the interpreter's exit, where a ThreadPoolExecutor's are joined."""

    def __init__(self, n: int, name: str) -> None:
        self._q: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], concurrent.futures.Future[Any]] | None]
        self._q = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(n)]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[..., _T], *args: Any) -> concurrent.futures.Future[_T]:
        fut: concurrent.futures.Future[_T] = concurrent.futures.Future()
        self._q.put((fn, args, fut))
        return fut

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            fn, args, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:  # delivered to the awaiting coroutine
                fut.set_exception(exc)

    def shutdown(self) -> None:
        for _ in self._threads:
            self._q.put(None)


class Shared:
    """One client, shared by every backend of this process with the same set-up (``key``)."""

    __slots__ = ("key", "ready", "refs", "suspect", "calls", "closed")

    def __init__(self, key: tuple[Any, ...]) -> None:
        self.key = key  # (master address, metadata, local, segment, client buffer, protocol, device)
        self.ready: concurrent.futures.Future[Any] = concurrent.futures.Future()  # the set-up client
        self.refs = 0  # open backends using it
        self.suspect = False  # it met a dead or stalled master: not reused once idle
        self.calls = 0  # client calls running (or queued) on it, abandoned ones included
        self.closed = False

    def tracked(self, fn: Callable[..., _T]) -> Callable[..., _T]:
        """``fn``, counted in :attr:`calls` while it runs (a client is never closed under a running call)."""
        with LOCK:
            self.calls += 1

        def run(*args: Any) -> _T:
            try:
                return fn(*args)
            finally:
                with LOCK:
                    self.calls -= 1

        return run

    def store(self) -> Any:
        """The client, if its set-up succeeded, else None."""
        if not self.ready.done() or self.ready.cancelled() or self.ready.exception() is not None:
            return None
        return self.ready.result()


CLIENTS: dict[tuple[Any, ...], Shared] = {}
LOCK = threading.Lock()
# What must outlive its owner: buffers a client call abandoned at its deadline may still write into, clients
# whose set-up is still running or that met a dead master (closed by close_idle_clients once no call runs).
GRAVEYARD: list[Any] = []


def close_idle_clients(master: str | None = None, *, wait: float = 0.0) -> int:
    """Close every shared client no open backend uses and no call runs on (only those of the master at
    ``host:port`` ``master``, if given); return how many were closed.

    A call abandoned at its deadline (a dead master) may still be running in a worker thread: ``wait`` gives
    such calls that many seconds to return before their client is left alone. Blocks (and about a second per
    client: the client joins its threads holding the GIL), so call it from a thread that may block, while the
    master and its metadata server are still up.
    """
    deadline = time.monotonic() + wait
    while True:
        with LOCK:
            busy = [
                ent for ent in [*CLIENTS.values(), *(g for g in GRAVEYARD if isinstance(g, Shared))]
                if ent.refs == 0 and ent.calls > 0 and not ent.closed and (master is None or ent.key[0] == master)
            ]
        if not busy or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    with LOCK:
        cands = list(CLIENTS.values()) + [g for g in GRAVEYARD if isinstance(g, Shared)]
        victims = [
            ent for ent in cands
            if ent.refs == 0 and ent.calls == 0 and not ent.closed and ent.store() is not None
            and (master is None or ent.key[0] == master)
        ]
        for ent in victims:
            ent.closed = True
            if CLIENTS.get(ent.key) is ent:
                del CLIENTS[ent.key]
            if ent in GRAVEYARD:
                GRAVEYARD.remove(ent)
    for ent in victims:
        try:
            ent.store().close()
        except Exception as exc:  # a client that cannot close cleanly is dropped all the same
            log.warning("closing an idle Mooncake client of %s failed: %s", ent.key[0], exc)
    return len(victims)
