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
server is a miss (``False``), counted in :meth:`RedisBackend.stats`, never an exception; a ``delete`` that
cannot reach the server returns ``False`` (counted in ``delete_errors``). After a timeout or a connection error
the tier is skipped for ``retry_after`` seconds (reads miss at once, writes raise), so a dead server costs the
serving path one timeout, not one per call. Writes and :meth:`RedisBackend.keys` raise
:class:`~kvpool.BackendError`; so does :meth:`RedisBackend.open` when the server cannot be reached. The policy
and the breaker are :class:`~kvpool.remote.base.RemoteBackend`'s; this module only names redis-py's
exceptions (:data:`_EXCEPTIONS`).

Lookups. ``contains_many`` on a single server is one small Lua script (one reply for all keys: about 4x
cheaper for redis-py than a pipeline of ``EXISTS``); a pipeline in cluster mode or where scripts are refused.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import xxhash

from ..errors import ConfigError
from ..storage.backend import ReadRequest
from .base import (
    COMMON_OPTIONS,
    DEFAULT_PART,
    KEY_LEN,
    Family,
    Fixed,
    Ident,
    Item,
    Plan,
    RemoteBackend,
    Value,
)
from .boundary import FaultKind
from .format import FIXED, Header, bytes_address, part_seed, seconds

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

# What redis-py's (and the socket's) exceptions mean for the tier; the first match decides.
_EXCEPTIONS = (
    (TimeoutError, FaultKind.TIMEOUT),  # our deadline (asyncio.timeout); before OSError, its base
    (_RTimeoutError, FaultKind.TIMEOUT),
    (_RConnectionError, FaultKind.DOWN),
    (OSError, FaultKind.DOWN),
    (_RedisError, FaultKind.REFUSED),  # the server answered: an error reply, a cluster redirect gone wrong
)
# Membership of many keys in one command: ~4x cheaper for redis-py to send and parse than a pipeline of EXISTS
# (one reply instead of one per key). Single node only (a cluster script may not span hash slots); a server
# that refuses scripts gets the pipeline.
_EXISTS_LUA = "local r = {} for i, k in ipairs(KEYS) do r[i] = redis.call('EXISTS', k) end return r"


def _escape_glob(s: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in s)


def _value(b: bytes) -> Value:
    return Value(memoryview(b), bytes_address(b), b)


