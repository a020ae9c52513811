"""``mooncake://MASTER:PORT`` -- a remote tier on a Mooncake Store cluster, shared by every pool pointing at it.

Spec string::

    mooncake://10.0.0.5:50051?metadata=http://10.0.0.5:8080/metadata&protocol=tcp&timeout=2

Options (``?name=value``): ``metadata`` (the transfer engine's metadata server; default
``http://MASTER_HOST:8080/metadata``, the HTTP server ``mooncake_master --enable_http_metadata_server=true``
runs), ``local`` (this client's transfer-engine address ``host[:port]``; default ``127.0.0.1`` for a loopback
master, else the address this host reaches the master from, with a port the engine picks), ``segment`` (memory
this process lends to the store, default ``0``: a pure client), ``buffer`` (the registered transfer buffer,
default 256MiB), ``protocol`` (``tcp``, default, or ``rdma`` ...), ``device`` (RDMA device names, default
none), ``timeout`` (seconds, default 2.0), ``part_size`` (default 4MiB), ``prefix`` (default ``kvpool:``),
``retry_after`` (seconds the tier is skipped after the master failed to answer, default 1.0), ``zero_copy``
(default true), ``threads`` (client calls in flight, default 4), ``admin`` (the master's HTTP admin address,
used only to list keys; default ``MASTER_HOST:9003``) and ``replicas`` (copies of each object, default 1).

Cluster set-up. ``mooncake_master`` keeps the metadata; the memory is lent by clients that mount a *segment*:
storage nodes (``mooncake_client --global_segment_size=64GB ...``, the "real client" of the Mooncake wheel) or
serving processes themselves (``segment=``). An object lives in whichever segment the master placed it in and
dies with that segment's owner, so pools that come and go should be pure clients (the default) in front of
storage nodes that stay. The store has no capacity of its own here: the segments bound it, and the master
evicts (objects whose lease expired) above its high watermark. An object, or any part of one, evicted
underneath us is a miss, never data.

Object format. An object ``key`` (16 bytes) lives under ``PREFIX`` + the key in hex. Its value starts with a
header: a magic, the object's length, its part size, its number of parts, a random 64-bit version id, the key
itself (a value found under the wrong name is detected) and one xxh3-64 checksum per part, seeded with the key
and the part's index -- checksums of the row-major bytes, so they do not depend on the layout the object was
written from or is read into; the header has a checksum of its own. An object of at most ``part_size`` bytes
is stored inline after its header: one value, one fetch. A larger one is split into parts stored under
``PREFIX HEX:VERSION:INDEX``, so no transfer moves one huge value, and a range read fetches only the parts
that cover the range (whole, since checksums cover whole parts) after the header. Every read verifies what
it uses.

Replacement. Mooncake's ``upsert`` is not atomic for readers: while a value is being replaced a reader is told
the replica is not ready, or may even read a mix. So a write puts the parts under a fresh version id first,
then upserts the header; a reader that meets a value being written retries for a short while, and a reader
whose bytes fail verification reads once more (a torn read of a concurrent replacement then finds the new
value) before it reports a miss. The parts of the version a write replaced are removed ``max(5 s, 4 *
timeout)`` later (or when the backend closes), so a reader that fetched the old header an instant before still
finds them; meanwhile an overwritten multi-part object takes twice its size in the store.

Transfers. The client is synchronous: its calls run in a few daemon worker threads, each bounded by
``timeout`` (plus one second per 256 MiB moved), so the event loop never blocks and a call stuck on a dead
master is abandoned, not waited for. With ``zero_copy`` (the default) values move between the store and one
buffer registered with the transfer engine (page-aligned, page-locked when CUDA is there) by
``batch_get_into``, ``batch_put_from`` and ``batch_upsert_from``; a read then verifies the bytes there and
copies them into the caller's tensor, in place, strided or not. Without it the plain calls (``get_batch``,
``put_batch``, ``upsert_batch``) move Python ``bytes`` through the client's own buffer. Verification and
copies of 8 MiB or more run in a worker thread.

Faults. On the read side (``read_into``, ``read_many``, ``contains``, ``contains_many``, ``object_size``) a
missing, evicted, torn or corrupt object, a timeout, a master that is down or slow is a miss (``False``),
counted in :meth:`MooncakeBackend.stats`, never an exception. After a timeout or an RPC failure the tier is
skipped for ``retry_after`` seconds (reads miss at once, writes raise), so a dead master costs the serving
path one timeout, not one per call. Writes, deletes and :meth:`MooncakeBackend.keys` raise
:class:`~kvpool.BackendError`; so does :meth:`MooncakeBackend.open` when the master cannot be reached.

Lookups. ``contains_many`` is one ``batch_is_exist`` call for all keys.

Clients. Backends of one process with the same master, metadata server, local address, segment and protocol
share one Mooncake client (each with its own registered buffer). The client holds the GIL for about a second
while it closes, stalling every thread of the process, so a pure client outlives its backends for reuse; one
that lends a segment is closed (and its segment unmounted) when its last backend closes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import errno as errno_mod
import itertools
import logging
import math
import os
import queue
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import torch
import xxhash

from ..storage.allocator import ExtentAllocator
from ..storage.buffers import OFFLOAD_BYTES, alloc_aligned
from ..errors import BackendError, ConfigError
from .format import FIXED, Filler, Header, RemoteFormat, bytes_address, hdr_len, part_seed, seconds
from ..storage.backend import Backend, Capabilities, ReadRequest, nbytes_of

if TYPE_CHECKING:
    from typing import Self

    from ..config import BackendSpec

try:
    from mooncake.store import MooncakeDistributedStore as _Store
    from mooncake.store import ReplicateConfig as _ReplicateConfig
except ImportError as _exc:  # pragma: no cover - exercised only without the client
    raise ImportError(
        "the mooncake:// backend needs the Mooncake Store client: pip install mooncake-transfer-engine-non-cuda "
        "(CPU-only hosts; the efa-non-cuda build also needs libfabric1, the CUDA build libcuda.so.1) "
        f"[{_exc}]"
    ) from _exc

__all__ = ["MooncakeBackend"]

log = logging.getLogger("kvpool.mooncake")

KiB = 1 << 10
MiB = 1 << 20
_DEFAULT_PART = 4 * MiB
_MIN_PART = 4 * KiB
_MAX_PART = 256 * MiB
_DEFAULT_BUFFER = 256 * MiB
_KEY_LEN = 16
_DEFAULT_MASTER_PORT = 50051
_DEFAULT_METADATA_PORT = 8080
_DEFAULT_ADMIN_PORT = 9003

# magic and header checksum salt of this tier's objects
_WIRE = RemoteFormat(b"KVM1", 0x6B76706F6F6C6D63)  # salt: "kvpoolmc"

# Values sit in the transfer buffer at multiples of this (the allocator hands out 4 KiB-aligned regions).
_SLOT = 64
_REGION_ALIGN = 4096
# Without zero_copy the registered buffer only serves header range reads.
_CONTROL_BUFFER = 1 * MiB
# The client's own buffer with zero_copy (plain calls are not used then).
_CLIENT_BUFFER = 16 * MiB
# Verification and copies of at least this many bytes run in a worker thread (xxhash and memmove release the
# GIL), so the event loop keeps serving other requests meanwhile.
# Deadline allowance for bulk transfers: timeout + bytes / this.
_SLOW_BPS = 256 * MiB
# How long a read waits for a value that is being written (Mooncake answers "replica not ready" meanwhile).
_NOT_READY_WAIT = 0.5
# A header slot is sized for the range asked for plus this many more parts' checksums.
_SLACK_PARTS = 64

# Mooncake Store error codes (mooncake-store/include/types.h).
_BUFFER_OVERFLOW = -10
_INVALID_PARAMS = -600  # also "the buffer given is smaller than the object"
_ABSENT_CODES = frozenset({-704, -710, -712})  # OBJECT_NOT_FOUND, REPLICA_NOT_FOUND, REPLICA_IS_GONE
_NOT_READY_CODES = frozenset({-703, -714})  # REPLICA_IS_NOT_READY, REPLICA busy with an in-flight write
_TOO_SMALL_CODES = frozenset({_INVALID_PARAMS, _BUFFER_OVERFLOW})
# The master (or the client's link to it) is down: RPC_FAIL, RPC timeout / heartbeat, ILLEGAL_CLIENT (the
# master restarted and forgot us), UNAVAILABLE_IN_CURRENT_STATUS / _MODE.
_TIER_DOWN_CODES = frozenset({-900, -901, -902, -601, -1010, -1011})

_T = TypeVar("_T")
_B = TypeVar("_B")
_X = TypeVar("_X")

# Buffers whose calls were still running when their backend closed (a worker thread may yet write into them),
# and clients that met a dead master: never freed, never closed. They are few (one per outage).
_GRAVEYARD: list[Any] = []


class _Shared:
    """One Mooncake client, shared by every backend of this process with the same set-up. Closing a client
    holds the GIL for about a second (the client joins its threads), stalling every thread of the process, so a
    pure client is kept for reuse when its last backend closes; one that lends a segment is closed then."""

    __slots__ = ("key", "ready", "refs", "suspect")

    def __init__(self, key: tuple[Any, ...]) -> None:
        self.key = key
        self.ready: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.refs = 0
        self.suspect = False  # it met a dead or stalled master: not reused once idle


_CLIENTS: dict[tuple[Any, ...], _Shared] = {}
_CLIENTS_LOCK = threading.Lock()


# --- pure helpers -----------------------------------------------------------------------------------------
_INLINE_OFF = hdr_len(1)  # where an inline object's data starts (64: aligned for any dtype)


def _round(n: int, a: int = _SLOT) -> int:
    return (n + a - 1) // a * a


class _Plan:
    """One range read whose header was found: what to verify and copy once the bytes are here."""

    __slots__ = ("index", "key", "name", "hdr", "offset", "nbytes", "dest", "parts", "status", "filler")

    def __init__(
        self, index: int, key: bytes, name: str, hdr: Header, offset: int, nbytes: int, dest: torch.Tensor
    ) -> None:
        self.index = index
        self.key = key
        self.name = name
        self.hdr = hdr
        self.offset = offset
        self.nbytes = nbytes
        self.dest = dest
        self.parts: list[int] = (
            list(range(offset // hdr.part_size, (offset + nbytes - 1) // hdr.part_size + 1)) if nbytes else []
        )
        self.status = "ok"
        self.filler: Filler | None = None


class _Value:
    """Bytes fetched from the store: a view, its address, and what keeps them alive."""

    __slots__ = ("mv", "addr", "keep")

    def __init__(self, mv: memoryview, addr: int, keep: Any = None) -> None:
        self.mv = mv
        self.addr = addr
        self.keep = keep


class _Prepared:
    """A batch of values ready to be written: in the transfer buffer (``region``) or as ``vals``."""

    __slots__ = ("names", "lens", "region", "offs", "vals")

    def __init__(
        self, names: list[str], lens: list[int], region: _Region | None, offs: list[int], vals: list[Any]
    ) -> None:
        self.names = names
        self.lens = lens
        self.region = region
        self.offs = offs
        self.vals = vals


class _Item:
    """One object being written."""

    __slots__ = ("key", "name", "flat", "nbytes", "nparts", "version", "sums")

    def __init__(self, key: bytes, name: str, flat: torch.Tensor, part_size: int) -> None:
        self.key = key
        self.name = name
        self.flat = flat  # contiguous uint8 CPU bytes of the source
        self.nbytes = flat.numel()
        self.nparts = -(-self.nbytes // part_size)
        self.version = int.from_bytes(os.urandom(8), "little")
        self.sums: list[int] = [0] * self.nparts

    @property
    def inline(self) -> bool:
        return self.nparts == 1


# round 1 of a read: the value (or error code) under each header name, and the buffer regions holding them
_Fetched = tuple[dict[str, "_Value | int"], list["_Region"]]


def _split_hostport(text: str, default_port: int | None, what: str) -> tuple[str, int | None]:
    parts = urlsplit(f"//{text}")
    if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.username:
        raise ConfigError(f"{what} must be host[:port], got {text!r}")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"{what}: bad port in {text!r}") from None
    return parts.hostname, port if port is not None else default_port


def _fmt_host(host: str, port: int | None) -> str:
    h = f"[{host}]" if ":" in host else host
    return h if port is None else f"{h}:{port}"


def _is_loopback(host: str) -> bool:
    return host == "localhost" or host.startswith("127.") or host == "::1"


def _local_address(master_host: str, master_port: int) -> str:
    """The address this host reaches the master from (a UDP connect sends nothing)."""
    if _is_loopback(master_host):
        return "127.0.0.1"
    try:
        fam = socket.AF_INET6 if ":" in master_host else socket.AF_INET
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.connect((master_host, master_port))
            return str(s.getsockname()[0])
    except OSError:
        return socket.gethostname()


class _TierDown(Exception):
    """The master did not answer (an RPC failure code): the tier is skipped for a while."""

    def __init__(self, code: int, what: str) -> None:
        super().__init__(f"{what}: Mooncake error {code}")
        self.code = code


class _ClientError(Exception):
    """The client raised, or refused a write with an error code."""


class _BufferBusy(Exception):
    """No room in the transfer buffer before the deadline."""


# --- the client's threads ---------------------------------------------------------------------------------
class _Workers:
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


class _Region:
    """An extent of the registered transfer buffer. Freed once its owner released it *and* no client call
    that was given its address is still running (a call abandoned at its deadline may yet write into it)."""

    __slots__ = ("alloc", "start", "nbytes", "ptr", "busy", "released")

    def __init__(self, alloc: ExtentAllocator, start: int, nbytes: int, ptr: int) -> None:
        self.alloc = alloc
        self.start = start
        self.nbytes = nbytes
        self.ptr = ptr
        self.busy = 0
        self.released = False


def _consume(f: asyncio.Future[Any]) -> None:
    if not f.cancelled():
        f.exception()  # an abandoned call's error is not "never retrieved"


# --- the backend ------------------------------------------------------------------------------------------
class MooncakeBackend(Backend):
    """Remote tier on a Mooncake Store cluster through its Python client (``mooncake.store``).

    Parameters
    ----------
    master
        ``host:port`` of ``mooncake_master`` (default port 50051).
    metadata
        The transfer engine's metadata server; default ``http://MASTER_HOST:8080/metadata``.
    local
        This client's transfer-engine address ``host[:port]``; default ``127.0.0.1`` for a loopback master,
        else the address this host reaches the master from (the engine picks the port).
    segment
        Bytes of this process's memory lent to the store (objects placed there die with the process);
        0 (default) makes a pure client of storage nodes.
    buffer
        Bytes of the transfer buffer registered with the engine (zero-copy transfers go through it; half of
        it bounds one batch).
    protocol, device
        Transfer protocol (``tcp``, ``rdma``...) and RDMA device names.
    timeout
        Seconds every client call may take (plus one second per 256 MiB moved).
    part_size
        Objects larger than this are split into parts of this size (the checksum and fetch granule).
    prefix
        Prefix of every key this backend writes.
    retry_after
        After a timeout or an RPC failure the tier is skipped this long (reads miss, writes raise).
    zero_copy
        Move values through the registered buffer (``batch_get_into``/``batch_put_from``); ``False`` uses the
        plain calls that return and take ``bytes``.
    threads
        Worker threads for client calls (calls in flight at once).
    admin
        ``host:port`` of the master's HTTP admin server, used by :meth:`keys` only; default ``MASTER_HOST:9003``.
    replicas
        Copies the master keeps of each value.
    """

    scheme = "mooncake"
    capabilities = Capabilities(persistent=False, remote=True, partial_reads=True)

    def __init__(
        self,
        master: str = f"127.0.0.1:{_DEFAULT_MASTER_PORT}",
        *,
        metadata: str | None = None,
        local: str | None = None,
        segment: int = 0,
        buffer: int = _DEFAULT_BUFFER,
        protocol: str = "tcp",
        device: str = "",
        timeout: float = 2.0,
        part_size: int = _DEFAULT_PART,
        prefix: str = "kvpool:",
        retry_after: float = 1.0,
        zero_copy: bool = True,
        threads: int = 4,
        admin: str | None = None,
        replicas: int = 1,
    ) -> None:
        super().__init__()
        host, port = _split_hostport(master, _DEFAULT_MASTER_PORT, "the master address")
        assert port is not None
        if not (isinstance(timeout, (int, float)) and timeout > 0 and math.isfinite(timeout)):
            raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if not (isinstance(part_size, int) and _MIN_PART <= part_size <= _MAX_PART):
            raise ConfigError(f"part_size must be in [{_MIN_PART}, {_MAX_PART}] bytes, got {part_size!r}")
        if not (isinstance(buffer, int) and buffer >= 2 * (_round(_INLINE_OFF + part_size, _REGION_ALIGN))):
            raise ConfigError(
                f"buffer must hold two parts of {part_size} bytes with their headers "
                f"(>= {2 * _round(_INLINE_OFF + part_size, _REGION_ALIGN)} bytes), got {buffer!r}"
            )
        if not (isinstance(segment, int) and segment >= 0):
            raise ConfigError(f"segment must be a size >= 0, got {segment!r}")
        if not isinstance(prefix, str) or any(c.isspace() for c in prefix):
            raise ConfigError(f"prefix must be a str without spaces, got {prefix!r}")
        if not (isinstance(retry_after, (int, float)) and retry_after >= 0):
            raise ConfigError(f"retry_after must be >= 0 seconds, got {retry_after!r}")
        if not (isinstance(threads, int) and 1 <= threads <= 256):
            raise ConfigError(f"threads must be in [1, 256], got {threads!r}")
        if not (isinstance(replicas, int) and replicas >= 1):
            raise ConfigError(f"replicas must be a positive integer, got {replicas!r}")
        if not isinstance(protocol, str) or not protocol.isidentifier():
            raise ConfigError(f"protocol must be a name like tcp or rdma, got {protocol!r}")
        if local is not None:
            _split_hostport(local, None, "local")
        if admin is not None:
            ahost, aport = _split_hostport(admin, _DEFAULT_ADMIN_PORT, "admin")
        else:
            ahost, aport = host, _DEFAULT_ADMIN_PORT
        self.master_host = host
        self.master_port = port
        self.address = _fmt_host(host, port)
        self.metadata = metadata or f"http://{_fmt_host(host, _DEFAULT_METADATA_PORT)}/metadata"
        self.local = local
        self.segment = segment
        self.buffer = buffer
        self.protocol = protocol
        self.device = device
        self.timeout = float(timeout)
        self.part_size = part_size
        self.prefix = prefix
        self.retry_after = float(retry_after)
        self.zero_copy = bool(zero_copy)
        self.threads = threads
        self.admin = _fmt_host(ahost, aport)
        self.replicas = replicas
        # old parts outlive the header that replaced them by this much (see the module docstring)
        self.grace = max(5.0, 4 * self.timeout)
        # one batch moves at most this many bytes through the (registered or the client's) buffer
        self._budget = buffer // 2
        # Bulk transfers are pipelined in batches of this size, one moving while the one before is verified and
        # copied. On loopback TCP the transfer is itself a memcpy competing for the same cores, and batches of
        # 8 MiB measured slower than whole ones: a batch is cut only where the buffer forces it.
        self._chunk = self._budget
        self._store: Any = None
        self._shared: _Shared | None = None
        self._workers: _Workers | None = None
        self._mapping: Any = None
        self._arena: torch.Tensor | None = None
        self._arena_mv: memoryview | None = None
        self._arena_ptr = 0
        self._alloc: ExtentAllocator | None = None
        self._freed: asyncio.Event | None = None
        self._config: Any = None
        self._inflight: set[asyncio.Future[Any]] = set()
        self._cleanup_handles: set[asyncio.TimerHandle] = set()
        self._cleanup_pending: list[list[str]] = []
        self._cleanup_tasks: set[asyncio.Task[None]] = set()
        self._down_until = 0.0
        self.counters: dict[str, int] = {
            "hits": 0,
            "misses": 0,  # every read that returned False, whatever the reason below
            "absent": 0,  # no value: never written, deleted or evicted
            "missing_parts": 0,  # header found but a part is gone (evicted underneath)
            "corrupt": 0,  # a header or part failed verification (after one re-read)
            "not_ready": 0,  # a value still being written when the read gave up waiting
            "retries": 0,  # re-reads after a failed verification (a replacement in progress)
            "timeouts": 0,
            "errors": 0,  # RPC failures, client errors
            "unavailable": 0,  # calls answered at once while the tier is skipped after a failure
            "buffer_waits": 0,  # calls that waited for room in the transfer buffer
            "bytes_read": 0,
            "bytes_written": 0,
            "writes": 0,
            "write_errors": 0,
            "cleanup_errors": 0,
        }

    @classmethod
    def from_spec(cls, spec: BackendSpec) -> Self:
        spec.check_known((
            "metadata", "local", "segment", "buffer", "protocol", "device", "timeout", "part_size", "prefix",
            "retry_after", "zero_copy", "threads", "admin", "replicas",
        ))
        if spec.scheme != "mooncake":
            raise ConfigError(f"{spec.text}: the mooncake backend does not serve {spec.scheme}://")
        loc = spec.location.strip("/") or f"127.0.0.1:{_DEFAULT_MASTER_PORT}"
        try:
            return cls(
                loc,
                metadata=spec.params.get("metadata") or None,
                local=spec.params.get("local") or None,
                segment=spec.size("segment", 0) or 0,
                buffer=spec.size("buffer", _DEFAULT_BUFFER) or _DEFAULT_BUFFER,
                protocol=spec.params.get("protocol", "tcp"),
                device=spec.params.get("device", ""),
                timeout=seconds(spec, "timeout", 2.0) or 2.0,
                part_size=spec.size("part_size", _DEFAULT_PART) or _DEFAULT_PART,
                prefix=spec.params.get("prefix", "kvpool:"),
                retry_after=seconds(spec, "retry_after", 1.0, zero=True) or 0.0,
                zero_copy=spec.flag("zero_copy", True),
                threads=spec.integer("threads", 4),
                admin=spec.params.get("admin") or None,
                replicas=spec.integer("replicas", 1),
            )
        except ConfigError as exc:
            if spec.text and spec.text not in str(exc):
                raise ConfigError(f"{spec.text}: {exc}") from None
            raise

    # --- lifecycle ---------------------------------------------------------------------------------------
    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        self._freed = asyncio.Event()
        self._workers = _Workers(self.threads, "kvpool-mooncake")
        try:
            # The client's setup retries a dead master for a minute and more: a refused connection fails here.
            try:
                async with asyncio.timeout(self.timeout):
                    _r, w = await asyncio.open_connection(self.master_host, self.master_port)
                w.close()
            except (OSError, TimeoutError) as exc:
                raise BackendError(
                    errno_mod.ETIMEDOUT if isinstance(exc, TimeoutError) else errno_mod.ECONNREFUSED,
                    f"cannot reach the Mooncake master at {self.address}: {exc or type(exc).__name__}",
                ) from exc
            local = self.local or _local_address(self.master_host, self.master_port)
            client_buffer = _CLIENT_BUFFER if self.zero_copy else self.buffer
            key = (self.address, self.metadata, local, self.segment, client_buffer, self.protocol, self.device)
            with _CLIENTS_LOCK:
                ent = _CLIENTS.get(key)
                if ent is not None and ent.refs == 0 and (ent.suspect or ent.ready.done() and ent.ready.exception()):
                    _GRAVEYARD.append(ent)
                    ent = None
                creator = ent is None
                if ent is None:
                    ent = _CLIENTS[key] = _Shared(key)
                ent.refs += 1
            self._shared = ent
            # the transfer engine starts its threads and listeners
            deadline = loop.time() + self.timeout + 5.0
            if creator:
                store = await self._setup_client(ent, local, client_buffer, deadline)
            else:
                try:
                    store = await asyncio.wait_for(
                        asyncio.shield(asyncio.wrap_future(ent.ready)), max(0.0, deadline - loop.time())
                    )
                except TimeoutError as exc:
                    raise BackendError(
                        errno_mod.ETIMEDOUT, f"setting up a Mooncake client of {self.address}: no answer in time"
                    ) from exc
            self._store = store
            size = self.buffer if self.zero_copy else _CONTROL_BUFFER
            if torch.cuda.is_available():
                self._arena = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            else:
                self._mapping = alloc_aligned(size)
                self._arena = torch.frombuffer(self._mapping, dtype=torch.uint8, count=size)
            self._arena_ptr = self._arena.data_ptr()
            self._arena_mv = self._arena.numpy().data.cast("B")
            self._alloc = ExtentAllocator(size, _REGION_ALIGN)
            rc = await self._call(loop.time() + self.timeout, store.register_buffer, self._arena_ptr, size)
            if rc != 0:
                raise BackendError(errno_mod.EIO, f"registering a {size}-byte buffer with Mooncake failed ({rc})")
            cfg = _ReplicateConfig()
            cfg.replica_num = self.replicas
            self._config = cfg
        except BaseException:
            await self._teardown()
            raise
        self._down_until = 0.0

    async def _setup_client(self, ent: _Shared, local: str, client_buffer: int, deadline: float) -> Any:
        store = _Store()
        err: BackendError | None = None
        try:
            rc = await self._call(
                deadline, store.setup, local, self.metadata, self.segment, client_buffer, self.protocol,
                self.device, self.address,
            )
            if rc != 0:
                err = BackendError(
                    errno_mod.ECONNREFUSED,
                    f"setting up a Mooncake client of {self.address} (metadata {self.metadata}, local {local}, "
                    f"protocol {self.protocol}) failed with code {rc}",
                )
        except (TimeoutError, _ClientError, asyncio.CancelledError) as exc:
            err = BackendError(errno_mod.ETIMEDOUT, f"setting up a Mooncake client of {self.address}: {exc!r}")
            err.__cause__ = exc
        if err is not None:
            _GRAVEYARD.append(store)  # a setup still running (or half done) must not be torn down under it
            with _CLIENTS_LOCK:
                if _CLIENTS.get(ent.key) is ent:
                    del _CLIENTS[ent.key]
            ent.ready.set_exception(err)
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
        if self._store is not None and pending and self._available():
            try:
                await self._remove(list(itertools.chain.from_iterable(pending)))
            except Exception:
                self.counters["cleanup_errors"] += 1
        if self._cleanup_tasks:
            await asyncio.gather(*self._cleanup_tasks, return_exceptions=True)
        # calls still running (a dead master) are given a moment, then the client is abandoned to them
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=self.timeout)
        store, self._store = self._store, None
        arena, mapping = self._arena, self._mapping
        workers = self._workers
        abandon = bool(self._inflight) or workers is None
        if store is not None and not abandon:
            try:
                await self._call(asyncio.get_running_loop().time() + self.timeout, store.unregister_buffer,
                                 self._arena_ptr)
            except Exception:
                abandon = True
        if abandon and arena is not None:
            log.warning("mooncake tier %s closed with calls still running; its buffer is abandoned to them",
                        self.address)
            _GRAVEYARD.append((arena, mapping))
        ent, self._shared = self._shared, None
        if ent is not None:
            with _CLIENTS_LOCK:
                ent.refs -= 1
                close = (
                    ent.refs == 0 and self.segment > 0 and store is not None and not abandon
                    and _CLIENTS.get(ent.key) is ent
                )
                if close:
                    del _CLIENTS[ent.key]
            if close and workers is not None:
                # unmounts the lent segment; the client holds the GIL while it joins its threads (~1 s)
                workers.submit(store.close)
        self._arena = self._arena_mv = self._mapping = None
        self._alloc = None
        self._workers = None
        if workers is not None:
            workers.shutdown()
        self._inflight = set()

    # --- names -------------------------------------------------------------------------------------------
    def _name(self, key: bytes) -> str:
        if not isinstance(key, bytes) or len(key) != _KEY_LEN:
            raise ValueError(f"keys are {_KEY_LEN} bytes, got {key!r}")
        return f"{self.prefix}{key.hex()}"

    @staticmethod
    def _part_name(name: str, version: int, part: int) -> str:
        return f"{name}:{version:016x}:{part}"

    # --- failure accounting ------------------------------------------------------------------------------
    def _available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _deadline(self, nbytes: int) -> float:
        return self.timeout + nbytes / _SLOW_BPS

    def _failed(self, exc: BaseException) -> None:
        """Count a failed call; a timeout or an RPC failure skips the tier for ``retry_after``."""
        if isinstance(exc, TimeoutError):
            self.counters["timeouts"] += 1
        else:
            self.counters["errors"] += 1
        if isinstance(exc, (TimeoutError, _TierDown)):
            if self._shared is not None:
                self._shared.suspect = True
            if self._available():
                log.warning(
                    "mooncake tier %s failed (%s: %s); skipping it for %.1f s",
                    self.address, type(exc).__name__, exc, self.retry_after,
                )
            self._down_until = time.monotonic() + self.retry_after

    def _backend_error(self, exc: BaseException, what: str) -> BackendError:
        if isinstance(exc, TimeoutError):
            return BackendError(errno_mod.ETIMEDOUT, f"{what}: no answer from {self.address} in time")
        if isinstance(exc, _BufferBusy):
            return BackendError(errno_mod.EBUSY, f"{what}: no room in the transfer buffer in time")
        return BackendError(errno_mod.EIO, f"{what} on {self.address}: {exc}")

    def _check_code(self, code: int, what: str) -> None:
        if code in _TIER_DOWN_CODES:
            raise _TierDown(code, what)

    # --- client calls and the transfer buffer --------------------------------------------------------------
    async def _call(self, deadline: float, fn: Callable[..., _T], *args: Any, region: _Region | None = None) -> _T:
        """Run a client call in a worker thread, bounded by ``deadline`` (loop time). An abandoned call keeps
        ``region`` from being reused until it returns."""
        assert self._workers is not None
        loop = asyncio.get_running_loop()
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise TimeoutError
        afut: asyncio.Future[_T] = asyncio.wrap_future(self._workers.submit(fn, *args))
        self._inflight.add(afut)
        afut.add_done_callback(self._inflight.discard)
        afut.add_done_callback(_consume)
        if region is not None:
            region.busy += 1
            afut.add_done_callback(lambda _f: self._unbusy(region))
        try:
            return await asyncio.wait_for(asyncio.shield(afut), remaining)
        except (TimeoutError, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise _ClientError(f"{getattr(fn, '__name__', fn)}: {type(exc).__name__}: {exc}") from exc

    async def _acquire(self, nbytes: int, deadline: float) -> _Region:
        assert self._alloc is not None
        if nbytes > self._alloc.capacity:
            raise _BufferBusy(f"{nbytes} bytes do not fit a {self._alloc.capacity}-byte buffer")
        loop = asyncio.get_running_loop()
        waited = False
        while True:
            start = self._alloc.alloc(max(nbytes, 1))
            if start is not None:
                return _Region(self._alloc, start, max(nbytes, 1), self._arena_ptr + start)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise _BufferBusy(f"no room for {nbytes} bytes in the transfer buffer")
            if not waited:
                self.counters["buffer_waits"] += 1
                waited = True
            assert self._freed is not None
            ev = self._freed
            try:
                async with asyncio.timeout(remaining):
                    await ev.wait()
            except TimeoutError:
                raise _BufferBusy(f"no room for {nbytes} bytes in the transfer buffer") from None

    def _release(self, region: _Region | None) -> None:
        if region is None or region.released:
            return
        region.released = True
        if region.busy == 0:
            self._free(region)

    def _unbusy(self, region: _Region) -> None:
        region.busy -= 1
        if region.released and region.busy == 0:
            self._free(region)

    def _free(self, region: _Region) -> None:
        if region.alloc is not self._alloc:  # closed meanwhile: the allocator went with the buffer
            return
        region.alloc.free(region.start, region.nbytes)
        if self._freed is not None:
            self._freed.set()
            self._freed = asyncio.Event()

    def _view(self, region: _Region, off: int, n: int) -> _Value:
        assert self._arena_mv is not None
        a = region.start + off
        return _Value(self._arena_mv[a : a + n], self._arena_ptr + a)

    async def _cpu(self, work: int, fn: Callable[..., _T], *args: Any) -> _T:
        """Run pure CPU work (verification, copies) inline, or in a worker thread when large. The thread is
        waited for even if the caller is cancelled: it may be writing into the caller's tensor."""
        if work < OFFLOAD_BYTES:
            return fn(*args)
        task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            await asyncio.wait({task})
            raise

    def _batches(self, sizes: Sequence[int], limit: int | None = None) -> Iterator[list[int]]:
        """Indices of ``sizes`` cut into runs whose slots fit ``limit`` bytes (one batch by default)."""
        limit = self._budget if limit is None else limit
        cur: list[int] = []
        total = 0
        for i, n in enumerate(sizes):
            s = _round(n)
            if cur and total + s > limit:
                yield cur
                cur, total = [], 0
            cur.append(i)
            total += s
        if cur:
            yield cur

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

    # --- fetching values -----------------------------------------------------------------------------------
    async def _fetch(
        self, names: Sequence[str], slots: Sequence[int], deadline: float, *, exact: bool
    ) -> tuple[list[_Value | int], list[_Region]]:
        """Fetch the values of ``names`` (each at most ``slots[i]`` bytes, exactly that if ``exact``); a value
        or an error code per name. Values being written are waited for a while. The caller releases the
        regions once it is done with the values."""
        out: list[_Value | int] = [-704] * len(names)
        regions: list[_Region] = []
        loop = asyncio.get_running_loop()
        ready_by = min(deadline, loop.time() + _NOT_READY_WAIT)
        todo = list(range(len(names)))
        delay = 0.001
        try:
            region: _Region | None = None
            offs: list[int] = []
            if self.zero_copy:
                offs = list(itertools.accumulate((_round(s) for s in slots), initial=0))
                region = await self._acquire(offs[-1], deadline)
                regions.append(region)
            while True:
                sub = [names[i] for i in todo]
                if region is not None:
                    codes = await self._call(
                        deadline, self._store.batch_get_into, sub, [region.ptr + offs[i] for i in todo],
                        [slots[i] for i in todo], region=region,
                    )
                    for i, c in zip(todo, codes):
                        c = int(c)
                        out[i] = self._view(region, offs[i], c) if c >= 0 else c
                else:
                    vals = await self._call(deadline, self._store.get_batch, sub)
                    empty = []
                    for i, v in zip(todo, vals):
                        if v:
                            b = bytes(v)
                            out[i] = _Value(memoryview(b), bytes_address(b), b)
                        else:
                            empty.append(i)
                    if empty:
                        # an empty answer is a missing value or one being written: ask which
                        ex = await self._call(deadline, self._store.batch_is_exist, [names[i] for i in empty])
                        for i, e in zip(empty, ex):
                            e = int(e)
                            out[i] = -703 if e == 1 else (-704 if e == 0 else e)
                for i in todo:
                    v = out[i]
                    if isinstance(v, int):
                        self._check_code(v, "fetching values")
                todo = [i for i in todo if isinstance(out[i], int) and out[i] in _NOT_READY_CODES]
                if not todo or loop.time() + delay > ready_by:
                    break
                await asyncio.sleep(delay)
                delay = min(2 * delay, 0.02)
            if exact:
                for i, v in enumerate(out):
                    if isinstance(v, _Value) and len(v.mv) != slots[i]:
                        out[i] = _INVALID_PARAMS
        except BaseException:
            for r in regions:
                self._release(r)
            raise
        return out, regions

    async def _fetch_headers(
        self, names: Sequence[str], guesses: Sequence[int], deadline: float
    ) -> tuple[list[_Value | int], list[_Region]]:
        """Header values (with the data of inline objects) into slots sized from the ranges asked for; the
        few that do not fit are measured and fetched again."""
        if not self.zero_copy:
            return await self._fetch(names, guesses, deadline, exact=False)
        out, regions = await self._fetch(names, guesses, deadline, exact=False)
        big = [i for i, v in enumerate(out) if isinstance(v, int) and v in _TOO_SMALL_CODES]
        if big:
            try:
                sizes = await self._call(deadline, self._sizes, [names[i] for i in big])
                for s in sizes:
                    self._check_code(s, "measuring values")
                fit = [(i, s) for i, s in zip(big, sizes) if 0 < s <= self._budget]
                for i, s in zip(big, sizes):
                    if s <= 0 or s > self._budget:
                        out[i] = s if s < 0 else _INVALID_PARAMS
                if fit:
                    vals, more = await self._fetch(
                        [names[i] for i, _ in fit], [s for _, s in fit], deadline, exact=False
                    )
                    regions.extend(more)
                    for (i, _), v in zip(fit, vals):
                        out[i] = v
            except BaseException:
                for r in regions:
                    self._release(r)
                raise
        return out, regions

    def _sizes(self, names: Sequence[str]) -> list[int]:
        return [int(self._store.get_size(n)) for n in names]

    async def _fixed_headers(
        self, names: Sequence[str], deadline: float
    ) -> list[tuple[int, int, int, int, bool] | int]:
        """The fixed part of the header under each name (a range read of its first bytes), or an error code
        (-704 absent; ``_INVALID_PARAMS`` for a value too short or foreign)."""
        out: list[tuple[int, int, int, int, bool] | int] = []
        step = max(1, min(8192, self._budget // _SLOT))
        for c0 in range(0, len(names), step):
            chunk = list(names[c0 : c0 + step])
            region = await self._acquire(_SLOT * len(chunk), deadline)
            try:
                res = await self._call(
                    deadline, self._store.get_into_ranges, [region.ptr], [chunk],
                    [[[j * _SLOT]] for j in range(len(chunk))], [[[0]] for _ in chunk],
                    [[[FIXED.size]] for _ in chunk], region=region,
                )
                for j, nm in enumerate(chunk):
                    try:
                        c = int(res[0][j][0])
                    except (IndexError, TypeError):
                        c = -1
                    if c == FIXED.size:
                        key = bytes.fromhex(nm[len(self.prefix) :])
                        fixed = _WIRE.parse_fixed(self._view(region, j * _SLOT, FIXED.size).mv, key)
                        out.append(fixed if fixed is not None else _INVALID_PARAMS)
                    else:
                        if c >= 0:
                            c = _INVALID_PARAMS
                        self._check_code(c, "reading headers")
                        out.append(c)
            finally:
                self._release(region)
        return out

    # --- sizes -------------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int | None:
        return None

    async def object_size(self, key: bytes) -> int | None:
        self._check_open()
        name = self._name(key)
        if not self._available():
            self.counters["unavailable"] += 1
            return None
        try:
            fixed = (await self._fixed_headers([name], asyncio.get_running_loop().time() + self.timeout))[0]
        except (TimeoutError, _TierDown, _ClientError, _BufferBusy) as exc:
            self._failed(exc)
            return None
        return None if isinstance(fixed, int) else fixed[2]

    # --- reads -------------------------------------------------------------------------------------------
    async def read_into(self, key: bytes, dest: torch.Tensor, offset: int = 0) -> bool:
        return (await self._read([ReadRequest(key, dest, offset)]))[0]

    async def read_many(self, requests: Sequence[ReadRequest]) -> list[bool]:
        if not requests:
            return []
        return await self._read(requests)

    def _guess(self, offset: int, nbytes: int) -> int:
        """Slot for a header value when the range ``[offset, offset+nbytes)`` is read: exact for an inline
        object that ends there, room for ``_SLACK_PARTS`` more checksums for a multi-part one."""
        end = max(offset + nbytes, 1)
        ps = self.part_size
        inline = _INLINE_OFF + end if end <= ps else 0
        return max(inline, hdr_len(-(-end // ps) + _SLACK_PARTS))

    async def _read(self, reqs: Sequence[ReadRequest]) -> list[bool]:
        self._check_open()
        names = [self._name(r.key) for r in reqs]
        sizes = [nbytes_of(r.dest) for r in reqs]
        for r in reqs:
            if r.offset < 0:
                raise ValueError(f"offset {r.offset} is negative")
            if r.offset % r.dest.element_size():
                raise ValueError(f"offset {r.offset} is not a multiple of the destination's itemsize")
        out = [False] * len(reqs)
        if not self._available():
            self.counters["unavailable"] += 1
            self.counters["misses"] += len(reqs)
            return out
        status: list[str | None] = [None] * len(reqs)
        deadline = asyncio.get_running_loop().time() + self._deadline(sum(sizes))
        guesses = [self._guess(r.offset, n) for r, n in zip(reqs, sizes)]
        groups = list(self._batches(guesses, self._chunk))
        try:

            async def fetch(idxs: list[int]) -> _Fetched:
                return await self._fetch_group(names, guesses, idxs, deadline)

            async def finish(idxs: list[int], fetched: _Fetched) -> None:
                await self._finish_group(reqs, names, sizes, idxs, fetched, status, deadline)

            await self._pipeline(groups, fetch, finish, self._discard)
            # a value replaced while we read it fails verification: read those once more
            again = [i for i in range(len(reqs)) if status[i] == "corrupt"]
            if again:
                self.counters["retries"] += len(again)
                for idxs in self._batches([guesses[i] for i in again], self._chunk):
                    group = [again[k] for k in idxs]
                    await finish(group, await fetch(group))
        except ValueError:
            raise
        except (TimeoutError, _TierDown, _ClientError, _BufferBusy) as exc:
            self._failed(exc)
        for i, st in enumerate(status):
            if st == "ok":
                out[i] = True
            elif st is not None:
                self.counters[st] += 1
        hits = sum(out)
        self.counters["hits"] += hits
        self.counters["misses"] += len(reqs) - hits
        self.counters["bytes_read"] += sum(s for s, ok in zip(sizes, out) if ok)
        return out

    @staticmethod
    def _code_status(code: int, absent: str) -> str:
        if code in _ABSENT_CODES:
            return absent
        if code in _NOT_READY_CODES:
            return "not_ready"
        if code in _TOO_SMALL_CODES:
            return "corrupt"  # a value of another size than its header says
        return "errors"

    async def _fetch_group(
        self, names: list[str], guesses: list[int], idxs: list[int], deadline: float
    ) -> _Fetched:
        """Round 1 of a read: the header values (small objects come with their data)."""
        slot: dict[str, int] = {}
        for i in idxs:
            slot[names[i]] = max(slot.get(names[i], 0), guesses[i])
        uniq = list(slot)
        values, regions = await self._fetch_headers(uniq, [slot[n] for n in uniq], deadline)
        return dict(zip(uniq, values)), regions

    def _discard(self, fetched: _Fetched) -> None:
        for rg in fetched[1]:
            self._release(rg)

    async def _finish_group(
        self, reqs: Sequence[ReadRequest], names: list[str], sizes: list[int], idxs: list[int],
        fetched: _Fetched, status: list[str | None], deadline: float,
    ) -> None:
        by_name, regions = fetched
        plans: list[_Plan] = []
        try:
            hdrs: dict[str, Header | None] = {}
            for i in idxs:
                r, nm = reqs[i], names[i]
                v = by_name[nm]
                if isinstance(v, int):
                    status[i] = self._code_status(v, "absent")
                    continue
                if nm not in hdrs:
                    hdrs[nm] = _WIRE.parse_header(v.mv, r.key)
                hdr = hdrs[nm]
                if hdr is None:
                    status[i] = "corrupt"
                    continue
                if r.offset + sizes[i] > hdr.length:
                    raise ValueError(
                        f"range [{r.offset}, {r.offset + sizes[i]}) is outside an object of {hdr.length} bytes"
                    )
                plans.append(_Plan(i, r.key, nm, hdr, r.offset, sizes[i], r.dest))
            # inline objects: verified and copied while their bytes are in the buffer
            inline = [(pl, by_name[pl.name]) for pl in plans if pl.hdr.inline]
            if inline:
                work = sum(pl.hdr.length for pl, _ in inline)
                await self._cpu(work, self._finish_inline, inline)
                for pl, _ in inline:
                    status[pl.index] = pl.status
        finally:
            for rg in regions:
                self._release(rg)
        # round 2: the parts covering the ranges of multi-part objects
        multi = [pl for pl in plans if not pl.hdr.inline]
        if multi:
            await self._read_parts(multi, deadline)
            for pl in multi:
                status[pl.index] = pl.status

    @staticmethod
    def _finish_inline(items: list[tuple[_Plan, _Value | int]]) -> None:
        for pl, v in items:
            assert isinstance(v, _Value)
            hdr = pl.hdr
            data = v.mv[hdr.data_off :]
            if xxhash.xxh3_64_intdigest(data, part_seed(pl.key, 0)) != hdr.sums[0]:
                pl.status = "corrupt"
                continue
            if pl.nbytes:
                filler = Filler(pl.dest)
                filler.put(0, v.addr + hdr.data_off + pl.offset, pl.nbytes)
                filler.finish()

    async def _read_parts(self, plans: list[_Plan], deadline: float) -> None:
        want: list[tuple[bytes, int, int]] = []
        wnames: list[str] = []
        wlens: list[int] = []
        users: dict[tuple[bytes, int, int], list[_Plan]] = {}
        for pl in plans:
            for p in pl.parts:
                ident = (pl.key, pl.hdr.version, p)
                if ident not in users:
                    users[ident] = []
                    want.append(ident)
                    wnames.append(self._part_name(pl.name, pl.hdr.version, p))
                    wlens.append(pl.hdr.part_len(p))
                users[ident].append(pl)
            if pl.nbytes:
                pl.filler = Filler(pl.dest)
        async def fetch(batch: list[int]) -> tuple[list[_Value | int], list[_Region]]:
            if all(pl.status != "ok" for b in batch for pl in users[want[b]]):
                return [], []
            return await self._fetch([wnames[b] for b in batch], [wlens[b] for b in batch], deadline, exact=True)

        async def apply(batch: list[int], fetched: tuple[list[_Value | int], list[_Region]]) -> None:
            vals, regions = fetched
            try:
                if vals:
                    items = [(want[b], vals[j], users[want[b]]) for j, b in enumerate(batch)]
                    await self._cpu(sum(wlens[b] for b in batch), self._apply_parts, items)
            finally:
                for rg in regions:
                    self._release(rg)

        def discard(fetched: tuple[list[_Value | int], list[_Region]]) -> None:
            for rg in fetched[1]:
                self._release(rg)

        await self._pipeline(list(self._batches(wlens, self._chunk)), fetch, apply, discard)
        done = [pl for pl in plans if pl.status == "ok" and pl.filler is not None]
        if done:
            await self._cpu(sum(pl.nbytes for pl in done), self._finish_fillers, done)

    def _apply_parts(self, items: list[tuple[tuple[bytes, int, int], _Value | int, list[_Plan]]]) -> None:
        """Verify fetched parts and copy the ranges that need them. Pure CPU work."""
        for (key, _version, p), v, plans in items:
            live = [pl for pl in plans if pl.status == "ok"]
            if not live:
                continue
            hdr = live[0].hdr
            if isinstance(v, int):
                st = self._code_status(v, "missing_parts")
                for pl in live:
                    pl.status = st
                continue
            if xxhash.xxh3_64_intdigest(v.mv, part_seed(key, p)) != hdr.sums[p]:
                for pl in live:
                    pl.status = "corrupt"
                continue
            p0 = p * hdr.part_size
            for pl in live:
                lo, hi = pl.offset, pl.offset + pl.nbytes
                a, b = max(lo, p0), min(hi, p0 + hdr.part_len(p))
                assert pl.filler is not None
                pl.filler.put(a - lo, v.addr + (a - p0), b - a)

    @staticmethod
    def _finish_fillers(plans: list[_Plan]) -> None:
        for pl in plans:
            assert pl.filler is not None
            pl.filler.finish()
            pl.filler = None

    # --- membership --------------------------------------------------------------------------------------
    async def contains(self, key: bytes) -> bool:
        return (await self.contains_many([key]))[0]

    async def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        self._check_open()
        if not keys:
            return []
        names = [self._name(k) for k in keys]
        if not self._available():
            self.counters["unavailable"] += 1
            return [False] * len(keys)
        try:
            res = await self._call(
                asyncio.get_running_loop().time() + self.timeout, self._store.batch_is_exist, names
            )
            codes = [int(x) for x in res]
            for c in codes:
                self._check_code(c, "looking keys up")
        except (TimeoutError, _TierDown, _ClientError) as exc:
            self._failed(exc)
            return [False] * len(keys)
        if any(c < 0 for c in codes):
            self.counters["errors"] += 1
        return [c == 1 for c in codes]

    async def keys(self) -> AsyncIterator[bytes]:
        """Every object under this prefix, from the master's admin server (``/get_all_keys``)."""
        self._check_open()
        url = f"http://{self.admin}/get_all_keys"

        def fetch() -> bytes:
            with urllib.request.urlopen(url, timeout=self.timeout) as resp:
                data: bytes = resp.read()
                return data

        try:
            body = await asyncio.wait_for(asyncio.to_thread(fetch), self._deadline(0) + self.timeout)
        except (TimeoutError, OSError, urllib.error.URLError) as exc:
            raise self._backend_error(exc, f"listing keys from the admin server {self.admin}") from exc
        n = len(self.prefix)
        seen: set[bytes] = set()
        for line in body.decode("utf-8", "replace").splitlines():
            nm = line.strip()
            if len(nm) != n + 2 * _KEY_LEN or not nm.startswith(self.prefix):
                continue
            try:
                k = bytes.fromhex(nm[n:])
            except ValueError:
                continue
            if k not in seen:
                seen.add(k)
                yield k

    # --- writes ------------------------------------------------------------------------------------------
    @staticmethod
    def _flatten(src: torch.Tensor) -> torch.Tensor:
        t = src.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        return t.resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)

    def _flatten_all(self, items: Sequence[tuple[bytes, torch.Tensor]]) -> list[torch.Tensor]:
        return [self._flatten(s) for _, s in items]

    async def write(self, key: bytes, src: torch.Tensor) -> None:
        await self.write_many([(key, src)])

    async def write_many(self, items: Sequence[tuple[bytes, torch.Tensor]]) -> None:
        self._check_open()
        if not items:
            return
        names = [self._name(k) for k, _ in items]
        for _, s in items:
            if nbytes_of(s) == 0:
                raise ValueError("cannot store an empty object")
        total = sum(nbytes_of(s) for _, s in items)
        if not self._available():
            self.counters["unavailable"] += 1
            self.counters["write_errors"] += 1
            raise BackendError(
                errno_mod.EAGAIN, f"the mooncake tier {self.address} failed recently; retrying in under "
                f"{self.retry_after:.1f} s"
            )
        flats = await self._cpu(total, self._flatten_all, items)
        objs = [_Item(k, nm, f, self.part_size) for (k, _), nm, f in zip(items, names, flats)]
        deadline = asyncio.get_running_loop().time() + self._deadline(total)
        written_parts: list[str] = []
        # what each write replaces (to remove its parts later), read while the parts go out; it must be read
        # before the new header is
        olds_task = asyncio.ensure_future(self._fixed_headers(names, deadline))
        try:
            # 1. the parts of multi-part objects, under fresh names
            units = [(o, p) for o in objs if not o.inline for p in range(o.nparts)]
            lens = [min(self.part_size, o.nbytes - p * self.part_size) for o, p in units]
            batches = [[units[b] for b in batch] for batch in self._batches(lens, self._chunk)]
            for sub in batches:
                written_parts.extend(self._part_name(o.name, o.version, p) for o, p in sub)
            await self._pipeline(
                batches,
                lambda sub: self._prepare_parts(sub, deadline),
                lambda sub, prep: self._send(prep, deadline, "put"),
                self._discard_prepared,
            )
            olds = await olds_task
            # 2. the headers, and the inline objects, replacing what was there (once one may be written, the
            # parts are no longer ours to remove on failure)
            written_parts = []
            hlens = [hdr_len(o.nparts) + (o.nbytes if o.inline else 0) for o in objs]
            await self._pipeline(
                [[objs[b] for b in batch] for batch in self._batches(hlens, self._chunk)],
                lambda sub: self._prepare_headers(sub, deadline),
                lambda sub, prep: self._send(prep, deadline, "upsert"),
                self._discard_prepared,
            )
        except (TimeoutError, _TierDown, _ClientError, _BufferBusy) as exc:
            if not isinstance(exc, (_ClientError, _BufferBusy)):
                self._failed(exc)
            else:
                self.counters["errors"] += 1
            self.counters["write_errors"] += 1
            if written_parts:
                self._schedule_removal(written_parts, 0.0)
            raise self._backend_error(exc, f"writing {len(items)} object(s)") from exc
        finally:
            if not olds_task.done():
                olds_task.cancel()
                await asyncio.wait({olds_task})
            if not olds_task.cancelled():
                olds_task.exception()
        self.counters["writes"] += len(objs)
        self.counters["bytes_written"] += total
        replaced: list[str] = []
        for o, old in zip(objs, olds):
            if isinstance(old, int):
                continue
            _ps, n, _len, version, inline = old
            if not inline and version != o.version:
                replaced.extend(self._part_name(o.name, version, p) for p in range(n))
        if replaced:
            self._schedule_removal(replaced, self.grace)

    def _copy_parts(self, sub: list[tuple[_Item, int]], region: _Region | None, offs: list[int]) -> list[Any]:
        """Checksum each part (and copy it into the transfer buffer when there is one); return the values the
        plain calls take otherwise. Pure CPU work."""
        ps = self.part_size
        vals: list[Any] = []
        for (o, p), off in zip(sub, offs):
            src = o.flat[p * ps : min(o.nbytes, (p + 1) * ps)]
            if region is not None:
                assert self._arena is not None
                dst = self._arena[region.start + off : region.start + off + src.numel()]
                dst.copy_(src)
                mv = self._view(region, off, src.numel()).mv
            else:
                mv = src.numpy().data.cast("B")
                vals.append(mv)
            o.sums[p] = xxhash.xxh3_64_intdigest(mv, part_seed(o.key, p))
        return vals

    async def _prepare_parts(self, sub: list[tuple[_Item, int]], deadline: float) -> _Prepared:
        """Checksum a batch of parts (copied into the transfer buffer for zero-copy)."""
        lens = [min(self.part_size, o.nbytes - p * self.part_size) for o, p in sub]
        names = [self._part_name(o.name, o.version, p) for o, p in sub]
        offs = list(itertools.accumulate((_round(n) for n in lens), initial=0))
        if not self.zero_copy:
            vals = await self._cpu(sum(lens), self._copy_parts, sub, None, offs)
            return _Prepared(names, lens, None, offs, vals)
        region = await self._acquire(offs[-1], deadline)
        try:
            await self._cpu(sum(lens), self._copy_parts, sub, region, offs)
        except BaseException:
            self._release(region)
            raise
        return _Prepared(names, lens, region, offs, [])

    async def _prepare_headers(self, objs: list[_Item], deadline: float) -> _Prepared:
        """Build a batch of header values (inline objects with their data)."""
        lens = [hdr_len(o.nparts) + (o.nbytes if o.inline else 0) for o in objs]
        names = [o.name for o in objs]
        offs = list(itertools.accumulate((_round(n) for n in lens), initial=0))
        work = sum(o.nbytes for o in objs if o.inline)
        if not self.zero_copy:
            vals = await self._cpu(work, self._build_headers, objs, None, offs)
            return _Prepared(names, lens, None, offs, vals)
        region = await self._acquire(offs[-1], deadline)
        try:
            await self._cpu(work, self._build_headers, objs, region, offs)
        except BaseException:
            self._release(region)
            raise
        return _Prepared(names, lens, region, offs, [])

    def _discard_prepared(self, prep: _Prepared) -> None:
        self._release(prep.region)

    async def _send(self, prep: _Prepared, deadline: float, how: str) -> None:
        """Write a prepared batch: ``put`` (fresh names) or ``upsert`` (replacing)."""
        what = "writing parts" if how == "put" else "writing headers"
        try:
            if prep.region is None:
                fn = self._store.put_batch if how == "put" else self._store.upsert_batch
                rc = int(await self._call(deadline, fn, prep.names, prep.vals, self._config))
                self._check_write([rc], what)
                return
            fn = self._store.batch_put_from if how == "put" else self._store.batch_upsert_from
            codes = await self._call(
                deadline, fn, prep.names, [prep.region.ptr + o for o in prep.offs[:-1]], prep.lens, self._config,
                region=prep.region,
            )
            self._check_write([int(c) for c in codes], what)
        finally:
            self._release(prep.region)

    def _build_headers(self, objs: list[_Item], region: _Region | None, offs: list[int]) -> list[Any]:
        """Header values (an inline object's data copied after its header and checksummed there); written
        into the transfer buffer when there is one, else returned as bytes. Pure CPU work."""
        vals: list[Any] = []
        for o, off in zip(objs, offs):
            if o.inline:
                if region is not None:
                    assert self._arena is not None
                    a = region.start + off + _INLINE_OFF
                    self._arena[a : a + o.nbytes].copy_(o.flat)
                    o.sums[0] = xxhash.xxh3_64_intdigest(self._view(region, off + _INLINE_OFF, o.nbytes).mv,
                                                         part_seed(o.key, 0))
                else:
                    data = o.flat.numpy().data.cast("B")
                    o.sums[0] = xxhash.xxh3_64_intdigest(data, part_seed(o.key, 0))
            hdr = _WIRE.pack_header(o.key, o.nbytes, self.part_size, o.version, o.sums, o.inline)
            if region is not None:
                ctypes.memmove(region.ptr + off, hdr, len(hdr))
            else:
                vals.append(hdr + o.flat.numpy().tobytes() if o.inline else hdr)
        return vals

    def _check_write(self, codes: list[int], what: str) -> None:
        for c in codes:
            self._check_code(c, what)
        bad = [c for c in codes if c != 0]
        if bad:
            raise _ClientError(f"{what}: Mooncake refused {len(bad)} value(s) (code {bad[0]})")

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
        if self._store is None or not self._available():
            self.counters["cleanup_errors"] += 1
            return
        try:
            codes = await self._remove(names)
        except (TimeoutError, _ClientError):
            self.counters["cleanup_errors"] += 1
            return
        if any(c != 0 and c not in _ABSENT_CODES for c in codes):
            self.counters["cleanup_errors"] += 1

    async def delete(self, key: bytes) -> bool:
        self._check_open()
        name = self._name(key)
        if not self._available():
            self.counters["unavailable"] += 1
            raise BackendError(errno_mod.EAGAIN, f"the mooncake tier {self.address} failed recently")
        try:
            deadline = asyncio.get_running_loop().time() + self.timeout
            old = (await self._fixed_headers([name], deadline))[0]
            names = [name]
            if not isinstance(old, int) and not old[4]:
                names += [self._part_name(name, old[3], p) for p in range(old[1])]
            codes = await self._remove(names)
            self._check_code(codes[0], "deleting an object")
        except (TimeoutError, _TierDown, _ClientError, _BufferBusy) as exc:
            self._failed(exc)
            raise self._backend_error(exc, "deleting an object") from exc
        if codes[0] != 0 and codes[0] not in _ABSENT_CODES:
            raise BackendError(errno_mod.EIO, f"deleting an object on {self.address}: Mooncake error {codes[0]}")
        return codes[0] == 0

    # --- observability -----------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return {
            **super().stats(),
            "address": self.address,
            "metadata": self.metadata,
            "protocol": self.protocol,
            "prefix": self.prefix,
            "part_size": self.part_size,
            "timeout": self.timeout,
            "zero_copy": self.zero_copy,
            "buffer": self.buffer,
            "buffer_free": self._alloc.free_bytes if self._alloc is not None else 0,
            "segment": self.segment,
            "available": self._available(),
            **self.counters,
        }

    def __repr__(self) -> str:
        return f"<MooncakeBackend mooncake://{self.address} {'open' if self.is_open else 'closed'}>"
