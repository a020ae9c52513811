"""kvpool: an asyncio KV-cache store for LLM serving.

Public names live here and only here::

    import kvpool, torch
    layout = kvpool.KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16)
    async with kvpool.KVPool.open(layout=layout, model_id="llama-3.1-8b",
                                  backends=["dram://?capacity=8GiB"]) as pool:
        await pool.put(tokens, kv)
        kv = await pool.get(tokens)
"""

from .storage.backend import Backend, Capabilities, ReadRequest
from .config import BackendSpec, PoolConfig
from .errors import (
    BackendError,
    CapacityError,
    ConfigError,
    KVPoolError,
    LayoutError,
    PoolClosedError,
    PoolLockedError,
    RestoreError,
    UnknownBackendError,
)
from .layout import KVLayout
from .cuda.events import LayerEvents
from .cuda.paged_kv import PagedKV
from .pool import KVPool
from .pool.paged import restore_paged
from .storage.registry import get_backend_class, known_backends, register_backend, registry
from .sync import SyncPool
from .types import PoolStats, TierStats, Tokens

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BackendError",
    "BackendSpec",
    "Capabilities",
    "CapacityError",
    "ConfigError",
    "KVLayout",
    "KVPool",
    "KVPoolError",
    "LayerEvents",
    "LayoutError",
    "PoolClosedError",
    "PoolConfig",
    "PagedKV",
    "PoolLockedError",
    "PoolStats",
    "ReadRequest",
    "RestoreError",
    "SyncPool",
    "TierStats",
    "Tokens",
    "UnknownBackendError",
    "get_backend_class",
    "known_backends",
    "register_backend",
    "registry",
    "restore_paged",
]