# --- the backend ------------------------------------------------------------------------------------------
class RedisBackend(RemoteBackend):
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
    family = Family("redis", b"KVR1", 0x6B76706F6F6C6872, _EXCEPTIONS)  # salt: "kvpoolhr"

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        cluster: bool = False,
        timeout: float = 2.0,
        part_size: int = DEFAULT_PART,
        prefix: str = "kvpool:",
        ttl: float | None = None,
        retry_after: float = 1.0,
        max_connections: int = 64,
    ) -> None:
        super().__init__(timeout=timeout, part_size=part_size, prefix=prefix, retry_after=retry_after)
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
        if "{" in prefix or "}" in prefix:
            raise ConfigError(f"prefix must be a str without braces (the key is the hash tag): {prefix!r}")
        if ttl is not None and not (isinstance(ttl, (int, float)) and ttl > 0):
            raise ConfigError(f"ttl must be a positive number of seconds or None, got {ttl!r}")
        if not (isinstance(max_connections, int) and max_connections >= 1):
            raise ConfigError(f"max_connections must be a positive integer, got {max_connections!r}")
        self.url = url
        self.cluster = cluster
        self.tls = parts.scheme == "rediss"
        self.address = f"{parts.hostname}:{port}" + ("" if cluster else f"/{db}")
        self.ttl = ttl
        self.max_connections = max_connections
        self._ttl_ms = int(ttl * 1000) if ttl is not None else None
        self._grace_ms = int(1000 * self.grace)
        self._client: Any = None
        self._pool: Any = None
        self._cluster_tx = True
        self._exists_script: Any = None

    @classmethod
    def from_spec(cls, spec: BackendSpec) -> Self:
        spec.check_known((*COMMON_OPTIONS, "ttl", "max_connections"))
        scheme = spec.scheme
        if scheme not in ("redis", "rediss", "valkey", "redis+cluster"):
            raise ConfigError(f"{spec.text}: the redis backend does not serve {scheme}://")
        loc = spec.location or "127.0.0.1:6379"
        if loc.startswith("/"):
            loc = "127.0.0.1:6379" + loc
        url = f"{'rediss' if scheme == 'rediss' else 'redis'}://{loc}"
        return cls.naming_spec(spec, lambda: cls(
            url,
            cluster=scheme == "redis+cluster",
            ttl=seconds(spec, "ttl", None),
            max_connections=spec.integer("max_connections", 64),
            **cls.common_options(spec),
        ))

    # --- lifecycle ---------------------------------------------------------------------------------------
    async def _open(self) -> None:
        common: dict[str, Any] = {"socket_connect_timeout": self.timeout, "socket_timeout": None}
        try:
            with self._boundary(f"cannot reach the redis server at {self.address}", raises=True):
                if self.cluster:
                    self._client = _RedisCluster.from_url(self.url, max_connections=self.max_connections, **common)
                else:
                    self._pool = _aredis.BlockingConnectionPool.from_url(
                        self.url, max_connections=self.max_connections, timeout=self.timeout,
                        retry=_Retry(_NoBackoff(), 1), **common,
                    )
                    self._client = _aredis.Redis(connection_pool=self._pool)
                    self._exists_script = self._client.register_script(_EXISTS_LUA)
                async with asyncio.timeout(self.timeout):
                    if self.cluster:
                        await self._client.initialize()
                    await self._client.ping()
        except BaseException:
            await self._teardown()
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
                # bounded: a paused server must not hold close() up
                async with asyncio.timeout(self.timeout):
                    await closer()
            except Exception:  # closing a dead connection must not fail close()
                pass

    # --- names -------------------------------------------------------------------------------------------
    def _name_of_hex(self, hexkey: str) -> str:
        # the braces make the key the cluster hash tag: every name of one object is in one hash slot
        return f"{self.prefix}{{{hexkey}}}"

    async def _get_many(self, names: Sequence[str]) -> list[Any]:
        if len(names) == 1:
            return [await self._client.get(names[0])]
        pipe = self._client.pipeline(transaction=False)
        for nm in names:
            pipe.get(nm)
        return list(await pipe.execute())

    # --- reads -------------------------------------------------------------------------------------------
    async def _fixed_header(self, key: bytes, name: str) -> Fixed | None:
        async with asyncio.timeout(self.timeout):
            return self._fixed(await self._client.getrange(name, 0, FIXED.size - 1), key)

    async def _read_statuses(
        self, reqs: Sequence[ReadRequest], names: list[str], sizes: list[int], status: list[str | None]
    ) -> None:
        plans: list[Plan] = []
        fetched: dict[Ident, Value | str] = {}
        users: dict[Ident, list[Plan]] = {}
        t0 = asyncio.get_running_loop().time()
        async with asyncio.timeout(self._deadline(sum(sizes))) as cm:
            # round trip 1: the headers (small objects come with their data)
            uniq = list(dict.fromkeys(names))
            by_name = dict(zip(uniq, await self._get_many(uniq)))
            hdrs: dict[str, Header | None] = {}
            misses: dict[int, str] = {}
            for i, r in enumerate(reqs):
                raw = by_name[names[i]]
                got = self._plan(i, r, names[i], sizes[i], _value(raw) if raw is not None else "absent", hdrs)
                if isinstance(got, str):
                    misses[i] = got
                else:
                    plans.append(got)
            # round trip 2: the parts covering the ranges of multi-part objects
            want, wnames, wlens, users = self._part_wants([pl for pl in plans if not pl.hdr.inline])
            if want:
                cm.reschedule(t0 + self._deadline(sum(wlens)))  # the deadline now knows the bytes coming
                got_parts = await self._get_many(wnames)
                fetched = {ident: _value(v) if v is not None else "missing_parts" for ident, v in zip(want, got_parts)}
        # verification and copies: no server involved, so outside the deadline (a worker thread must never be
        # left writing into a destination after we returned)
        work = sum(pl.nbytes for pl in plans) + sum(len(v.mv) for v in fetched.values() if isinstance(v, Value))
        await self._cpu(work, self._finish, plans, [(ident, fetched[ident], users[ident]) for ident in fetched])
        for i, st in misses.items():
            status[i] = st
        for pl in plans:
            status[pl.index] = pl.status

    def _finish(self, plans: list[Plan], items: list[tuple[Ident, Value | str, list[Plan]]]) -> None:
        self._finish_inline([pl for pl in plans if pl.hdr.inline])
        self._apply_parts(items)
        self._finish_fillers([pl for pl in plans if not pl.hdr.inline])

    # --- membership --------------------------------------------------------------------------------------
    async def _exists(self, names: list[str]) -> list[bool]:
        res: list[Any] | None = None
        async with asyncio.timeout(self.timeout):
            if len(names) == 1:
                res = [await self._client.exists(names[0])]
            elif self._exists_script is not None and len(names) >= 8:
                try:
                    res = list(await self._exists_script(keys=names))
                except _RResponseError as exc:  # scripting disabled or refused: use the pipeline
                    self.log.info("redis tier %s: no scripting (%s); lookups pipeline", self.address, exc)
                    self._exists_script = None
            if res is None:
                pipe = self._client.pipeline(transaction=False)
                for nm in names:
                    pipe.exists(nm)
                res = await pipe.execute()
        return [bool(x) for x in res]

    async def keys(self) -> AsyncIterator[bytes]:
        self._check_open()
        pattern = _escape_glob(self.prefix) + "{" + "?" * (2 * KEY_LEN) + "}"
        start = len(self.prefix) + 1
        it = self._client.scan_iter(match=pattern, count=1000)
        seen: set[bytes] = set()
        try:
            while True:
                try:
                    with self._boundary("listing keys", raises=True):
                        async with asyncio.timeout(self.timeout):
                            name = await anext(it)
                except StopAsyncIteration:
                    return
                raw = name.decode() if isinstance(name, bytes) else str(name)
                try:
                    k = bytes.fromhex(raw[start : start + 2 * KEY_LEN])
                except ValueError:
                    continue
                if len(k) == KEY_LEN and k not in seen:
                    seen.add(k)
                    yield k
        finally:
            try:
                await it.aclose()
            except Exception:
                pass

    # --- writes ------------------------------------------------------------------------------------------
    def _encode(self, items: list[Item]) -> list[tuple[Item, bytes, list[memoryview]]]:
        """Each object's header value (with the data when inline) and its part views; checksums computed.
        Pure CPU work."""
        out = []
        for o in items:
            views = [o.part(p).numpy().data.cast("B") for p in range(o.nparts)]
            o.sums = [xxhash.xxh3_64_intdigest(v, part_seed(o.key, p)) for p, v in enumerate(views)]
            header = self.wire.pack_header(o.key, o.nbytes, self.part_size, o.version, o.sums, o.inline)
            out.append((o, header + views[0], []) if o.inline else (o, header, views))
        return out

    def _queue_write(self, pipe: Any, o: Item, header: bytes, parts: list[memoryview]) -> int:
        """Queue one object's write on ``pipe``; return the number of replies it adds (the first is the old
        header's fixed part)."""
        pipe.getrange(o.name, 0, FIXED.size - 1)
        for p, v in enumerate(parts):
            pipe.set(self._part_name(o.name, o.version, p), v, px=self._ttl_ms)
        pipe.set(o.name, header, px=self._ttl_ms)
        return len(parts) + 2

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

    async def _transact(self, batch: Sequence[tuple[Item, bytes, list[memoryview]]]) -> list[bytes]:
        """Write ``batch`` in one transaction; return the old fixed headers."""
        pipe = self._tx_pipeline()
        counts = [self._queue_write(pipe, *e) for e in batch]
        res = await pipe.execute()
        olds, pos = [], 0
        for c in counts:
            olds.append(res[pos])
            pos += c
        return olds

    async def _write_items(self, objs: list[Item], total: int) -> None:
        enc = await self._cpu(total, self._encode, objs)
        async with asyncio.timeout(self._deadline(total)):
            if self.cluster:
                # one transaction per object: each object's keys share a hash slot, a batch does not
                groups = await asyncio.gather(*(self._transact([e]) for e in enc))
                olds = [g[0] for g in groups]
            else:
                olds = await self._transact(enc)
        # the parts of the versions replaced get a short expiry (best effort: an orphan part is never read,
        # and the server's LRU reclaims it first)
        stale = [n for o, old in zip(objs, olds) for n in self._old_parts(o.name, self._fixed(old, o.key), o.version)]
        if stale:
            with self._boundary("expiring replaced parts", raises=False) as attempt:
                async with asyncio.timeout(self.timeout):
                    pipe = self._client.pipeline(transaction=False)
                    for nm in stale:
                        pipe.pexpire(nm, self._grace_ms)
                    await pipe.execute()
            if attempt.fault is not None:
                self.counters["cleanup_errors"] += 1

    def _fixed(self, raw: bytes | None, key: bytes) -> Fixed | None:
        return self.wire.parse_fixed(raw, key) if raw else None

    async def _delete(self, key: bytes, name: str) -> bool:
        async with asyncio.timeout(self.timeout):
            pipe = self._tx_pipeline()
            pipe.getrange(name, 0, FIXED.size - 1)
            pipe.delete(name)
            old, count = await pipe.execute()
            parts = self._old_parts(name, self._fixed(old, key))
            if parts:
                await self._client.unlink(*parts)
        return bool(count)

    # --- observability -----------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "cluster": self.cluster, "tls": self.tls, "ttl": self.ttl}

    def __repr__(self) -> str:
        kind = "redis+cluster" if self.cluster else ("rediss" if self.tls else "redis")
        return f"<RedisBackend {kind}://{self.address} {'open' if self.is_open else 'closed'}>"
