"""PagedKV: one sequence's view of a serving engine's paged KV cache, with one-launch-per-layer gather/scatter.

Serving engines (vLLM and friends) keep the KV cache in fixed-size blocks: per layer one tensor
``[2, num_blocks, block_size, num_kv_heads, head_dim]``, and per sequence a *block table*, the ids of its
blocks in token order. Moving a layer never costs CPU time per block: one index kernel per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import torch

from ..errors import LayoutError
from ..layout import KVLayout

__all__ = ["PagedKV", "widest_view"]

# Index kernels (CPU and CUDA) move one element per step: reinterpreting the bytes of a row (head_dim) with the
# widest type that divides it moves the same bytes in 8x fewer steps for fp16 (16-byte elements). Bit-exact.
_WIDE: tuple[tuple[torch.dtype, int], ...] = ((torch.complex128, 16), (torch.int64, 8), (torch.int32, 4))


def widest_view(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
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
                dst, val = widest_view(cache, x.reshape(2, n, bs, *x.shape[2:]))
                dst.index_copy_(1, ids, val)
            return
        if x.device != cache.device:
            x = x.to(cache.device)
        dst, val = widest_view(cache, x.reshape(2, n, bs, *x.shape[2:]))
        dst.index_copy_(1, ids, val)

    def gather_layer(self, layer: int, num_tokens: int, start_token: int = 0) -> torch.Tensor:
        """Tokens ``[start_token, start_token + num_tokens)`` of ``layer``: a new contiguous ``[2, T, H, D]``
        on the caches' device, one ``index_select``."""
        cache = self.kv_caches[layer]
        ids = self._blocks(num_tokens, start_token)
        (src,) = widest_view(cache)
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
            src, dst = widest_view(cache, out[layer].view(2, n, bs, cache.shape[3], cache.shape[4]))
            torch.index_select(src, 1, ids, out=dst)
        return out

