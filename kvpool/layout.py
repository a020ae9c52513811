"""KVLayout: the shape of a model's KV cache, and the mapping between caller tensors and stored objects.

The caller's convention is one tensor ``[num_layers, 2, num_tokens, num_kv_heads, head_dim]`` (2 = K, V).
One stored object is one chunk of ``chunk_tokens`` tokens, all layers, laid out layer-major
``[layer][K|V][token][head][dim]`` -- which is exactly the row-major byte order of the strided view
``kv[:, :, t0:t1]``. So packing a chunk is a view, not a copy: backends copy (or DMA) straight between the
caller's tensor and their storage, and one layer of a chunk (``layer_nbytes`` at ``layer_offset(l)``) is one
contiguous byte range, the unit of a layer-wise read.
"""

from __future__ import annotations

from typing import Any

import attrs
import blake3
import torch

from .errors import LayoutError

__all__ = ["KVLayout"]


def _positive(_inst: Any, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise LayoutError(f"KVLayout.{attribute.name} must be a positive int, got {value!r}")


def _dtype(_inst: Any, _attribute: attrs.Attribute[torch.dtype], value: torch.dtype) -> None:
    if not isinstance(value, torch.dtype):
        raise LayoutError(f"KVLayout.dtype must be a torch.dtype, got {value!r}")
    if value.is_complex or value == torch.bool:
        raise LayoutError(f"KVLayout.dtype {value} is not a KV cache dtype")


@attrs.frozen
class KVLayout:
    """The KV cache geometry of one model; its fingerprint is part of every key.

    Parameters
    ----------
    num_layers, num_kv_heads, head_dim
        The model's attention geometry (KV heads, not query heads).
    dtype
        Element type of the cache, e.g. ``torch.bfloat16``.
    chunk_tokens
        Tokens per stored object (default 256): big enough that the device sees big I/Os.
    """

    num_layers: int = attrs.field(validator=_positive)
    num_kv_heads: int = attrs.field(validator=_positive)
    head_dim: int = attrs.field(validator=_positive)
    dtype: torch.dtype = attrs.field(validator=_dtype)
    chunk_tokens: int = attrs.field(default=256, validator=_positive)

    # --- sizes -------------------------------------------------------------------------------------------
    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def token_nbytes(self) -> int:
        """Bytes of K (or V) for one token of one layer."""
        return self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def layer_nbytes(self) -> int:
        """Bytes of one layer (K and V) of one chunk: one contiguous range of an object."""
        return 2 * self.chunk_tokens * self.token_nbytes

    @property
    def chunk_nbytes(self) -> int:
        """Bytes of one stored object (one chunk, all layers)."""
        return self.num_layers * self.layer_nbytes

    def layer_offset(self, layer: int) -> int:
        """Byte offset of ``layer`` inside an object."""
        if not 0 <= layer < self.num_layers:
            raise LayoutError(f"layer {layer} out of range [0, {self.num_layers})")
        return layer * self.layer_nbytes

    @property
    def fingerprint(self) -> bytes:
        """A 16-byte digest of everything that changes the bytes of an object."""
        text = (
            f"kvpool-layout-v1|{self.num_layers}|{self.num_kv_heads}|{self.head_dim}|"
            f"{self.dtype}|{self.chunk_tokens}"
        )
        return blake3.blake3(text.encode()).digest(length=16)

    # --- caller tensors ----------------------------------------------------------------------------------
    def kv_shape(self, num_tokens: int) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, num_tokens, self.num_kv_heads, self.head_dim)

    def check_kv(self, kv: Any, num_tokens: int | None = None, *, name: str = "kv") -> torch.Tensor:
        """Validate a caller tensor ``[L, 2, T, H, D]``; return it. ``num_tokens`` bounds T from below."""
        if not isinstance(kv, torch.Tensor):
            raise LayoutError(f"{name} must be a torch.Tensor, got {type(kv).__name__}")
        if kv.dtype != self.dtype:
            raise LayoutError(f"{name}.dtype is {kv.dtype}, the pool's layout has {self.dtype}")
        if kv.dim() != 5:
            raise LayoutError(
                f"{name} must have 5 dims [num_layers, 2, num_tokens, num_kv_heads, head_dim], "
                f"got shape {tuple(kv.shape)}"
            )
        L, two, T, H, D = kv.shape
        if L != self.num_layers:
            raise LayoutError(f"{name} has {L} layers, the layout has {self.num_layers}")
        if two != 2:
            raise LayoutError(f"{name} dim 1 must be 2 (K, V), got {two}")
        if H != self.num_kv_heads:
            raise LayoutError(f"{name} has {H} kv heads, the layout has {self.num_kv_heads}")
        if D != self.head_dim:
            raise LayoutError(f"{name} has head_dim {D}, the layout has {self.head_dim}")
        if num_tokens is not None and T < num_tokens:
            raise LayoutError(f"{name} holds {T} tokens, {num_tokens} are needed")
        return kv

    def chunk_view(self, kv: torch.Tensor, chunk: int) -> torch.Tensor:
        """The strided view of chunk ``chunk`` of ``kv``; its row-major bytes are the object's bytes."""
        t0 = chunk * self.chunk_tokens
        return kv[:, :, t0 : t0 + self.chunk_tokens]

    def layer_chunk_view(self, x: torch.Tensor, chunk: int) -> torch.Tensor:
        """For a one-layer tensor ``[2, T, H, D]``: the view of chunk ``chunk`` (one layer range of an object)."""
        t0 = chunk * self.chunk_tokens
        return x[:, t0 : t0 + self.chunk_tokens]
