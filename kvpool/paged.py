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
exists -- the io_uring tier's registered bounce buffers, a :func:`kvpool.buffers.aligned_empty` tensor --
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
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import attrs
import torch

from .buffers import aligned_empty, buffer_address
from .errors import BackendError, LayoutError
from .keys import as_token_array
from .layout import KVLayout

if TYPE_CHECKING:
    from .pool import KVPool

__all__ = [
    "LayerEvents",
    "PagedKV",
    "await_cuda_event",
    "gds_available",
    "pinned_empty",
    "put_paged",
    "register_host_memory",
    "registered_host_memory",
    "restore_paged",
    "restore_stream",
    "unregister_host_memory",
]

# Host copies at least this large run in a worker thread (torch releases the GIL), so the event loop keeps
# serving the tiers' reads for later layers meanwhile.
_OFFLOAD_BYTES = 4 << 20
# Pinned staging slots per restore: layer i reuses the slot of layer i - _RING once that copy has finished.
_RING = 3


# --- host memory -----------------------------------------------------------------------------------------
# torch.cuda's stream/event/cudart constructors are untyped; go through Any once instead of at every call
_cuda: Any = torch.cuda

_registered: dict[int, int] = {}  # address -> nbytes, registered by us
_registered_lock = threading.Lock()


def _cuda_ok() -> bool:
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # a broken driver is "no CUDA" here
        return False


def _address_and_size(obj: Any) -> tuple[int, int]:
    if isinstance(obj, torch.Tensor):
        if obj.device.type != "cpu":
            raise ValueError(f"only host memory can be registered, got a tensor on {obj.device}")
        if not obj.is_contiguous():
            raise ValueError("only a contiguous tensor's memory can be registered")
        return obj.data_ptr(), obj.numel() * obj.element_size()
    mv = memoryview(obj)
    return buffer_address(obj), mv.nbytes


def register_host_memory(obj: Any) -> bool:
    """Page-lock existing host memory for DMA by CUDA (``cudaHostRegister``); return whether it was done.

    ``obj`` is a contiguous CPU tensor or a writable buffer (``mmap``, ``bytearray``). A no-op returning
    ``False`` without CUDA, for empty memory, or when that memory is already registered (by us or by someone
    else). Keep ``obj`` alive and call :func:`unregister_host_memory` before it is freed; registration costs
    about as much as touching every page once, so register long-lived buffers (arenas, bounce buffers), not
    per copy.

    Raises
    ------
    BackendError
        If CUDA refuses the registration for another reason.
    """
    if not _cuda_ok():
        return False
    ptr, nbytes = _address_and_size(obj)
    if nbytes == 0:
        return False
    with _registered_lock:
        if ptr in _registered:
            return False
        cudart: Any = _cuda.cudart()
        err = int(cudart.cudaHostRegister(ptr, nbytes, 0))  # cudaHostRegisterDefault
        if err == 712:  # cudaErrorHostMemoryAlreadyRegistered: someone else owns the registration
            return False
        if err != 0:
            raise BackendError(f"cudaHostRegister of {nbytes} bytes at {ptr:#x} failed with cudaError {err}")
        _registered[ptr] = nbytes
        return True


def unregister_host_memory(obj: Any) -> bool:
    """Undo :func:`register_host_memory` (``cudaHostUnregister``); return whether anything was unregistered.

    Only memory registered through :func:`register_host_memory` is touched; a no-op without CUDA. Every copy
    from or to the memory must have finished.
    """
    if not _cuda_ok():
        return False
    ptr, _ = _address_and_size(obj)
    with _registered_lock:
        if _registered.pop(ptr, None) is None:
            return False
        cudart: Any = _cuda.cudart()
        err = int(cudart.cudaHostUnregister(ptr))
        if err != 0:
            raise BackendError(f"cudaHostUnregister at {ptr:#x} failed with cudaError {err}")
        return True


@contextmanager
def registered_host_memory(obj: Any) -> Iterator[bool]:
    """``with registered_host_memory(buf) as pinned:`` -- register for the block, unregister after."""
    done = register_host_memory(obj)
    try:
        yield done
    finally:
        if done:
            unregister_host_memory(obj)


