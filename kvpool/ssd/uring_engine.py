"""asyncio front-end for the native io_uring binding (:mod:`kvpool._uring`).

One ring per :class:`UringEngine`.  Completions reach asyncio through the
ring's eventfd (``loop.add_reader``): no thread per I/O and no busy polling.

Operations are :class:`kvpool.ssd.ops.Op` values (``Op.read_iov(...)``, ``Op.write_fixed(...)``,
``Op.fsync()``); the raw tuples the native ring parses are accepted too::

    (OP_READ | OP_WRITE, 0, file_index, file_offset, ("fixed", buf_index, buf_offset, length))
    (OP_READ | OP_WRITE, 0, file_index, file_offset, ("iov", [(address, length), ...]))
    (OP_FSYNC, 0, file_index, 0, None)

The second field (user_data) is assigned by the engine; callers pass 0.
"""

from __future__ import annotations

import asyncio
import collections
import errno
from collections.abc import Sequence
from typing import Any, Final, Protocol, cast

from ..storage.buffers import alloc_aligned, buffer_address
from ..errors import BackendError, PoolClosedError
from .ops import Op, RawOp
from ..storage.settle import wait_uncancellable
import kvpool._uring as _uring  # noqa: PLR0402  (mypy cannot see the compiled submodule otherwise)

__all__ = [
    "OP_FSYNC",
    "OP_READ",
    "OP_WRITE",
    "Op",
    "UringEngine",
    "alloc_aligned",
    "buffer_address",
    "probe",
]

OP_READ: Final[int] = int(_uring.OP_READ)
OP_WRITE: Final[int] = int(_uring.OP_WRITE)
OP_FSYNC: Final[int] = int(_uring.OP_FSYNC)
#: (OP_CANCEL, user_data, 0, 0, target_user_data): IORING_OP_ASYNC_CANCEL of an op in flight
OP_CANCEL: Final[int] = int(_uring.OP_CANCEL)

#: what submit() takes: a typed op, or the raw tuple the ring parses
AnyOp = Op | RawOp

_U64_MASK: Final = (1 << 64) - 1
_HUGE_2M: Final = 2 * 1024 * 1024
_MAP_HUGETLB: Final = 0x40000


_CANCEL_SUPPORTED: list[bool] = []


def _async_cancel_supported() -> bool:
    """Whether this kernel has IORING_OP_ASYNC_CANCEL (5.5+), probed once."""
    if not _CANCEL_SUPPORTED:
        try:
            ops = cast(set[int], _uring.probe()["ops"])
        except OSError:
            ops = set()
        _CANCEL_SUPPORTED.append(int(_uring.IORING_OP_ASYNC_CANCEL) in ops)
    return _CANCEL_SUPPORTED[0]


class _Ring(Protocol):
    """Typed view of :class:`kvpool._uring.Ring`."""

    @property
    def eventfd(self) -> int: ...
    @property
    def entries(self) -> int: ...
    @property
    def in_flight(self) -> int: ...
    def register_files(self, fds: list[int]) -> None: ...
    def unregister_files(self) -> None: ...
    def register_buffers(self, bufs: list[object]) -> None: ...
    def unregister_buffers(self) -> None: ...
    def register_buffers_sparse(self, n: int) -> None: ...
    def update_buffers(self, slot: int, buf: object) -> None: ...
    def check(self, ops: list[RawOp]) -> None: ...
    def submit(self, ops: list[RawOp]) -> int: ...
    def reap(self) -> list[tuple[int, int]]: ...
    def wait(self, min_complete: int = 1) -> None: ...
    def close(self) -> None: ...


def probe() -> dict[str, Any]:
    """``{'kernel_features': int, 'ops': set[int], 'sqpoll': bool}`` for this kernel."""
    return cast(dict[str, Any], _uring.probe())


class _Batch:
    """Results of one ``submit()`` call, filled in completion order."""

    __slots__ = ("drained", "future", "outstanding", "remaining", "results")

    def __init__(self, n: int, future: asyncio.Future[list[int]]) -> None:
        self.results: list[int] = [0] * n
        self.remaining = n
        self.future = future
        self.outstanding = 0  # handed to the kernel, completion not yet reaped
        self.drained: asyncio.Future[None] | None = None  # set once outstanding reaches 0 after abandonment


