"""The conformance suite's raw hooks (``get_raw``/``set_raw``/``corrupt_raw``) for the remote tiers, through
a plain client of the server -- redis-py, or a second Mooncake client -- never the backend under test.

The object is decoded and encoded here from :mod:`kvpool.remote.format` (the pure, documented format: header,
parts under ``NAME:VERSION:INDEX``, xxh3 checksums), so a write is checked byte for byte against what the
server holds, and an object stored here must be found by the backend's own read path.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import xxhash

from kvpool.remote.format import part_seed


class RemoteRaw:
    """Mixed into a ``BackendTests`` subclass; the subclass sets :meth:`_get` / :meth:`_put` (one value by
    name, ``None`` when absent) on its independent client."""

    async def _get(self, name: str) -> bytes | None:
        raise NotImplementedError

    async def _put(self, name: str, value: bytes) -> None:
        raise NotImplementedError

    async def get_raw(self, backend: Any, key: bytes) -> bytes | None:
        name = backend._name(key)
        value = await self._get(name)
        if value is None:
            return None
        hdr = backend.wire.parse_header(value, key)
        assert hdr is not None, f"what the backend stored under {name} is not a valid header"
        if hdr.inline:
            return bytes(value[hdr.data_off :])
        parts = [await self._get(backend._part_name(name, hdr.version, p)) for p in range(hdr.nparts)]
        assert all(p is not None for p in parts), "a part of a stored object is missing"
        return b"".join(p for p in parts if p is not None)

    async def set_raw(self, backend: Any, key: bytes, data: bytes) -> None:
        name, ps = backend._name(key), backend.part_size
        chunks = [data[i : i + ps] for i in range(0, len(data), ps)]
        sums = [xxhash.xxh3_64_intdigest(c, part_seed(key, p)) for p, c in enumerate(chunks)]
        version = int.from_bytes(os.urandom(8), "little")
        inline = len(chunks) == 1
        header = backend.wire.pack_header(key, len(data), ps, version, sums, inline)
        if inline:
            await self._put(name, header + data)
            return
        for p, c in enumerate(chunks):
            await self._put(backend._part_name(name, version, p), c)
        await self._put(name, header)

    async def corrupt_raw(self, backend: Any, key: bytes) -> None:
        """Flip one data byte: in the inline data, or in the first part."""
        name = backend._name(key)
        value = await self._get(name)
        assert value is not None
        hdr = backend.wire.parse_header(value, key)
        assert hdr is not None
        if not hdr.inline:
            name = backend._part_name(name, hdr.version, 0)
            value = await self._get(name)
            assert value is not None
        v = bytearray(value)
        v[-1] ^= 0x01
        await self._put(name, bytes(v))


async def in_thread(fn: Any, *args: Any) -> Any:
    """A blocking client call off the event loop."""
    return await asyncio.to_thread(fn, *args)
