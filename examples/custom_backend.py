"""How to write a kvpool backend: a directory of files, one per object.

This is the smallest complete backend -- the six core coroutines, a spec-string constructor and declared
capabilities -- and it passes the shipped conformance suite (see tests/test_custom_backend_example.py).
It is a teaching example, not a fast tier: the ``uring://`` backend is what to use for SSDs.

    import kvpool
    kvpool.register_backend("files", "examples.custom_backend:FileDirBackend")
    pool = await kvpool.KVPool.open(layout=..., model_id=..., backends=["files:///var/cache/kv"])
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import torch

from kvpool import Backend, BackendSpec, Capabilities
from kvpool.storage.backend import nbytes_of


class FileDirBackend(Backend):
    scheme = "files"
    # Every field is required: files survive restarts, but writes are not fsynced (durable=False, flush
    # stays the no-op default), no eviction policy (no hints), ranges are read with one seek.
    capabilities = Capabilities(
        persistent=True, durable=False, device_memory=False, partial_reads=True, remote=False, queued_io=True,
        eviction_hints=False, host_memory="none", read_bandwidth=None,
    )

    def __init__(self, root: str | os.PathLike[str]) -> None:
        super().__init__()
        self.root = Path(root)

    @classmethod
    def from_spec(cls, spec: BackendSpec) -> FileDirBackend:
        spec.check_known(())
        return cls(spec.location)

    async def _open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: bytes) -> Path:
        return self.root / key.hex()

    async def write(self, key: bytes, src: torch.Tensor) -> None:
        self._check_open()
        if nbytes_of(src) == 0:
            raise ValueError("cannot store an empty object")
        data = src.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        tmp = self._path(key).with_suffix(".tmp")

        def _write() -> None:
            tmp.write_bytes(data)
            os.replace(tmp, self._path(key))  # atomic: readers see the old file or the new one

        await asyncio.to_thread(_write)

    async def read_into(self, key: bytes, dest: torch.Tensor, offset: int = 0) -> bool:
        self._check_open()
        n = nbytes_of(dest)

        def _read() -> bytes | None:
            try:
                with open(self._path(key), "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    if offset < 0 or offset + n > size:
                        raise ValueError(f"range [{offset}, {offset + n}) is outside an object of {size} bytes")
                    f.seek(offset)
                    return f.read(n)
            except FileNotFoundError:
                return None

        data = await asyncio.to_thread(_read)
        if data is None or len(data) != n:
            return False
        src = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dest.dtype).view(dest.shape)
        dest.copy_(src)
        return True

    async def delete(self, key: bytes) -> bool:
        self._check_open()
        try:
            self._path(key).unlink()
            return True
        except FileNotFoundError:
            return False

    async def contains(self, key: bytes) -> bool:
        self._check_open()
        return self._path(key).exists()

    async def object_size(self, key: bytes) -> int | None:
        # the suite requires a real answer for stored objects (the pool sizes range reads by it)
        self._check_open()
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None

    async def keys(self) -> AsyncIterator[bytes]:
        self._check_open()
        for p in self.root.iterdir():
            if len(p.name) == 32 and not p.suffix:
                yield bytes.fromhex(p.name)
