"""The public ``mooncake://`` backend: the read and write sides put together, spec parsing, key listing and
stats (the module docstring of :mod:`kvpool.remote.mooncake` describes the tier)."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from ..base import KEY_LEN
from . import options as opt
from .reads import MooncakeReads
from .writes import MooncakeWrites

if TYPE_CHECKING:
    from typing import Self

    from ...config import BackendSpec

__all__ = ["MooncakeBackend"]


class MooncakeBackend(MooncakeReads, MooncakeWrites):
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

    @classmethod
    def from_spec(cls, spec: BackendSpec) -> Self:
        master, kwargs = cls.naming_spec(spec, lambda: opt.from_spec(spec))
        return cls.naming_spec(spec, lambda: cls(master, **kwargs))

    async def keys(self) -> AsyncIterator[bytes]:
        """Every object under this prefix, from the master's admin server (``/get_all_keys``)."""
        self._check_open()
        url = f"http://{self.admin}/get_all_keys"

        def fetch() -> bytes:
            with urllib.request.urlopen(url, timeout=self.timeout) as resp:
                data: bytes = resp.read()
                return data

        with self._boundary(f"listing keys from the admin server {self.admin}", raises=True):
            body = await asyncio.wait_for(asyncio.to_thread(fetch), self._deadline(0) + self.timeout)
        n = len(self.prefix)
        seen: set[bytes] = set()
        for line in body.decode("utf-8", "replace").splitlines():
            nm = line.strip()
            if len(nm) != n + 2 * KEY_LEN or not nm.startswith(self.prefix):
                continue
            try:
                k = bytes.fromhex(nm[n:])
            except ValueError:
                continue
            if k not in seen:
                seen.add(k)
                yield k

    def stats(self) -> dict[str, Any]:
        return {
            **super().stats(),
            "metadata": self.metadata,
            "protocol": self.protocol,
            "zero_copy": self.zero_copy,
            "buffer": self.buffer,
            "buffer_free": self._buf.free_bytes if self._buf is not None else 0,
            "segment": self.segment,
        }

    def __repr__(self) -> str:
        return f"<MooncakeBackend mooncake://{self.address} {'open' if self.is_open else 'closed'}>"
