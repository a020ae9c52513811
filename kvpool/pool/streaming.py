"""The layer-wise restore pipeline behind :meth:`KVPool.stream`: layer *i+1..i+k* in flight while the
caller works on layer *i*, each layer's reads carrying its own deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable, Callable

import torch

from ..errors import RestoreError
from ..layout import KVLayout
from .calls import CallGate
from .scheduler import Priority, io_class

__all__ = ["stream_layers"]

ReadViews = Callable[[list[bytes], list[int], list[torch.Tensor], int], Awaitable[int]]


async def stream_layers(
    *,
    layout: KVLayout,
    keys: list[bytes],
    where: list[int],
    acquire: Callable[[tuple[int, ...]], Awaitable[torch.Tensor]],
    read_views: ReadViews,
    gate: CallGate,
    prefetch_layers: int,
    layer_time: float | None,
) -> AsyncGenerator[tuple[int, torch.Tensor], None]:
    """Yield ``(layer, [2, hit, H, D])`` for the located prefix ``keys[:len(where)]``, layer by layer.

    Raises
    ------
    RestoreError
        A chunk could not be read at some layer (evicted or corrupt after the first layers were yielded).
    """
    hit = len(where) * layout.chunk_tokens
    L = layout.num_layers
    shape = (2, hit, layout.num_kv_heads, layout.head_dim)
    start = time.monotonic()
    step = layer_time if layer_time is not None else 1e-6  # without an estimate: layer order

    async def read_layer(layer: int) -> torch.Tensor:
        x = await acquire(shape)
        off = layout.layer_offset(layer)
        gate.enter()  # close() waits for this read; a suspended generator does not hold it up
        try:
            with io_class(Priority.FOREGROUND, start + layer * step):
                ok = await read_views(keys, where, [layout.layer_chunk_view(x, c) for c in range(len(where))], off)
        finally:
            gate.exit()
        if ok < len(where):
            raise RestoreError(f"chunk {ok} of the prefix could not be read at layer {layer}", layer)
        return x

    pending: dict[int, asyncio.Task[torch.Tensor]] = {}
    try:
        for layer in range(L):
            for nxt in range(layer, min(L, layer + 1 + prefetch_layers)):
                if nxt not in pending:
                    pending[nxt] = asyncio.ensure_future(read_layer(nxt))
            x = await pending.pop(layer)
            yield layer, x
    finally:
        for t in pending.values():
            t.cancel()
        if pending:
            await asyncio.gather(*pending.values(), return_exceptions=True)
