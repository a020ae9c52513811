"""What the read and write paths of ``mooncake://`` stand on: the options, the client's life cycle (shared
client, worker threads, registered transfer buffer), bounded client calls, the two-stage pipeline over
batches, header range reads, and delayed removal of replaced parts."""

from __future__ import annotations

import asyncio
import errno as errno_mod
import itertools
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from ...errors import BackendError
from ..base import DEFAULT_PART, Family, Fixed, RemoteBackend
from ..boundary import Fault, FaultKind, map_exceptions
from ..format import FIXED
from . import client as mc
from . import options as opt
from .regions import BufferBusy, Region, TransferBuffer

_T = TypeVar("_T")
_B = TypeVar("_B")
_X = TypeVar("_X")

# Without zero_copy the registered buffer only serves header range reads.
_CONTROL_BUFFER = 1 << 20
# The client's own buffer with zero_copy (plain calls are not used then).
_CLIENT_BUFFER = 16 << 20

# What the client's failures mean for the tier; the first match decides.
_EXCEPTIONS = (
    (TimeoutError, FaultKind.TIMEOUT),  # a call past its deadline (before OSError, its base)
    (mc.TierDown, FaultKind.DOWN),
    (BufferBusy, FaultKind.BUSY),
    (mc.ClientError, FaultKind.REFUSED),
    (OSError, FaultKind.DOWN),  # the admin server (key listing), a refused connection at open
)


