"""vLLM pages <-> kvpool objects.

vLLM keeps, per attention layer, one tensor whose dim 0 is the block: on CPU ``[num_blocks, H, block_size,
2 * head_dim]`` (K and V fused per row); one block of one layer is a contiguous *page* of ``2 * block_size * H *
head_dim`` elements. kvpool never looks inside a page: a stored object (one chunk of ``chunk_tokens`` tokens) is,
per layer, the chunk's ``chunk_tokens / block_size`` pages in token order -- the same byte count as kvpool's own
``[2, chunk_tokens, H, D]`` layer range, so a plain :class:`~kvpool.KVLayout` of the model's geometry sizes it.
Because those bytes are in the engine's page order and not kvpool's K|V order, the page format (shape,
dtype, block size, format version) is written into the pool's ``model_id`` and so into every key: an engine
with another page format (another block size, a GPU layout, another dtype) can never read these objects as
its own.

Moving bytes. :meth:`kvpool.KVPool.stream` yields one layer as ``x = [2, T, H, D]``, where chunk ``c``'s
object range was read into ``x[0, c]`` (first half) and ``x[1, c]`` (second half). In units of half a page
(``block_size * H * D`` elements) both sides are plain rows, so one layer is one ``index_copy_`` of rows into
the cache (restore) or one ``index_select`` of rows out of it (store), whatever the number of blocks; the index
vectors are computed once per request, not per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...layout import KVLayout

__all__ = ["PAGE_FORMAT_VERSION", "PageFormat", "unit_index", "wide_rows"]

PAGE_FORMAT_VERSION = "kvpool-vllm-page-v1"


@dataclass(frozen=True)
class PageFormat:
    """The page format of one engine's KV cache: what a stored object's bytes mean."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    page_shape: tuple[int, ...]  # one block of one layer, e.g. (H, block_size, 2 * head_dim) on CPU
    kind: str = "block-major"  # dim 0 of each layer's cache is the block

    def __post_init__(self) -> None:
        if math.prod(self.page_shape) != 2 * self.block_size * self.num_kv_heads * self.head_dim:
            raise ValueError(
                f"a page of shape {self.page_shape} does not hold K and V of {self.block_size} tokens x "
                f"{self.num_kv_heads} heads x {self.head_dim}"
            )

    @property
    def page_elems(self) -> int:
        return math.prod(self.page_shape)

    @property
    def unit_elems(self) -> int:
        """Half a page: the row both sides agree on."""
        return self.page_elems // 2

    def describe(self) -> str:
        shape = "x".join(str(s) for s in self.page_shape)
        return f"{PAGE_FORMAT_VERSION}:{self.kind}:page={shape}:bs={self.block_size}:{self.dtype}"

    def model_id(self, model: str) -> str:
        """The pool's ``model_id``: the model's name and revision plus this page format."""
        return f"{model}|{self.describe()}"

    def layout(self, chunk_tokens: int) -> KVLayout:
        if chunk_tokens % self.block_size:
            raise ValueError(f"chunk_tokens ({chunk_tokens}) must be a multiple of block_size ({self.block_size})")
        lay = KVLayout(num_layers=self.num_layers, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                       dtype=self.dtype, chunk_tokens=chunk_tokens)
        assert lay.layer_nbytes == chunk_tokens // self.block_size * self.page_elems * lay.itemsize
        return lay


def unit_index(block_ids: torch.Tensor, pages_per_chunk: int) -> torch.Tensor:
    """Cache rows (half pages) in the order of a stream layer ``x.view(-1, unit)`` for whole chunks.

    ``block_ids`` are the blocks of ``n`` consecutive chunks (``n * pages_per_chunk`` ids, token order). Row
    ``(k, c, u)`` of ``x`` (half ``k`` of chunk ``c``'s object range, unit ``u`` in it) holds object unit
    ``k * ppc + u`` of chunk ``c``, i.e. half ``(k * ppc + u) % 2`` of block ``c * ppc + (k * ppc + u) // 2``.
    """
    ppc = pages_per_chunk
    b = block_ids.to(torch.int64).view(-1, ppc)  # [n, ppc]
    n = b.shape[0]
    rows = (2 * b).repeat_interleave(2, dim=1) + torch.arange(2, dtype=torch.int64).repeat(ppc)  # [n, 2ppc]
    return rows.view(n, 2, ppc).permute(1, 0, 2).reshape(-1)


# Index kernels move one element per step: view rows with the widest element type their bytes allow.
_WIDE = ((torch.complex128, 16), (torch.int64, 8), (torch.int32, 4))


def wide_rows(t: torch.Tensor, unit_elems: int) -> torch.Tensor:
    """``t`` (contiguous) as rows of ``unit_elems`` elements, viewed with the widest element type that fits."""
    rows = t.view(-1, unit_elems)
    nbytes = unit_elems * t.element_size()
    for dt, size in _WIDE:
        if size <= t.element_size():
            break
        if nbytes % size == 0:
            try:
                return rows.view(dt)
            except RuntimeError:
                continue
    return rows
