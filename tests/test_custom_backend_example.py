"""The example backend in examples/ passes the same conformance suite as the built-in ones."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kvpool  # noqa: E402
from examples.custom_backend import FileDirBackend  # noqa: E402
from kvpool import Backend  # noqa: E402
from kvpool.testing import BackendTests  # noqa: E402


class TestFileDirBackend(BackendTests):
    bounded = False

    async def make_backend(self, tmp_path: Path, capacity: int) -> FileDirBackend:
        return FileDirBackend(tmp_path / "objects")

    # the independent channel: the object files themselves, read and written with plain file I/O
    async def get_raw(self, backend: Backend, key: bytes) -> bytes | None:
        assert isinstance(backend, FileDirBackend)
        path = backend.root / key.hex()
        return path.read_bytes() if path.exists() else None

    async def set_raw(self, backend: Backend, key: bytes, data: bytes) -> None:
        assert isinstance(backend, FileDirBackend)
        (backend.root / key.hex()).write_bytes(data)


async def test_registered_by_dotted_path(tmp_path: Path) -> None:
    kvpool.register_backend("files", "examples.custom_backend:FileDirBackend", clobber=True)
    layout = kvpool.KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype=torch.float32, chunk_tokens=4)
    kv = torch.randn(layout.kv_shape(8))
    async with await kvpool.KVPool.open(layout=layout, model_id="m", backends=[f"files://{tmp_path}/kv"]) as p:
        await p.put(list(range(8)), kv)
    async with await kvpool.KVPool.open(layout=layout, model_id="m", backends=[f"files://{tmp_path}/kv"]) as p:
        assert torch.equal(await p.get(list(range(8))), kv)
