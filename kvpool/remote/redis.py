"""``redis://HOST:PORT/DB`` -- a remote tier on Redis or Valkey, shared by every pool that points at it.

Spec strings::

    redis://127.0.0.1:6379/0                   one server (or a proxy)
    rediss://user:pass@cache.internal:6380/0   TLS
    valkey://127.0.0.1:6379/0                  the same protocol, spelled for Valkey
    redis+cluster://10.0.0.1:7000              Redis Cluster (any one node; the rest are discovered)

Options (``?name=value``): ``timeout`` (seconds, default 2.0), ``part_size`` (default 4MiB), ``prefix``
(default ``kvpool:``), ``ttl`` (seconds, default none), ``retry_after`` (seconds the tier is skipped after
the server failed to answer, default 1.0), ``max_connections`` (default 64).

Server set-up. The tier has no capacity of its own: the server's ``maxmemory`` bounds it, and the server
should run with ``maxmemory-policy allkeys-lru`` (or ``allkeys-lfu``) so that it evicts instead of refusing
writes. An object (or any part of one) evicted underneath us is a miss, never data. ``ttl`` adds an expiry to
every key on top of that.

Object format. An object ``key`` (16 bytes) lives under the header key ``PREFIX{HEX}``: ``HEX`` is the key in
hex, and the braces make it the cluster hash tag, so every key of one object is in one hash slot. The header
holds a magic, the object's length, its part size, its number of parts, a random 64-bit version id, the key
itself (a value found under the wrong name is detected) and one xxh3-64 checksum per part, seeded with the key
and the part's index; the header has a checksum of its own. An object of at most ``part_size`` bytes is stored
inline after its header: one key, one ``GET``. A larger one is split into parts stored under
``PREFIX{HEX}:VERSION:INDEX``, so no read moves one huge value, and a range read fetches only the parts that
cover the range (whole, since checksums cover whole parts) in one pipeline after the header.

Atomicity. A write sends the parts under a fresh version id, then the header, in one ``MULTI/EXEC`` (one per
``write_many`` batch on a single server; one per object in cluster mode, where a transaction may not span hash
slots), so a reader finds the old header with the old parts or the new header with the new parts -- never a
mix, as parts are never modified in place. The parts of the version a write replaced are not deleted at once
but given an expiry of ``max(5 s, 4 * timeout)``, so a reader that fetched the old header an instant before
still finds them. Parts left without a header (a client that died between those two steps, a header evicted
alone) are never read again, so ``allkeys-lru`` reclaims them first.

Faults. Every call is bounded by ``timeout`` (plus one second per 256 MiB moved, so a large batch is not cut
off by a slow link). On the read side (``read_into``, ``read_many``, ``contains``, ``contains_many``,
``object_size``) a missing, evicted, torn or corrupt object, a timeout, a refused connection or a paused
server is a miss (``False``), counted in :meth:`RedisBackend.stats`, never an exception. After a timeout or a
connection error the tier is skipped for ``retry_after`` seconds (reads miss at once, writes raise), so a dead
server costs the serving path one timeout, not one per call. Writes, deletes and :meth:`RedisBackend.keys`
raise :class:`~kvpool.BackendError`; so does :meth:`RedisBackend.open` when the server cannot be reached.

Lookups. ``contains_many`` on a single server is one small Lua script (one reply for all keys: about 4x
cheaper for redis-py than a pipeline of ``EXISTS``); a pipeline in cluster mode or where scripts are refused.
"""

from __future__ import annotations

import asyncio
import errno as errno_mod
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import torch
import xxhash

from ..storage.buffers import OFFLOAD_BYTES
from ..errors import BackendError, ConfigError
from .format import FIXED, Filler, Header, RemoteFormat, bytes_address, part_seed, seconds
from ..storage.backend import Backend, Capabilities, ReadRequest, nbytes_of

if TYPE_CHECKING:
    from typing import Self

    from ..config import BackendSpec

try:
    import redis.asyncio as _aredis
    from redis.asyncio.cluster import RedisCluster as _RedisCluster
    from redis.asyncio.retry import Retry as _Retry
    from redis.backoff import NoBackoff as _NoBackoff
    from redis.exceptions import ConnectionError as _RConnectionError
    from redis.exceptions import RedisClusterException as _RClusterException
    from redis.exceptions import RedisError as _RedisError
    from redis.exceptions import ResponseError as _RResponseError
    from redis.exceptions import TimeoutError as _RTimeoutError