class MooncakeCore(RemoteBackend):
    """The transport of :class:`~kvpool.remote.mooncake.MooncakeBackend` (see it for the parameters)."""

    scheme = "mooncake"
    family = Family("mooncake", b"KVM1", 0x6B76706F6F6C6D63, _EXCEPTIONS)  # salt: "kvpoolmc"

    def __init__(
        self,
        master: str = f"127.0.0.1:{opt.DEFAULT_MASTER_PORT}",
        *,
        metadata: str | None = None,
        local: str | None = None,
        segment: int = 0,
        buffer: int = opt.DEFAULT_BUFFER,
        protocol: str = "tcp",
        device: str = "",
        timeout: float = 2.0,
        part_size: int = DEFAULT_PART,
        prefix: str = "kvpool:",
        retry_after: float = 1.0,
        zero_copy: bool = True,
        threads: int = 4,
        admin: str | None = None,
        replicas: int = 1,
    ) -> None:
        super().__init__(timeout=timeout, part_size=part_size, prefix=prefix, retry_after=retry_after)
        where = opt.validate(
            master, metadata=metadata, local=local, segment=segment, buffer=buffer, part_size=part_size,
            prefix=prefix, protocol=protocol, threads=threads, admin=admin, replicas=replicas,
        )
        self.master_host, self.master_port, self.address, self.metadata, self.admin = where
        self.local = local
        self.segment = segment
        self.buffer = buffer
        self.protocol = protocol
        self.device = device
        self.zero_copy = bool(zero_copy)
        self.threads = threads
        self.replicas = replicas
        # one batch moves at most this many bytes through the (registered or the client's) buffer
        self._budget = buffer // 2
        # Bulk transfers are pipelined in batches of this size, one moving while the one before is verified and
        # copied. On loopback TCP the transfer is itself a memcpy competing for the same cores, and batches of
        # 8 MiB measured slower than whole ones: a batch is cut only where the buffer forces it.
        self._chunk = self._budget
        self._store: Any = None
        self._shared: mc.Shared | None = None
        self._workers: mc.Workers | None = None
        self._buf: TransferBuffer | None = None
        self._config: Any = None
        self._inflight: set[asyncio.Future[Any]] = set()
        self._cleanup_handles: set[asyncio.TimerHandle] = set()
        self._cleanup_pending: list[list[str]] = []
        self._cleanup_tasks: set[asyncio.Task[None]] = set()
        self.counters.update({
            "not_ready": 0,  # a value still being written when the read gave up waiting
            "retries": 0,  # re-reads after a failed verification (a replacement in progress)
            "buffer_waits": 0,  # calls that waited for room in the transfer buffer
        })

    # --- lifecycle ---------------------------------------------------------------------------------------
    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        self._workers = mc.Workers(self.threads, "kvpool-mooncake")
        try:
            with self._boundary(f"opening the Mooncake tier {self.address}", raises=True):
                # The client's setup retries a dead master for a minute and more: a refused connection fails here.
                try:
                    async with asyncio.timeout(self.timeout):
                        _r, w = await asyncio.open_connection(self.master_host, self.master_port)
                    w.close()
                except (OSError, TimeoutError) as exc:
                    raise Fault(
                        FaultKind.TIMEOUT if isinstance(exc, TimeoutError) else FaultKind.DOWN,
                        f"cannot reach the Mooncake master at {self.address}: {exc or type(exc).__name__}",
                    ) from exc
                local = self.local or opt.local_address(self.master_host, self.master_port)
                client_buffer = _CLIENT_BUFFER if self.zero_copy else self.buffer
                key = (self.address, self.metadata, local, self.segment, client_buffer, self.protocol, self.device)
                with mc.LOCK:
                    ent = mc.CLIENTS.get(key)
                    if ent is not None and ent.refs == 0 and (ent.suspect or ent.ready.done() and ent.ready.exception()):
                        mc.GRAVEYARD.append(ent)
                        ent = None
                    creator = ent is None
                    if ent is None:
                        ent = mc.CLIENTS[key] = mc.Shared(key)
                    ent.refs += 1
                self._shared = ent
                # the transfer engine starts its threads and listeners
                deadline = loop.time() + self.timeout + 5.0
                if creator:
                    store = await self._setup_client(ent, local, client_buffer, deadline)
                else:
                    store = await asyncio.wait_for(
                        asyncio.shield(asyncio.wrap_future(ent.ready)), max(0.0, deadline - loop.time())
                    )
                self._store = store
                size = self.buffer if self.zero_copy else _CONTROL_BUFFER
                self._buf = TransferBuffer(size, self._count_wait)
                rc = await self._call(loop.time() + self.timeout, store.register_buffer, self._buf.ptr, size)
                if rc != 0:
                    raise mc.ClientError(f"registering a {size}-byte buffer with Mooncake failed ({rc})")
                cfg = mc.ReplicateConfig()
                cfg.replica_num = self.replicas
                self._config = cfg
        except BaseException:
            await self._teardown()
            raise
        self._down_until = 0.0

    def _count_wait(self) -> None:
        self.counters["buffer_waits"] += 1

    async def _setup_client(self, ent: mc.Shared, local: str, client_buffer: int, deadline: float) -> Any:
        store = mc.Store()
        err: BaseException | None = None
        try:
            rc = await self._call(
                deadline, store.setup, local, self.metadata, self.segment, client_buffer, self.protocol,
                self.device, self.address,
            )
            if rc != 0:
                err = mc.ClientError(
                    f"setting up a Mooncake client of {self.address} (metadata {self.metadata}, local {local}, "
                    f"protocol {self.protocol}) failed with code {rc}"
                )
        except (TimeoutError, mc.ClientError, asyncio.CancelledError) as exc:
            err = exc
        if err is not None:
            mc.GRAVEYARD.append(store)  # a setup still running (or half done) must not be torn down under it
            with mc.LOCK:
                if mc.CLIENTS.get(ent.key) is ent:
                    del mc.CLIENTS[ent.key]
            ent.ready.set_exception(
                BackendError(errno_mod.EIO, f"setting up a Mooncake client of {self.address} failed: {err!r}")
            )
            raise err
        ent.ready.set_result(store)
        return store

    async def _close(self) -> None:
        await self._teardown()

    async def _teardown(self) -> None:
        # removals due later are done now, best effort
        for h in self._cleanup_handles:
            h.cancel()
        self._cleanup_handles.clear()
        pending, self._cleanup_pending = self._cleanup_pending, []
        if self._store is not None and pending:
            await self._cleanup(list(itertools.chain.from_iterable(pending)))
        if self._cleanup_tasks:
            await asyncio.gather(*self._cleanup_tasks, return_exceptions=True)
        # calls still running (a dead master) are given a moment, then the client is abandoned to them
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=self.timeout)
        store, self._store = self._store, None
        buf, self._buf = self._buf, None
        workers = self._workers
        abandon = bool(self._inflight) or workers is None
        if store is not None and buf is not None and not abandon:
            try:
                await self._call(asyncio.get_running_loop().time() + self.timeout, store.unregister_buffer, buf.ptr)
            except Exception:
                abandon = True
        if buf is not None:
            buf.close()
            if abandon:
                self.log.warning("mooncake tier %s closed with calls still running; its buffer is abandoned to them",
                                 self.address)
                mc.GRAVEYARD.append(buf)
        ent, self._shared = self._shared, None
        close = False
        if ent is not None:
            with mc.LOCK:
                ent.refs -= 1
                close = (
                    ent.refs == 0 and self.segment > 0 and store is not None and not abandon
                    and mc.CLIENTS.get(ent.key) is ent
                )
                if close:
                    del mc.CLIENTS[ent.key]
                    ent.closed = True
            if close and workers is not None:
                # unmounts the lent segment; the client holds the GIL while it joins its threads (~1 s)
                workers.submit(ent.tracked(store.close))
        self._workers = None
        if workers is not None:
            workers.shutdown()
        self._inflight = set()

    def _on_outage(self) -> None:
        if self._shared is not None:
            self._shared.suspect = True  # not reused once idle

    # --- client calls --------------------------------------------------------------------------------------
    async def _call(self, deadline: float, fn: Callable[..., _T], *args: Any, region: Region | None = None) -> _T:
        """Run a client call in a worker thread, bounded by ``deadline`` (loop time): past it the call is
        abandoned (:class:`TimeoutError`), and keeps ``region`` from being reused until it returns."""
        assert self._workers is not None
        loop = asyncio.get_running_loop()
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise TimeoutError
        name = getattr(fn, "__name__", repr(fn))
        run = self._shared.tracked(fn) if self._shared is not None else fn
        afut: asyncio.Future[_T] = asyncio.wrap_future(self._workers.submit(run, *args))
        self._inflight.add(afut)
        afut.add_done_callback(self._inflight.discard)
        afut.add_done_callback(mc.consume)
        if region is not None:
            region.busy += 1
            afut.add_done_callback(lambda _f: region.unbusy())
        try:
            return await asyncio.wait_for(asyncio.shield(afut), remaining)
        except (TimeoutError, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise mc.ClientError(f"{name}: {type(exc).__name__}: {exc}") from exc

    def _release(self, regions: Sequence[Region | None]) -> None:
        if self._buf is not None:
            for r in regions:
                self._buf.release(r)

    async def _acquire(self, nbytes: int, deadline: float) -> Region:
        if self._buf is None:
            raise BufferBusy("the backend is closing")
        return await self._buf.acquire(nbytes, deadline)

    async def _pipeline(
        self,
        batches: Sequence[_B],
        first: Callable[[_B], Awaitable[_X]],
        second: Callable[[_B, _X], Awaitable[None]],
        discard: Callable[[_X], None],
    ) -> None:
        """``second(b, first(b))`` for every batch, ``first`` of the next batch overlapping ``second`` of the
        previous one (a transfer with the verification and copies of the batch before it, or the other way
        round). ``second`` owns what ``first`` returned; ``discard`` releases it when ``second`` never runs."""
        prev: asyncio.Future[None] | None = None
        try:
            for b in batches:
                x = await first(b)
                if prev is not None:
                    t, prev = prev, None
                    try:
                        await t
                    except BaseException:
                        discard(x)
                        raise
                prev = asyncio.ensure_future(second(b, x))
            if prev is not None:
                t, prev = prev, None
                await t
        finally:
            if prev is not None:  # an error, or a cancellation: the last stage may be copying into a tensor
                await asyncio.wait({prev})
                if not prev.cancelled():
                    prev.exception()

    async def _fixed_header(self, key: bytes, name: str) -> Fixed | None:
        f = (await self._fixed_headers([name], asyncio.get_running_loop().time() + self.timeout))[0]
        return None if isinstance(f, int) else f

    async def _fixed_headers(self, names: Sequence[str], deadline: float) -> list[Fixed | int]:
        """The fixed part of the header under each name (a range read of its first bytes), or an error code
        (``OBJECT_NOT_FOUND`` absent; ``INVALID_PARAMS`` for a value too short or foreign)."""
        out: list[Fixed | int] = []
        step = max(1, min(8192, self._budget // opt.SLOT))
        for c0 in range(0, len(names), step):
            chunk = list(names[c0 : c0 + step])
            region = await self._acquire(opt.SLOT * len(chunk), deadline)
            try:
                res = await self._call(
                    deadline, self._store.get_into_ranges, [region.ptr], [chunk],
                    [[[j * opt.SLOT]] for j in range(len(chunk))], [[[0]] for _ in chunk],
                    [[[FIXED.size]] for _ in chunk], region=region,
                )
                assert self._buf is not None
                for j, nm in enumerate(chunk):
                    try:
                        c = int(res[0][j][0])
                    except (IndexError, TypeError):
                        c = -1
                    if c == FIXED.size:
                        key = bytes.fromhex(nm[len(self.prefix) :])
                        fixed = self.wire.parse_fixed(self._buf.view(region, j * opt.SLOT, FIXED.size).mv, key)
                        out.append(fixed if fixed is not None else mc.INVALID_PARAMS)
                    else:
                        if c >= 0:
                            c = mc.INVALID_PARAMS
                        mc.check_code(c, "reading headers")
                        out.append(c)
            finally:
                self._release([region])
        return out

    # --- removal -----------------------------------------------------------------------------------------
    async def _remove(self, names: list[str]) -> list[int]:
        deadline = asyncio.get_running_loop().time() + self.timeout
        res = await self._call(deadline, self._store.batch_remove, names, True)
        return [int(c) for c in res]

    def _schedule_removal(self, names: list[str], delay: float) -> None:
        """Remove values ``delay`` seconds from now (best effort; due ones are removed on close)."""
        loop = asyncio.get_running_loop()
        self._cleanup_pending.append(names)

        def due() -> None:
            self._cleanup_handles.discard(handle)
            try:
                self._cleanup_pending.remove(names)
            except ValueError:
                return
            task = loop.create_task(self._cleanup(names))
            self._cleanup_tasks.add(task)
            task.add_done_callback(self._cleanup_tasks.discard)

        handle = loop.call_later(delay, due)
        self._cleanup_handles.add(handle)

    async def _cleanup(self, names: list[str]) -> None:
        """Remove ``names`` (best effort: a part left behind is never read, and the master evicts it)."""
        if self._store is None or not self._available():
            self.counters["cleanup_errors"] += 1
            return
        try:
            with map_exceptions(self.exception_map):
                codes = await self._remove(names)
        except Fault:
            self.counters["cleanup_errors"] += 1
            return
        if any(c != 0 and c not in mc.ABSENT_CODES for c in codes):
            self.counters["cleanup_errors"] += 1
