"""The local lookup service: a scheduler in one process asks the pool another process holds.

vLLM runs its scheduler in the EngineCore process and the model worker (which holds the KV caches, hence the
pool) in another. Opening the pool twice is not an option (a persistent tier is locked by the process that
holds it, and two processes would keep two indexes), so the worker serves lookups on a Unix socket, from the
pool's own event loop, and the scheduler asks it (as LMCache does).

Wire format, little-endian. Request: ``u32 op, u32 n, n x u32 tokens``. ``op 1`` (lookup): reply ``u64`` =
the cached prefix in tokens (:meth:`kvpool.KVPool.lookup`). ``op 2`` (stats): reply ``u32 len`` + JSON of
:meth:`kvpool.KVPool.stats`. A lookup has no side effect beyond the pool's ``lookups`` counter.

The client never raises into the scheduler: a service that cannot be reached (yet, or any more) answers 0
(a miss) and is retried on the next call.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct
import tempfile
import threading
import time
from typing import Any

import numpy as np

from ...keys import as_token_array

__all__ = ["LookupClient", "serve_lookups", "socket_path"]

log = logging.getLogger("kvpool.vllm")

OP_LOOKUP = 1
OP_STATS = 2
_HDR = struct.Struct("<II")
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


def socket_path(engine_id: str, rank: int, dp_rank: int = 0, directory: str | None = None) -> str:
    """Where the worker of ``rank`` of engine ``engine_id`` serves lookups (a private 0700 directory)."""
    d = directory or os.environ.get("KVPOOL_VLLM_SOCKET_DIR") or os.path.join(
        tempfile.gettempdir(), f"kvpool-vllm-{os.getuid()}"
    )
    os.makedirs(d, mode=0o700, exist_ok=True)
    name = f"{engine_id[:36]}-dp{dp_rank}-r{rank}.sock"
    return os.path.join(d, name)


async def serve_lookups(pool: Any, path: str, extra: Any = None) -> asyncio.AbstractServer:
    """Serve lookups of ``pool`` (a :class:`kvpool.KVPool`) on the Unix socket ``path``; run on its loop.

    ``extra``: a callable whose dict is added to the stats reply under ``"connector"``.
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    hdr = await reader.readexactly(_HDR.size)
                except asyncio.IncompleteReadError:
                    return
                op, n = _HDR.unpack(hdr)
                data = await reader.readexactly(4 * n) if n else b""
                if op == OP_LOOKUP:
                    tokens = np.frombuffer(data, dtype="<u4")
                    try:
                        hit = await pool.lookup(tokens)
                    except Exception as exc:  # a tier down: a miss, never an error to the scheduler
                        log.warning("kvpool lookup failed: %r", exc)
                        hit = 0
                    writer.write(_U64.pack(hit))
                elif op == OP_STATS:
                    st = pool.stats()
                    if extra is not None:
                        st["connector"] = extra()
                    body = json.dumps(st, default=str).encode()
                    writer.write(_U32.pack(len(body)) + body)
                else:
                    return
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    if os.path.exists(path):
        os.unlink(path)  # a stale socket of an engine that died
    server = await asyncio.start_unix_server(handle, path=path)
    os.chmod(path, 0o600)
    return server


class LookupClient:
    """A blocking client of one worker's lookup service, safe to share between threads."""

    def __init__(self, path: str, *, timeout: float = 10.0, connect_timeout: float = 120.0) -> None:
        self.path = path
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._created = time.monotonic()
        self.failures = 0

    def _connect(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        # the worker starts its service when it registers its KV caches, which vLLM does before it builds the
        # scheduler; still, wait a little for a slow start
        deadline = time.monotonic() + (self.connect_timeout if self.failures == 0 else 0.0)
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(self.timeout)
            try:
                s.connect(self.path)
                self._sock = s
                return s
            except OSError:
                s.close()
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    def _recv(self, s: socket.socket, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            part = s.recv(n - len(buf))
            if not part:
                raise ConnectionError("lookup service closed the connection")
            buf += part
        return bytes(buf)

    def _call(self, op: int, payload: bytes, n: int) -> socket.socket:
        s = self._connect()
        s.sendall(_HDR.pack(op, n) + payload)
        return s

    def lookup(self, tokens: Any) -> int:
        """The cached prefix of ``tokens`` in tokens; 0 when the service cannot answer."""
        arr = as_token_array(tokens)
        with self._lock:
            for attempt in (0, 1):
                try:
                    s = self._call(OP_LOOKUP, arr.tobytes(), len(arr))
                    return int(_U64.unpack(self._recv(s, _U64.size))[0])
                except OSError as exc:
                    self.close_locked()
                    if attempt:
                        self.failures += 1
                        log.warning("kvpool lookup service %s unreachable (%r): treated as a miss", self.path, exc)
        return 0

    def stats(self) -> dict[str, Any] | None:
        with self._lock:
            try:
                s = self._call(OP_STATS, b"", 0)
                (n,) = _U32.unpack(self._recv(s, _U32.size))
                out: dict[str, Any] = json.loads(self._recv(s, n))
                return out
            except OSError:
                self.close_locked()
                return None

    def close_locked(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def close(self) -> None:
        with self._lock:
            self.close_locked()