class UringEngine:
    """One io_uring per engine, completions delivered to asyncio through the
    ring's eventfd (``loop.add_reader``); no thread per I/O, no busy polling.

    The number of ops in flight never exceeds :attr:`entries` (the CQ holds
    twice that, so it cannot overflow); ``submit()`` waits for room (FIFO
    across concurrent submitters) when the ring is full.
    """

    def __init__(self, entries: int = 256, sqpoll: bool = False) -> None:
        self._ring: _Ring = cast(_Ring, _uring.Ring(entries, sqpoll))
        self._entries: int = self._ring.entries
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inflight: dict[int, tuple[_Batch, int]] = {}
        self._next_ud = 1
        self._room_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._closing = False
        self._closed = False

    # -- properties ----------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Ops submitted to the kernel whose completion has not been processed yet."""
        return len(self._inflight)

    @property
    def entries(self) -> int:
        """Ring size (the kernel rounds ``entries`` up to a power of two)."""
        return self._entries

    @property
    def closed(self) -> bool:
        return self._closed

    # -- registration --------------------------------------------------------

    def register_files(self, fds: list[int]) -> None:
        self._check_open()
        self._ring.register_files(list(fds))

    def register_buffers(self, bufs: list[object]) -> None:
        self._check_open()
        self._ring.register_buffers(list(bufs))

    def register_buffers_sparse(self, n: int) -> None:
        """A table of ``n`` empty buffer slots (IORING_REGISTER_BUFFERS2, IORING_RSRC_REGISTER_SPARSE; Linux
        5.19+), filled one at a time by :meth:`update_buffers`; ``OSError`` where the kernel refuses it."""
        self._check_open()
        self._ring.register_buffers_sparse(n)

    def update_buffers(self, slot: int, buf: object) -> None:
        """Fill the empty ``slot`` with ``buf`` (at most 1 GiB) while ops keep running.

        Blocking (the kernel pins the pages), with the GIL released: call it from a worker thread
        (``asyncio.to_thread``). ``buf`` stays exported until the ring is closed or unregistered. ``OSError``
        when the kernel refuses (ENOMEM past RLIMIT_MEMLOCK, EFAULT, ...): the slot stays empty.
        """
        self._check_open()
        self._ring.update_buffers(slot, buf)

    def unregister_files(self) -> None:
        self._check_open()
        self._ring.unregister_files()

    def unregister_buffers(self) -> None:
        self._check_open()
        self._ring.unregister_buffers()

    # -- I/O -----------------------------------------------------------------

    async def submit(self, ops: Sequence[AnyOp]) -> list[int]:
        """Submit ``ops`` and return per-op results (bytes or ``-errno``) in op order.

        The whole batch is validated before anything is queued (``TypeError`` /
        ``ValueError``).  If the awaiting task is cancelled, the ops not yet
        handed to the kernel are dropped, those in the kernel are asked to stop
        (IORING_OP_ASYNC_CANCEL, where the kernel has it), and the call waits, before it raises
        ``CancelledError``, until every op already in the kernel has completed:
        their buffers (often the caller's tensor) are no longer written to once
        the call has returned.
        """
        self._check_open()
        loop = self._bind()
        batch_ops = [op.encode() if isinstance(op, Op) else op for op in ops]
        n = len(batch_ops)
        if n == 0:
            return []
        self._ring.check(batch_ops)
        batch = _Batch(n, loop.create_future())
        i = 0
        woken = False
        try:
            while i < n:
                room = self._entries - len(self._inflight)
                if room <= 0 or (self._room_waiters and not woken):
                    await self._wait_room(kick=room > 0)
                    woken = True
                    if self._closing:
                        raise PoolClosedError("UringEngine closed while submitting")
                    continue
                woken = False
                chunk: list[RawOp] = []
                for j in range(i, min(n, i + room)):
                    op = batch_ops[j]
                    ud = self._alloc_user_data()
                    chunk.append((op[0], ud, op[2], op[3], op[4]))
                    self._inflight[ud] = (batch, j)
                try:
                    done = self._ring.submit(chunk)
                except BaseException:
                    for op in chunk:
                        del self._inflight[op[1]]
                    raise
                # The kernel may refuse a tail of the chunk; those ops were not
                # queued and are retried on the next round.
                for op in chunk[done:]:
                    del self._inflight[op[1]]
                batch.outstanding += max(done, 0)
                if done <= 0:  # the ring raises rather than accept nothing
                    raise BackendError(errno.EIO, "io_uring accepted no operations")
                i += done
                if len(self._inflight) < self._entries:
                    self._wake_next()
            return await batch.future
        except BaseException:
            # Abandon the batch, but only once the kernel is done with every op of it that it holds: the
            # memory they read into or write from belongs to our caller, who may reuse it the moment we raise.
            if not batch.future.done():
                batch.future.cancel()
            if batch.outstanding:
                self._cancel_in_kernel(batch)
                batch.drained = loop.create_future()
                try:
                    await wait_uncancellable(batch.drained)
                except asyncio.CancelledError:
                    pass  # we are raising anyway
            raise

    async def aclose(self) -> None:
        """Wait for in-flight I/O, detach from the loop and close the ring. Idempotent."""
        if self._closed:
            return
        self._closing = True
        # Submitters waiting for room give up (their submitted ops still drain).
        while self._room_waiters:
            fut = self._room_waiters.popleft()
            if not fut.done():
                fut.set_result(None)
        if self._inflight:
            loop = self._loop
            assert loop is not None  # ops in flight imply a bound loop
            if loop is not asyncio.get_running_loop():
                raise RuntimeError("UringEngine.aclose() must run on the loop the engine is bound to")
            waiter: asyncio.Future[None] = loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter
        if self._closed:  # a concurrent aclose() finished first
            return
        self._closed = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._ring.eventfd)
        self._ring.close()

    # -- internals -----------------------------------------------------------

    def _check_open(self) -> None:
        if self._closing:
            raise PoolClosedError("UringEngine is closed")

    def _bind(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return loop
        if self._loop is not None:
            # Re-binding is only safe once the old loop is gone and nothing is
            # in flight (e.g. sequential asyncio.run() calls).
            if not self._loop.is_closed() or self._inflight:
                raise RuntimeError("UringEngine is bound to a different event loop")
            self._loop = None
            self._room_waiters.clear()
        loop.add_reader(self._ring.eventfd, self._on_ready)
        self._loop = loop
        return loop

    def _cancel_in_kernel(self, batch: _Batch) -> None:
        """Ask the kernel to cancel ``batch``'s ops still in flight (IORING_OP_ASYNC_CANCEL).

        Best effort and only a speed-up: the caller still waits for every op's completion, which is what
        guarantees that no op touches its memory afterwards. An op the kernel cannot stop any more (already
        issued to the device) just completes normally. The cancels are tracked in ``_inflight`` under a batch
        of their own, so their user_data are not reused while their completions are pending and the CQ
        (twice the SQ) keeps room for them: at most one cancel per op in flight.
        """
        if not _async_cancel_supported():
            return
        targets = [ud for ud, (b, _) in self._inflight.items() if b is batch]
        if not targets:
            return
        assert self._loop is not None  # ops in flight imply a bound loop
        cancels = _Batch(len(targets), self._loop.create_future())
        chunk: list[RawOp] = []
        for j, target in enumerate(targets):
            ud = self._alloc_user_data()
            self._inflight[ud] = (cancels, j)
            chunk.append((OP_CANCEL, ud, 0, 0, target))
        try:
            done = self._ring.submit(chunk)
        except (OSError, ValueError, RuntimeError):
            done = 0  # the ops will still complete on their own; waiting for them is what matters
        for op in chunk[max(done, 0):]:
            del self._inflight[op[1]]
        cancels.outstanding = max(done, 0)

    def _alloc_user_data(self) -> int:
        ud = self._next_ud
        while ud in self._inflight:  # only after 2**64 ops; keep it correct anyway
            ud = (ud + 1) & _U64_MASK
        self._next_ud = (ud + 1) & _U64_MASK
        return ud

    async def _wait_room(self, *, kick: bool) -> None:
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        self._room_waiters.append(fut)
        if kick:
            # There is room but others queued first: let the head go.
            self._wake_next()
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._wake_next()  # we were woken: pass the turn on
            else:
                try:
                    self._room_waiters.remove(fut)
                except ValueError:
                    pass
            raise

    def _wake_next(self) -> None:
        while self._room_waiters:
            fut = self._room_waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def _on_ready(self) -> None:
        completions = self._ring.reap()
        if not completions:
            return
        inflight = self._inflight
        for ud, res in completions:
            entry = inflight.pop(ud, None)
            if entry is None:
                continue
            batch, idx = entry
            batch.results[idx] = res
            batch.remaining -= 1
            batch.outstanding -= 1
            if batch.outstanding == 0 and batch.drained is not None and not batch.drained.done():
                batch.drained.set_result(None)
            if batch.remaining == 0 and not batch.future.done():
                batch.future.set_result(batch.results)
        if len(inflight) < self._entries:
            self._wake_next()
        if not inflight and self._drain_waiters:
            waiters, self._drain_waiters = self._drain_waiters, []
            for w in waiters:
                if not w.done():
                    w.set_result(None)