def pinned_empty(shape: Sequence[int], dtype: torch.dtype, *, page_aligned: bool = False) -> torch.Tensor:
    """A host tensor for staging copies to and from the GPU: page-locked when CUDA is available.

    From torch's caching host allocator (``pin_memory=True``); with ``page_aligned`` the memory is also
    4 KiB-aligned, as O_DIRECT (the ``uring://`` tier) needs to use it without a bounce copy -- if the
    allocator's block is not, an :func:`~kvpool.buffers.aligned_empty` tensor is registered instead (the
    caller unregisters it with :func:`unregister_host_memory` when done). Without CUDA: ``aligned_empty``.
    """
    shape = tuple(int(s) for s in shape)
    if not _cuda_ok():
        return aligned_empty(shape, dtype)
    t = torch.empty(shape, dtype=dtype, pin_memory=True)
    if page_aligned and t.data_ptr() % 4096:
        t = aligned_empty(shape, dtype)
        register_host_memory(t)
    return t


def gds_available() -> bool:
    """Whether GPUDirect Storage can be used: kvikio importable (with ``kvikio.CuFile``) and a CUDA device.

    Informational: kvpool's tiers do not use it yet; without it bytes travel through pinned host memory.
    """
    if not _cuda_ok():
        return False
    try:
        import kvikio
    except Exception:
        return False
    return hasattr(kvikio, "CuFile")


# --- CUDA streams and events -----------------------------------------------------------------------------
_streams: dict[int, Any] = {}


def restore_stream(device: torch.device | int | str | None = None) -> Any:
    """The dedicated low-priority CUDA stream restores use by default on ``device`` (one per device)."""
    if device is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    elif isinstance(device, int):
        dev = torch.device("cuda", device)
    else:
        dev = torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"restore_stream needs a CUDA device, got {dev}")
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    s = _streams.get(idx)
    if s is None:
        rng = getattr(torch.cuda.Stream, "priority_range", None)
        lowest = int(rng()[0]) if rng is not None else 0  # (least, greatest): a larger number is lower
        s = _cuda.Stream(device=idx, priority=lowest)
        _streams[idx] = s
    return s


async def await_cuda_event(ev: Any, *, spins: int = 8) -> None:
    """Wait for a CUDA event without blocking the event loop: poll it a few loop turns, then wait in a thread."""
    if ev is None:
        return
    for _ in range(spins):
        if ev.query():
            return
        await asyncio.sleep(0)
    await asyncio.to_thread(ev.synchronize)


class LayerEvents:
    """Per-layer completion of a restore.

    On CUDA, layer *l*'s copy records a ``torch.cuda.Event`` on the restore stream; :meth:`wait` makes another
    stream (the model's compute stream) wait for it on the GPU, without blocking the CPU. A layer that was never
    restored (nothing cached) has no event: waiting on it is a no-op. On the CPU the copies are synchronous and
    every method returns at once.

    :meth:`ready` is for a caller that runs :func:`restore_paged` as a task (pass ``events=`` in) and starts the
    forward pass before every layer was issued: it waits until layer *l*'s copy was *issued* (or the restore
    ended without it) -- a CUDA stream cannot wait on an event that has not been recorded yet. One object
    serves one restore.
    """

    def __init__(self, num_layers: int, device: torch.device | str | None = None) -> None:
        if num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {num_layers}")
        self.num_layers = num_layers
        self.device = torch.device(device if device is not None else "cpu")
        self.is_cuda = self.device.type == "cuda"
        self._events: list[Any] = [None] * num_layers
        self._issued = [False] * num_layers
        self._flags: list[asyncio.Event] = [asyncio.Event() for _ in range(num_layers)]

    def __len__(self) -> int:
        return self.num_layers

    def __repr__(self) -> str:
        return f"<LayerEvents {sum(self._issued)}/{self.num_layers} issued on {self.device}>"

    def record(self, layer: int, stream: Any = None) -> None:
        """Mark layer ``layer`` issued; on CUDA record its event on ``stream`` (default: the current stream)."""
        if self.is_cuda:
            s = stream if stream is not None else torch.cuda.current_stream(self.device)
            ev = _cuda.Event()
            ev.record(s)
            self._events[layer] = ev
        self._issued[layer] = True
        self._flags[layer].set()

    def issued(self, layer: int) -> bool:
        """Whether layer ``layer``'s copy was issued."""
        return self._issued[layer]

    def wait(self, layer: int, stream: Any = None) -> None:
        """Make ``stream`` (default: the current stream) wait on the GPU until layer ``layer`` has landed."""
        ev = self._events[layer]
        if ev is not None:
            s = stream if stream is not None else torch.cuda.current_stream(self.device)
            s.wait_event(ev)

    def wait_all(self, stream: Any = None) -> None:
        """:meth:`wait` for every layer."""
        for layer in range(self.num_layers):
            self.wait(layer, stream)

    def query(self, layer: int) -> bool:
        """Whether layer ``layer``'s copy has finished (``True`` for a layer without a copy)."""
        ev = self._events[layer]
        return True if ev is None else bool(ev.query())

    def synchronize(self) -> None:
        """Block the calling thread until every recorded copy finished."""
        for ev in self._events:
            if ev is not None:
                ev.synchronize()

    async def synchronize_async(self) -> None:
        """:meth:`synchronize` without blocking the event loop."""
        for ev in self._events:
            await await_cuda_event(ev)

    async def ready(self, layer: int) -> bool:
        """Wait until layer ``layer`` was issued or the restore ended; return whether it was issued."""
        await self._flags[layer].wait()
        return self._issued[layer]

    def _end(self) -> None:
        """The restore is over: wake every :meth:`ready` waiter."""
        for f in self._flags:
            f.set()