except ImportError as _exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("the redis:// backend needs redis-py: pip install 'kvpool[redis]'") from _exc

__all__ = ["RedisBackend"]

log = logging.getLogger("kvpool.redis")

KiB = 1 << 10
MiB = 1 << 20
_DEFAULT_PART = 4 * MiB
_MIN_PART = 4 * KiB
_MAX_PART = 256 * MiB
_KEY_LEN = 16

# magic and header checksum salt of this tier's objects
_WIRE = RemoteFormat(b"KVR1", 0x6B76706F6F6C6872)  # salt: "kvpoolhr"

# Verification and copies of at least this many bytes run in a worker thread (xxhash and memmove release the
# GIL), so the event loop keeps serving other requests meanwhile.
# Deadline allowance for bulk transfers: timeout + bytes / this.
_SLOW_BPS = 256 * MiB
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (_RConnectionError, _RTimeoutError, OSError)
# Membership of many keys in one command: ~4x cheaper for redis-py to send and parse than a pipeline of EXISTS
# (one reply instead of one per key). Single node only (a cluster script may not span hash slots); a server
# that refuses scripts gets the pipeline.
_EXISTS_LUA = "local r = {} for i, k in ipairs(KEYS) do r[i] = redis.call('EXISTS', k) end return r"


# --- pure helpers -----------------------------------------------------------------------------------------
class _Plan:
    """One range read whose header was found: what to verify and copy once the parts are here."""

    __slots__ = ("index", "key", "hdr", "value", "offset", "nbytes", "dest", "parts")

    def __init__(
        self, index: int, key: bytes, hdr: Header, value: bytes, offset: int, nbytes: int, dest: torch.Tensor
    ) -> None:
        self.index = index
        self.key = key
        self.hdr = hdr
        self.value = value  # the header value (holds the data of an inline object)
        self.offset = offset
        self.nbytes = nbytes
        self.dest = dest
        self.parts: list[int] = (
            list(range(offset // hdr.part_size, (offset + nbytes - 1) // hdr.part_size + 1)) if nbytes else []
        )


class _Encoded:
    __slots__ = ("key", "name", "version", "header", "parts", "nbytes", "keep")

    def __init__(
        self, key: bytes, name: str, version: int, header: bytes, parts: list[memoryview], nbytes: int,
        keep: Any,
    ) -> None:
        self.key = key
        self.name = name
        self.version = version
        self.header = header  # header value (with the data when inline)
        self.parts = parts  # empty when inline
        self.nbytes = nbytes
        self.keep = keep  # the CPU tensor the part views point into


def _escape_glob(s: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in s)


# --- the backend ------------------------------------------------------------------------------------------
class RedisBackend(Backend):
    """Remote tier on a Redis or Valkey server (or a Redis Cluster) through redis-py's asyncio client.

    Parameters
    ----------
    url
        ``redis://[user:pass@]host:port/db`` or ``rediss://...`` (TLS).
    cluster
        Treat ``url`` as one node of a Redis Cluster.
    timeout
        Seconds every call may take (plus one second per 256 MiB moved).
    part_size
        Objects larger than this are split into parts of this size (the checksum and fetch granule).
    prefix
        Prefix of every key this backend writes (no braces: the key's hex is the cluster hash tag).
    ttl
        Expiry in seconds of every stored object; ``None`` (default) leaves eviction to the server.
    retry_after
        After a timeout or a connection error, the tier is skipped this long (reads miss, writes raise).
    max_connections
        Size of the connection pool (per node in cluster mode).
    """

    scheme = "redis"
    capabilities = Capabilities(persistent=False, remote=True, partial_reads=True)

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        cluster: bool = False,
        timeout: float = 2.0,
        part_size: int = _DEFAULT_PART,
        prefix: str = "kvpool:",
        ttl: float | None = None,
        retry_after: float = 1.0,
        max_connections: int = 64,
    ) -> None:
        super().__init__()
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss") or not parts.hostname:
            raise ConfigError(f"{url!r} is not a redis://host:port/db or rediss://host:port/db URL")
        try:
            port = parts.port or 6379
        except ValueError:
            raise ConfigError(f"{url!r}: bad port") from None
        db = parts.path.strip("/") or "0"
        if not db.isdigit():
            raise ConfigError(f"{url!r}: the database must be a number, got {db!r}")
        if cluster and db != "0":
            raise ConfigError(f"{url!r}: Redis Cluster has only database 0")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if not (isinstance(part_size, int) and _MIN_PART <= part_size <= _MAX_PART):
            raise ConfigError(f"part_size must be in [{_MIN_PART}, {_MAX_PART}] bytes, got {part_size!r}")
        if not isinstance(prefix, str) or "{" in prefix or "}" in prefix:
            raise ConfigError(f"prefix must be a str without braces (the key is the hash tag): {prefix!r}")
        if ttl is not None and not (isinstance(ttl, (int, float)) and ttl > 0):
            raise ConfigError(f"ttl must be a positive number of seconds or None, got {ttl!r}")
        if not (isinstance(retry_after, (int, float)) and retry_after >= 0):
            raise ConfigError(f"retry_after must be >= 0 seconds, got {retry_after!r}")
        if not (isinstance(max_connections, int) and max_connections >= 1):
            raise ConfigError(f"max_connections must be a positive integer, got {max_connections!r}")
        self.url = url
        self.cluster = cluster
        self.tls = parts.scheme == "rediss"
        self.address = f"{parts.hostname}:{port}" + ("" if cluster else f"/{db}")
        self.timeout = float(timeout)
        self.part_size = part_size
        self.prefix = prefix
        self.ttl = ttl
        self.retry_after = float(retry_after)
        self.max_connections = max_connections
        self._ttl_ms = int(ttl * 1000) if ttl is not None else None
        # old parts outlive the header that replaced them by this much (see the module docstring)
        self._grace_ms = int(1000 * max(5.0, 4 * self.timeout))
        self._client: Any = None
        self._pool: Any = None
        self._cluster_tx = True
        self._exists_script: Any = None
        self._down_until = 0.0
        self.counters: dict[str, int] = {
            "hits": 0,
            "misses": 0,  # every read that returned False, whatever the reason below
            "absent": 0,  # no header: never written, deleted, expired or evicted
            "missing_parts": 0,  # header found but a part is gone (evicted or expired underneath)
            "corrupt": 0,  # a header or part failed verification
            "timeouts": 0,
            "errors": 0,  # connection refused/reset, server errors
            "unavailable": 0,  # calls answered at once while the tier is skipped after a failure
            "bytes_read": 0,
            "bytes_written": 0,
            "writes": 0,
            "write_errors": 0,
            "cleanup_errors": 0,
        }

    @classmethod
    def from_spec(cls, spec: BackendSpec) -> Self:
        spec.check_known(("timeout", "part_size", "prefix", "ttl", "retry_after", "max_connections"))
        scheme = spec.scheme
        cluster = scheme == "redis+cluster"
        if scheme not in ("redis", "rediss", "valkey", "redis+cluster"):
            raise ConfigError(f"{spec.text}: the redis backend does not serve {scheme}://")
        loc = spec.location or "127.0.0.1:6379"
        if loc.startswith("/"):
            loc = "127.0.0.1:6379" + loc
        url = f"{'rediss' if scheme == 'rediss' else 'redis'}://{loc}"
        try:
            return cls(
                url,
                cluster=cluster,
                timeout=seconds(spec, "timeout", 2.0) or 2.0,
                part_size=spec.size("part_size", _DEFAULT_PART) or _DEFAULT_PART,
                prefix=spec.params.get("prefix", "kvpool:"),
                ttl=seconds(spec, "ttl", None),
                retry_after=seconds(spec, "retry_after", 1.0, zero=True) or 0.0,
                max_connections=spec.integer("max_connections", 64),
            )
        except ConfigError as exc:
            if spec.text and spec.text not in str(exc):
                raise ConfigError(f"{spec.text}: {exc}") from None
            raise

    # --- lifecycle ---------------------------------------------------------------------------------------
    async def _open(self) -> None:
        common: dict[str, Any] = {"socket_connect_timeout": self.timeout, "socket_timeout": None}
        try:
            if self.cluster:
                self._client = _RedisCluster.from_url(
                    self.url, max_connections=self.max_connections, **common
                )
            else:
                self._pool = _aredis.BlockingConnectionPool.from_url(
                    self.url,
                    max_connections=self.max_connections,
                    timeout=self.timeout,
                    retry=_Retry(_NoBackoff(), 1),
                    **common,
                )
                self._client = _aredis.Redis(connection_pool=self._pool)
                self._exists_script = self._client.register_script(_EXISTS_LUA)
            async with asyncio.timeout(self.timeout):
                if self.cluster:
                    await self._client.initialize()
                await self._client.ping()
        except BaseException as exc:
            await self._teardown()
            if isinstance(exc, (TimeoutError, _RedisError, OSError)):
                raise BackendError(
                    errno_mod.ECONNREFUSED if not isinstance(exc, TimeoutError) else errno_mod.ETIMEDOUT,
                    f"cannot reach the redis server at {self.address}: {exc or type(exc).__name__}",
                ) from exc
            raise
        self._down_until = 0.0

    async def _close(self) -> None:
        await self._teardown()

    async def _teardown(self) -> None:
        client, pool = self._client, self._pool
        self._client = self._pool = self._exists_script = None
        for obj in (client, pool):
            if obj is None:
                continue
            closer = getattr(obj, "aclose", None) or getattr(obj, "disconnect", None) or obj.close
            try:
                await closer()
            except Exception:  # closing a dead connection must not fail close()
                pass

    # --- names -------------------------------------------------------------------------------------------
    def _name(self, key: bytes) -> str:
        if not isinstance(key, bytes) or len(key) != _KEY_LEN:
            raise ValueError(f"keys are {_KEY_LEN} bytes, got {key!r}")
        return f"{self.prefix}{{{key.hex()}}}"

    @staticmethod
    def _part_name(name: str, version: int, part: int) -> str:
        return f"{name}:{version:016x}:{part}"

    # --- failure accounting ------------------------------------------------------------------------------
    def _available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _deadline(self, nbytes: int) -> float:
        return self.timeout + nbytes / _SLOW_BPS

    def _failed(self, exc: BaseException) -> None:
        """Count a failed server call; a timeout or connection fault skips the tier for ``retry_after``."""
        if isinstance(exc, TimeoutError):
            self.counters["timeouts"] += 1
        else:
            self.counters["errors"] += 1
        if isinstance(exc, (TimeoutError, *_CONNECTION_ERRORS)):
            if self._available():
                log.warning(
                    "redis tier %s failed (%s: %s); skipping it for %.1f s",
                    self.address, type(exc).__name__, exc, self.retry_after,
                )
            self._down_until = time.monotonic() + self.retry_after

    def _backend_error(self, exc: BaseException, what: str) -> BackendError:
        if isinstance(exc, TimeoutError):
            return BackendError(errno_mod.ETIMEDOUT, f"{what}: no answer from {self.address} in time")
        err = getattr(exc, "errno", None) or errno_mod.EIO
        return BackendError(err, f"{what} on {self.address}: {type(exc).__name__}: {exc}")

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
            async with asyncio.timeout(self.timeout):
                raw = await self._client.getrange(name, 0, FIXED.size - 1)
        except (TimeoutError, _RedisError, OSError) as exc:
            self._failed(exc)
            return None
        fixed = _WIRE.parse_fixed(raw, key) if raw else None
        return fixed[2] if fixed else None

    # --- reads -------------------------------------------------------------------------------------------
    async def read_into(self, key: bytes, dest: torch.Tensor, offset: int = 0) -> bool:
        return (await self._read([ReadRequest(key, dest, offset)]))[0]

    async def read_many(self, requests: Sequence[ReadRequest]) -> list[bool]:
        if not requests:
            return []
        return await self._read(requests)

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
        plans: list[_Plan] = []
        fetched: dict[tuple[bytes, int, int], bytes] = {}
        t0 = asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(self._deadline(sum(sizes))) as cm:
                # round trip 1: the headers (small objects come with their data)
                uniq = list(dict.fromkeys(names))
                if len(uniq) == 1:
                    values = [await self._client.get(uniq[0])]
                else:
                    pipe = self._client.pipeline(transaction=False)
                    for nm in uniq:
                        pipe.get(nm)
                    values = await pipe.execute()
                by_name = dict(zip(uniq, values))
                hdrs: dict[str, Header | None] = {}
                for i, r in enumerate(reqs):
                    value = by_name[names[i]]
                    if value is None:
                        self.counters["absent"] += 1
                        continue
                    if names[i] not in hdrs:
                        hdrs[names[i]] = _WIRE.parse_header(value, r.key)
                    hdr = hdrs[names[i]]
                    if hdr is None:
                        self.counters["corrupt"] += 1
                        continue
                    if r.offset + sizes[i] > hdr.length:
                        raise ValueError(
                            f"range [{r.offset}, {r.offset + sizes[i]}) is outside an object of "
                            f"{hdr.length} bytes"
                        )
                    plans.append(_Plan(i, r.key, hdr, value, r.offset, sizes[i], r.dest))
                # round trip 2: the parts covering the ranges of multi-part objects
                want: list[tuple[bytes, int, int]] = []
                seen: set[tuple[bytes, int, int]] = set()
                wnames: list[str] = []
                wbytes = 0
                for pl in plans:
                    if pl.hdr.inline:
                        continue
                    for p in pl.parts:
                        ident = (pl.key, pl.hdr.version, p)
                        if ident not in seen:
                            seen.add(ident)
                            want.append(ident)
                            wnames.append(self._part_name(names[pl.index], pl.hdr.version, p))
                            wbytes += pl.hdr.part_len(p)
                if want:
                    # the deadline now knows how many bytes are coming
                    cm.reschedule(t0 + self._deadline(wbytes))
                    pipe = self._client.pipeline(transaction=False)
                    for nm in wnames:
                        pipe.get(nm)
                    got = await pipe.execute()
                    fetched = {ident: v for ident, v in zip(want, got) if v is not None}
        except ValueError:
            raise
        except (TimeoutError, _RedisError, OSError) as exc:
            self._failed(exc)
            self.counters["misses"] += len(reqs)
            return out

        # verification and copies: no server involved, so outside the deadline (a worker thread must never be
        # left writing into a destination after we returned)
        work = sum(pl.nbytes for pl in plans) + sum(len(v) for v in fetched.values())
        if work >= OFFLOAD_BYTES:
            status = await asyncio.to_thread(self._finish, plans, fetched)
        else:
            status = self._finish(plans, fetched)
        for pl, st in zip(plans, status):
            if st == "ok":
                out[pl.index] = True
            else:
                self.counters[st] += 1
        hits = sum(out)
        self.counters["hits"] += hits
        self.counters["misses"] += len(reqs) - hits
        self.counters["bytes_read"] += sum(s for s, ok in zip(sizes, out) if ok)
        return out

    @staticmethod
    def _finish(plans: list[_Plan], fetched: dict[tuple[bytes, int, int], bytes]) -> list[str]:
        """Verify what each plan needs and copy its range into its destination: 'ok', 'corrupt' or
        'missing_parts' per plan. Pure CPU work (xxhash and memmove release the GIL)."""
        verified: dict[tuple[bytes, int, int], bool] = {}
        status: list[str] = []
        for pl in plans:
            hdr = pl.hdr
            srcs: list[tuple[int, int]] = []  # (part, address of its first byte)
            st = "ok"
            for p in pl.parts:
                ident = (pl.key, hdr.version, p)
                if hdr.inline:
                    data: bytes | memoryview = memoryview(pl.value)[hdr.data_off :]
                    base = bytes_address(pl.value) + hdr.data_off
                else:
                    part = fetched.get(ident)
                    if part is None:
                        st = "missing_parts"
                        break
                    data, base = part, bytes_address(part)
                ok = verified.get(ident)
                if ok is None:
                    ok = len(data) == hdr.part_len(p) and xxhash.xxh3_64_intdigest(
                        data, part_seed(pl.key, p)
                    ) == hdr.sums[p]
                    verified[ident] = ok
                if not ok:
                    st = "corrupt"
                    break
                srcs.append((p, base))
            if st == "ok" and pl.nbytes:
                filler = Filler(pl.dest)
                lo, hi = pl.offset, pl.offset + pl.nbytes
                for p, base in srcs:
                    p0 = p * hdr.part_size
                    a, b = max(lo, p0), min(hi, p0 + hdr.part_len(p))
                    filler.put(a - lo, base + (a - p0), b - a)
                filler.finish()
            status.append(st)
        return status

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
            async with asyncio.timeout(self.timeout):
                res: list[Any] | None = None
                if len(names) == 1:
                    res = [await self._client.exists(names[0])]
                elif self._exists_script is not None and len(names) >= 8:
                    try:
                        res = list(await self._exists_script(keys=names))
                    except _RResponseError as exc:  # scripting disabled or refused: use the pipeline
                        log.info("redis tier %s: no scripting (%s); lookups pipeline", self.address, exc)
                        self._exists_script = None
                if res is None:
                    pipe = self._client.pipeline(transaction=False)
                    for nm in names:
                        pipe.exists(nm)
                    res = await pipe.execute()
        except (TimeoutError, _RedisError, OSError) as exc:
            self._failed(exc)
            return [False] * len(keys)
        return [bool(x) for x in res]

    async def keys(self) -> AsyncIterator[bytes]:
        self._check_open()
        pattern = _escape_glob(self.prefix) + "{" + "?" * (2 * _KEY_LEN) + "}"
        start = len(self.prefix) + 1
        it = self._client.scan_iter(match=pattern, count=1000)
        seen: set[bytes] = set()
        try:
            while True:
                try:
                    async with asyncio.timeout(self.timeout):
                        name = await anext(it)
                except StopAsyncIteration:
                    return
                except (TimeoutError, _RedisError, OSError) as exc:
                    self._failed(exc)
                    raise self._backend_error(exc, "listing keys") from exc
                raw = name.decode() if isinstance(name, bytes) else str(name)
                try:
                    k = bytes.fromhex(raw[start : start + 2 * _KEY_LEN])
                except ValueError:
                    continue
                if len(k) == _KEY_LEN and k not in seen:
                    seen.add(k)
                    yield k
        finally:
            try:
                await it.aclose()
            except Exception:
                pass

    # --- writes ------------------------------------------------------------------------------------------
    def _encode(self, key: bytes, src: torch.Tensor) -> _Encoded:
        name = self._name(key)
        n = nbytes_of(src)
        if n == 0:
            raise ValueError("cannot store an empty object")
        t = src.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)
        mv = t.numpy().data
        ps = self.part_size
        nparts = -(-n // ps)
        views = [mv[p * ps : min(n, (p + 1) * ps)] for p in range(nparts)]
        sums = [xxhash.xxh3_64_intdigest(v, part_seed(key, p)) for p, v in enumerate(views)]
        version = int.from_bytes(os.urandom(8), "little")
        inline = nparts == 1
        header = _WIRE.pack_header(key, n, ps, version, sums, inline)
        if inline:
            return _Encoded(key, name, version, header + views[0], [], n, None)
        return _Encoded(key, name, version, header, views, n, t)

    def _encode_all(self, items: Sequence[tuple[bytes, torch.Tensor]]) -> list[_Encoded]:
        return [self._encode(k, s) for k, s in items]

    def _queue_write(self, pipe: Any, e: _Encoded) -> int:
        """Queue one object's write on ``pipe``; return the number of replies it adds (the first is the old
        header's fixed part)."""
        pipe.getrange(e.name, 0, FIXED.size - 1)
        for p, v in enumerate(e.parts):
            pipe.set(self._part_name(e.name, e.version, p), v, px=self._ttl_ms)
        pipe.set(e.name, e.header, px=self._ttl_ms)
        return len(e.parts) + 2

    def _tx_pipeline(self) -> Any:
        """A MULTI/EXEC pipeline (one hash slot in cluster mode). An older redis-py without cluster
        transactions gets a plain pipeline: each node still runs one object's commands in order, parts before
        header, so readers see old or new all the same; only a failure midway may leave orphan parts."""
        if self._cluster_tx:
            try:
                return self._client.pipeline(transaction=True)
            except _RClusterException:
                self._cluster_tx = False
        return self._client.pipeline(transaction=False)

    async def _transact(self, batch: Sequence[_Encoded]) -> list[bytes]:
        """Write ``batch`` in one transaction; return the old fixed headers."""
        pipe = self._tx_pipeline()
        counts = [self._queue_write(pipe, e) for e in batch]
        res = await pipe.execute()
        olds, pos = [], 0
        for c in counts:
            olds.append(res[pos])
            pos += c
        return olds

    async def write(self, key: bytes, src: torch.Tensor) -> None:
        await self.write_many([(key, src)])

    async def write_many(self, items: Sequence[tuple[bytes, torch.Tensor]]) -> None:
        self._check_open()
        if not items:
            return
        total = sum(nbytes_of(s) for _, s in items)
        if total >= OFFLOAD_BYTES:
            enc = await asyncio.to_thread(self._encode_all, items)
        else:
            enc = self._encode_all(items)
        if not self._available():
            self.counters["unavailable"] += 1
            self.counters["write_errors"] += 1
            raise BackendError(
                errno_mod.EAGAIN, f"the redis tier {self.address} failed recently; retrying in under "
                f"{self.retry_after:.1f} s"
            )
        try:
            async with asyncio.timeout(self._deadline(total)):
                if self.cluster:
                    # one transaction per object: each object's keys share a hash slot, a batch does not
                    groups = await asyncio.gather(*(self._transact([e]) for e in enc))
                    olds = [g[0] for g in groups]
                else:
                    olds = await self._transact(enc)
        except (TimeoutError, _RedisError, OSError) as exc:
            self._failed(exc)
            self.counters["write_errors"] += 1
            raise self._backend_error(exc, f"writing {len(items)} object(s)") from exc
        self.counters["writes"] += len(enc)
        self.counters["bytes_written"] += total
        await self._expire_replaced([(e, old) for e, old in zip(enc, olds)])

    async def _expire_replaced(self, pairs: Sequence[tuple[_Encoded, bytes]]) -> None:
        """Give the parts of the versions a write replaced a short expiry (best effort: an orphan part is
        never read, and the server's LRU reclaims it first)."""
        names: list[str] = []
        for e, old in pairs:
            fixed = _WIRE.parse_fixed(old, e.key) if old else None
            if fixed is None:
                continue
            _ps, n, _len, version, inline = fixed
            if inline or version == e.version:
                continue
            names.extend(self._part_name(e.name, version, p) for p in range(n))
        if not names:
            return
        try:
            async with asyncio.timeout(self.timeout):
                pipe = self._client.pipeline(transaction=False)
                for nm in names:
                    pipe.pexpire(nm, self._grace_ms)
                await pipe.execute()
        except (TimeoutError, _RedisError, OSError):
            self.counters["cleanup_errors"] += 1

    async def delete(self, key: bytes) -> bool:
        self._check_open()
        name = self._name(key)
        if not self._available():
            self.counters["unavailable"] += 1
            raise BackendError(errno_mod.EAGAIN, f"the redis tier {self.address} failed recently")
        try:
            async with asyncio.timeout(self.timeout):
                pipe = self._tx_pipeline()
                pipe.getrange(name, 0, FIXED.size - 1)
                pipe.delete(name)
                old, count = await pipe.execute()
                fixed = _WIRE.parse_fixed(old, key) if old else None
                if fixed is not None and not fixed[4]:
                    await self._client.unlink(*(self._part_name(name, fixed[3], p) for p in range(fixed[1])))
        except (TimeoutError, _RedisError, OSError) as exc:
            self._failed(exc)
            raise self._backend_error(exc, "deleting an object") from exc
        return bool(count)

    # --- observability -----------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return {
            **super().stats(),
            "address": self.address,
            "cluster": self.cluster,
            "tls": self.tls,
            "prefix": self.prefix,
            "part_size": self.part_size,
            "timeout": self.timeout,
            "ttl": self.ttl,
            "available": self._available(),
            **self.counters,
        }

    def __repr__(self) -> str:
        kind = "redis+cluster" if self.cluster else ("rediss" if self.tls else "redis")
        return f"<RedisBackend {kind}://{self.address} {'open' if self.is_open else 'closed'}>"
