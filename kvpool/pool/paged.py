"""Paged KV caches: restore a cached prefix straight into a serving engine's GPU blocks, and store from them.

Serving engines (vLLM and friends) keep the KV cache on the GPU in fixed-size blocks: per layer one tensor
``[2, num_blocks, block_size, num_kv_heads, head_dim]``, and per sequence a *block table*, the ids of its
blocks in token order. :class:`PagedKV` names one sequence's view of such a cache.

Restoring a prefix must not cost CPU time per block: with 4096 blocks per layer, a Python loop over blocks
(or one ``copy_`` per block) would be the bottleneck. Here the CPU issues, per layer, **one** host-to-device
copy of the layer's bytes into a staging tensor and **one** ``index_copy_`` along the block dimension; the
GPU does the gather/scatter. :func:`restore_paged` pipelines that over :meth:`kvpool.KVPool.stream`: layer
*i* is copied while later layers are still being read from the tiers, on a dedicated low-priority CUDA
stream, and a :class:`LayerEvents` tells the model's compute stream when each layer has landed::

    hit, events = await restore_paged(pool, tokens, PagedKV(kv_caches, block_ids, block_size=16))
    for layer in range(num_layers):
        events.wait(layer)            # the compute stream waits on the GPU, the CPU does not block
        run_layer(layer)

Host memory. A host-to-device copy runs at the link's speed only from page-locked memory. Staging buffers are
``torch.empty(..., pin_memory=True)`` (torch's caching host allocator, cheap to reuse). Memory that already
exists -- the io_uring tier's registered bounce buffers, a :func:`kvpool.storage.buffers.aligned_empty` tensor --
is page-locked in place with :func:`register_host_memory` (``cudaHostRegister``) and released with
:func:`unregister_host_memory`; both are no-ops without CUDA::

    buf = aligned_empty((64 << 20,), torch.uint8)      # also usable by io_uring (O_DIRECT, fixed buffers)
    with registered_host_memory(buf):                  # now DMA-able by the GPU's copy engines
        gpu_tensor.copy_(buf, non_blocking=True)
        torch.cuda.current_stream().synchronize()       # unregister only after the copy finished

GPUDirect Storage. When kvikio is installed (:func:`gds_available`), a file tier could DMA straight from NVMe
into GPU memory (``kvikio.CuFile(path).pread(gpu_buffer, ...)``). kvpool does not depend on it: without it
(and always, today) bytes go storage -> host memory -> pinned staging -> GPU, which costs host memory
bandwidth but no GPU-side feature.

Without CUDA everything here works on CPU tensors (tests, CPU inference): the same single indexing op per
layer, and :class:`LayerEvents` is a no-op with the same API.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import torch

from ..cuda.events import LayerEvents, await_cuda_event, restore_stream
from ..cuda.host import pinned_empty, unregister_host_memory
from ..cuda.paged_kv import PagedKV, widest_view
from ..keys import as_token_array
from ..storage.buffers import OFFLOAD_BYTES, aligned_empty

if TYPE_CHECKING:
    from .facade import KVPool

__all__ = ["put_paged", "restore_paged"]

# Pinned staging slots per restore: layer i reuses the slot of layer i - _RING once that copy has finished.
_RING = 3


async def _host_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    if src.numel() * src.element_size() >= OFFLOAD_BYTES:
        await asyncio.to_thread(dst.copy_, src)
    else:
        dst.copy_(src)


async def restore_paged(
    pool: KVPool,
    tokens: Any,
    dest: PagedKV,
    *,
    stream: Any = None,
    prefetch_layers: int = 2,
    layer_time: float | None = None,
    events: LayerEvents | None = None,
) -> tuple[int, LayerEvents]:
    """Restore the cached prefix of ``tokens`` into ``dest``'s blocks, layer by layer; return ``(hit, events)``.

    ``hit`` is the number of tokens restored: whole chunks, at most ``dest.num_tokens``. Layers are read with
    :meth:`kvpool.KVPool.stream` (``prefetch_layers`` and ``layer_time`` are passed on) and each is scattered
    with one launch: on CUDA, a copy of the layer into a pinned staging slot (skipped when the pool yields
    pinned memory), one non-blocking host-to-device copy and one ``index_copy_``, all on ``stream`` (default:
    :func:`restore_stream`, a dedicated low-priority stream), then the layer's event is recorded. A ring of
    three pinned slots, allocated once per call, bounds the copies in flight: layer *i* waits for layer *i-3*'s
    copy. The call returns when every copy was *issued* (when the pool yielded pinned layers that were copied
    from directly: when the last copy finished, as that memory is not ours to keep); use ``events`` to order the
    model's work after them. On the CPU each layer is scattered synchronously.

    ``stream`` first waits for the current stream, so work the caller queued (allocating or clearing the
    blocks) comes first. Pass ``events`` (a ``LayerEvents(num_layers, device)``) to watch the layers land while
    the restore runs as a task (:meth:`LayerEvents.ready`).

    Raises
    ------
    LayoutError
        If ``dest`` does not match the pool's layout.
    RestoreError
        If an object vanished after its first layers were restored (those layers are valid).
    """
    layout = pool.layout
    dest.validate(layout)
    if events is None:
        events = LayerEvents(layout.num_layers, dest.device)
    elif events.num_layers != layout.num_layers:
        raise ValueError(f"events has {events.num_layers} layers, the layout has {layout.num_layers}")
    elif events.is_cuda != (dest.device.type == "cuda"):
        raise ValueError(f"events are for {events.device}, dest is on {dest.device}")
    arr = as_token_array(tokens)
    ct = layout.chunk_tokens
    arr = arr[: min(len(arr), dest.num_tokens) // ct * ct]
    cuda = dest.device.type == "cuda"
    hit = 0
    last: Any = None
    try:
        if not cuda:
            async for layer, x in pool.stream(arr, prefetch_layers=prefetch_layers, layer_time=layer_time):
                hit = x.shape[1]
                if x.numel() * x.element_size() >= OFFLOAD_BYTES:
                    await asyncio.to_thread(dest.scatter_layer, layer, x)
                else:
                    dest.scatter_layer(layer, x)
                events.record(layer)
            return hit, events

        s = stream if stream is not None else restore_stream(dest.device)
        s.wait_stream(torch.cuda.current_stream(dest.device))
        dest.block_ids.record_stream(s)  # the caller may drop dest before the copies ran
        ring: list[torch.Tensor | None] = [None] * _RING
        keep: list[torch.Tensor | None] = [None] * _RING  # host memory a copy in flight reads from
        staging: torch.Tensor | None = None
        direct = False  # a pinned layer of the pool's was copied from without a staging copy
        async for layer, x in pool.stream(arr, prefetch_layers=prefetch_layers, layer_time=layer_time):
            hit = x.shape[1]
            slot = layer % _RING
            if layer >= _RING:
                await await_cuda_event(events._events[layer - _RING])  # that slot's copy is done
            if x.is_pinned():
                src, direct = x, True
            else:
                buf = ring[slot]
                if buf is None or buf.shape != x.shape:
                    buf = ring[slot] = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
                await _host_copy(buf, x)
                src = buf
            keep[slot] = src
            if staging is None or staging.numel() < x.numel():
                with torch.cuda.stream(s):  # allocated on s: reuse by the caching allocator is ordered on s
                    staging = torch.empty(x.numel(), dtype=x.dtype, device=dest.device)
            dest.scatter_layer(layer, src, stream=s, staging=staging)
            events.record(layer, s)
            last = events._events[layer]
        if direct:  # the pool's memory is not ours to keep alive past the return: let its copies finish
            await await_cuda_event(last)
        return hit, events
    except BaseException:
        if last is not None:  # never free host memory under a copy in flight
            last.synchronize()
        raise
    finally:
        events._end()


async def put_paged(pool: KVPool, tokens: Any, src: PagedKV) -> int:
    """Store the KV that ``src``'s blocks hold for ``tokens``; return the number of tokens now stored.

    Only whole chunks are stored (at most ``src.num_tokens``). Each layer is gathered from its blocks with one
    ``index_select`` on the caches' device, copied to a pinned, page-aligned host tensor ``[L, 2, n, H, D]``
    (a device-to-host copy per layer, on the restore stream) and handed to :meth:`kvpool.KVPool.put`. When
    every chunk is already in every tier, nothing is gathered and ``put`` is not called.
    """
    layout = pool.layout
    src.validate(layout)
    arr = as_token_array(tokens)
    ct = layout.chunk_tokens
    n = min(len(arr), src.num_tokens) // ct * ct
    if n == 0:
        return 0
    arr = arr[:n]
    keys = pool.keys_for(arr)
    stored = True
    for io in pool._io:  # through each tier's scheduler, like every other call to a tier
        if not all(await io.contains_many(keys)):
            stored = False
            break
    if stored:  # e.g. a shared system prompt stored before: no gather, no device-to-host copy
        return n

    cuda = src.device.type == "cuda"
    if not cuda:
        host = aligned_empty(layout.kv_shape(n), layout.dtype)
        nb, bs = n // src.block_size, src.block_size
        ids = src._blocks(n, 0)
        for layer, cache in enumerate(src.kv_caches):
            c, dst = widest_view(cache, host[layer].view(2, nb, bs, cache.shape[3], cache.shape[4]))
            torch.index_select(c, 1, ids, out=dst)
        return await pool.put(arr, host)

    host = pinned_empty(layout.kv_shape(n), layout.dtype, page_aligned=True)
    try:
        s = restore_stream(src.device)
        s.wait_stream(torch.cuda.current_stream(src.device))
        with torch.cuda.stream(s):
            for layer in range(layout.num_layers):
                host[layer].copy_(src.gather_layer(layer, n), non_blocking=True)
            ev = torch.cuda.Event()  # type: ignore[no-untyped-call]
            ev.record(s)
        await await_cuda_event(ev)
        return await pool.put(arr, host)
    finally:
        unregister_host_memory(host)  # only if pinned_empty had to register an aligned tensor