# --- the paged cache -------------------------------------------------------------------------------------
# Index kernels (CPU and CUDA) move one element per step: reinterpreting the bytes of a row (head_dim) with the
# widest type that divides it moves the same bytes in 8x fewer steps for fp16 (16-byte elements). Bit-exact.
_WIDE: tuple[tuple[torch.dtype, int], ...] = ((torch.complex128, 16), (torch.int64, 8), (torch.int32, 4))


def _wide(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``ts`` (same dtype and last dim) viewed with the widest element type all of them allow (same bytes)."""
    isz = ts[0].element_size()
    row = ts[0].shape[-1] * isz
    for dt, size in _WIDE:
        if size <= isz:
            break
        if row % size:
            continue
        try:
            return tuple(t.view(dt) for t in ts)
        except RuntimeError:  # strides or offset not compatible: try a narrower type
            continue
    return ts


def _as_caches(v: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    if isinstance(v, torch.Tensor):  # one stacked [L, 2, nb, bs, H, D] tensor: its layers
        return tuple(v.unbind(0))
    return tuple(v)


@attrs.frozen
class PagedKV:
    """One sequence's view of a paged KV cache.

    Parameters
    ----------
    kv_caches
        Per layer ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (vLLM's layout), CPU or CUDA, any
        strides (a ``[num_blocks, 2, ...]`` cache passes as ``cache.transpose(0, 1)``). A single stacked
        ``[L, 2, nb, bs, H, D]`` tensor is accepted too.
    block_ids
        The sequence's blocks in token order, 1-D int64 on the caches' device. A list of ints (or an integer
        tensor of another width) is converted to int64 on the caches' device.
    block_size
        Tokens per block.
    """

    kv_caches: tuple[torch.Tensor, ...] = attrs.field(converter=_as_caches)
    block_ids: torch.Tensor
    block_size: int

    def __attrs_post_init__(self) -> None:
        ids: Any = self.block_ids
        if not isinstance(ids, torch.Tensor):
            dev = self.kv_caches[0].device if self.kv_caches else torch.device("cpu")
            try:
                ids = torch.as_tensor(list(ids), dtype=torch.int64, device=dev)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise LayoutError(f"block_ids must be a 1-D int64 tensor or a list of ints: {exc}") from None
        elif ids.dtype != torch.int64 and not ids.dtype.is_floating_point and not ids.dtype.is_complex \
                and ids.dtype != torch.bool:
            ids = ids.to(torch.int64)
        object.__setattr__(self, "block_ids", ids)

    # --- geometry ----------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.kv_caches)

    @property
    def num_blocks(self) -> int:
        """Blocks of this sequence (``len(block_ids)``)."""
        return int(self.block_ids.shape[0]) if self.block_ids.dim() else 0

    @property
    def num_tokens(self) -> int:
        """Tokens the sequence's blocks hold: ``len(block_ids) * block_size``."""
        return self.num_blocks * self.block_size

    @property
    def device(self) -> torch.device:
        return self.kv_caches[0].device if self.kv_caches else self.block_ids.device

    @property
    def dtype(self) -> torch.dtype:
        if not self.kv_caches:
            raise LayoutError("PagedKV has no layers")
        return self.kv_caches[0].dtype

    def validate(self, layout: KVLayout) -> None:
        """Check the caches and the block table against ``layout``.

        Raises
        ------
        LayoutError
            On a dtype, head, head_dim, layer count or block_size mismatch; caches of different shapes or
            devices; a ``chunk_tokens`` that is not a multiple of ``block_size``; block ids that are not 1-D
            int64 on the caches' device, out of ``[0, num_blocks)``, or repeated.
        """
        bs = self.block_size
        if isinstance(bs, bool) or not isinstance(bs, int) or bs <= 0:
            raise LayoutError(f"block_size must be a positive int, got {bs!r}")
        if layout.chunk_tokens % bs:
            raise LayoutError(
                f"the layout's chunk_tokens ({layout.chunk_tokens}) must be a multiple of block_size ({bs})"
            )
        if len(self.kv_caches) != layout.num_layers:
            raise LayoutError(f"PagedKV has {len(self.kv_caches)} layers, the layout has {layout.num_layers}")
        first = self.kv_caches[0]
        for i, c in enumerate(self.kv_caches):
            if not isinstance(c, torch.Tensor):
                raise LayoutError(f"kv_caches[{i}] must be a torch.Tensor, got {type(c).__name__}")
            if c.dtype != layout.dtype:
                raise LayoutError(f"kv_caches[{i}].dtype is {c.dtype}, the layout has {layout.dtype}")
            if c.dim() != 5 or c.shape[0] != 2:
                raise LayoutError(
                    f"kv_caches[{i}] must be [2, num_blocks, block_size, num_kv_heads, head_dim], "
                    f"got shape {tuple(c.shape)}"
                )
            _, _, cbs, H, D = c.shape
            if cbs != bs:
                raise LayoutError(f"kv_caches[{i}] has blocks of {cbs} tokens, block_size is {bs}")
            if H != layout.num_kv_heads:
                raise LayoutError(f"kv_caches[{i}] has {H} kv heads, the layout has {layout.num_kv_heads}")
            if D != layout.head_dim:
                raise LayoutError(f"kv_caches[{i}] has head_dim {D}, the layout has {layout.head_dim}")
            if c.shape != first.shape:
                raise LayoutError(f"kv_caches[{i}] has shape {tuple(c.shape)}, layer 0 has {tuple(first.shape)}")
            if c.device != first.device:
                raise LayoutError(f"kv_caches[{i}] is on {c.device}, layer 0 on {first.device}")
        ids = self.block_ids
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64:
            what = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise LayoutError(f"block_ids must be an int64 tensor, got {what}")
        if ids.dim() != 1:
            raise LayoutError(f"block_ids must be 1-D, got shape {tuple(ids.shape)}")
        if ids.device != first.device:
            raise LayoutError(f"block_ids are on {ids.device}, the caches on {first.device}")
        if ids.numel():
            nb = first.shape[1]
            lo, hi = int(ids.min()), int(ids.max())  # one device sync per validate, not per layer
            if lo < 0 or hi >= nb:
                raise LayoutError(f"block ids must lie in [0, {nb}), got values in [{lo}, {hi}]")
            if torch.unique(ids).numel() != ids.numel():
                raise LayoutError("block_ids repeat a block: a sequence's blocks must be distinct")

    def _blocks(self, num_tokens: int, start_token: int) -> torch.Tensor:
        """The block ids covering tokens ``[start_token, start_token + num_tokens)`` (a view, no copy)."""
        bs = self.block_size
        if num_tokens % bs or start_token % bs:
            raise LayoutError(
                f"token range [{start_token}, {start_token + num_tokens}) is not aligned to block_size {bs}"
            )
        b0, b1 = start_token // bs, (start_token + num_tokens) // bs
        if start_token < 0 or b1 > self.num_blocks:
            raise LayoutError(
                f"token range [{start_token}, {start_token + num_tokens}) exceeds the sequence's "
                f"{self.num_tokens} tokens ({self.num_blocks} blocks)"
            )
        return self.block_ids[b0:b1]

    # --- data movement -----------------------------------------------------------------------------------
    def scatter_layer(
        self,
        layer: int,
        x: torch.Tensor,
        start_token: int = 0,
        *,
        stream: Any = None,
        staging: torch.Tensor | None = None,
    ) -> None:
        """Write ``x`` = ``[2, T, H, D]`` (tokens ``[start_token, start_token + T)``) into the blocks of ``layer``.

        ``T`` and ``start_token`` are multiples of ``block_size``. One indexing op (``index_copy_`` along the
        block dimension, on the rows' bytes viewed as 16-byte elements where they allow it), whatever the number
        of blocks. When the cache is on CUDA and ``x`` is not on its
        device, ``x`` is first copied (``non_blocking``; truly asynchronous when ``x`` is pinned) into
        ``staging`` (a device tensor with at least ``x.numel()`` elements; a fresh one by default). Both ops are
        issued on ``stream`` (default: the current stream); a pinned ``x`` must stay untouched until that
        stream has passed the copy.
        """
        cache = self.kv_caches[layer]
        if x.dim() != 4 or x.shape[0] != 2 or tuple(x.shape[2:]) != tuple(cache.shape[3:]):
            raise LayoutError(
                f"x must be [2, T, {cache.shape[3]}, {cache.shape[4]}], got shape {tuple(x.shape)}"
            )
        if x.dtype != cache.dtype:
            raise LayoutError(f"x.dtype is {x.dtype}, the cache holds {cache.dtype}")
        T = x.shape[1]
        ids = self._blocks(T, start_token)
        n, bs = T // self.block_size, self.block_size
        if cache.device.type == "cuda":
            s = stream if stream is not None else torch.cuda.current_stream(cache.device)
            with torch.cuda.stream(s):
                if x.device != cache.device:
                    if staging is None:
                        dev = torch.empty(x.shape, dtype=x.dtype, device=cache.device)
                    else:
                        if staging.device != cache.device or staging.dtype != x.dtype:
                            raise LayoutError("staging must be on the cache's device, of the cache's dtype")
                        dev = staging.view(-1)[: x.numel()].view(x.shape)
                    dev.copy_(x, non_blocking=True)
                    x = dev
                dst, val = _wide(cache, x.reshape(2, n, bs, *x.shape[2:]))
                dst.index_copy_(1, ids, val)
            return
        if x.device != cache.device:
            x = x.to(cache.device)
        dst, val = _wide(cache, x.reshape(2, n, bs, *x.shape[2:]))
        dst.index_copy_(1, ids, val)

    def gather_layer(self, layer: int, num_tokens: int, start_token: int = 0) -> torch.Tensor:
        """Tokens ``[start_token, start_token + num_tokens)`` of ``layer``: a new contiguous ``[2, T, H, D]``
        on the caches' device, one ``index_select``."""
        cache = self.kv_caches[layer]
        ids = self._blocks(num_tokens, start_token)
        (src,) = _wide(cache)
        out = torch.index_select(src, 1, ids)  # [2, n, bs, H, D'], contiguous
        return out.view(cache.dtype).view(2, num_tokens, cache.shape[3], cache.shape[4])

    def gather_chunk(self, layout: KVLayout, chunk: int) -> torch.Tensor:
        """Chunk ``chunk`` of the sequence packed as ``[L, 2, chunk_tokens, H, D]`` on the caches' device (the
        object's bytes, ready for :meth:`kvpool.KVPool.put`): one ``index_select`` per layer into the result."""
        ct = layout.chunk_tokens
        if ct % self.block_size:
            raise LayoutError(f"chunk_tokens ({ct}) must be a multiple of block_size ({self.block_size})")
        ids = self._blocks(ct, chunk * ct)
        n, bs = ct // self.block_size, self.block_size
        out = torch.empty(layout.kv_shape(ct), dtype=self.dtype, device=self.device)
        for layer, cache in enumerate(self.kv_caches):
            src, dst = _wide(cache, out[layer].view(2, n, bs, cache.shape[3], cache.shape[4]))
            torch.index_select(src, 1, ids, out=dst)
        return out


# --- pool operations -------------------------------------------------------------------------------------
async def _host_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    if src.numel() * src.element_size() >= _OFFLOAD_BYTES:
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
                if x.numel() * x.element_size() >= _OFFLOAD_BYTES:
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
    for tier in pool.tiers:
        if not all(await tier.contains_many(keys)):
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
            c, dst = _wide(cache, host[layer].view(2, nb, bs, cache.shape[3], cache.shape[4]))
            torch.index_select(c, 1, ids, out=dst)
        return await pool.put(arr, host)

    host = pinned_empty(layout.kv_shape(n), layout.dtype, page_aligned=True)
    try:
        s = restore_stream(src.device)
        s.wait_stream(torch.cuda.current_stream(src.device))
        with torch.cuda.stream(s):
            for layer in range(layout.num_layers):
                host[layer].copy_(src.gather_layer(layer, n), non_blocking=True)
            ev = _cuda.Event()
            ev.record(s)
        await await_cuda_event(ev)
        return await pool.put(arr, host)
    finally:
        unregister_host_memory(host)  # only if pinned_empty had to register an aligned tensor

