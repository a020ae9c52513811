"""Byte ranges of tensors for the striped tier: an object's row-major bytes cut into pieces as views of the
caller's tensor (no packing copy) wherever its strides allow."""

from __future__ import annotations

import math

import torch

from ..storage.buffers import aligned_empty

__all__ = ["aligned_bytes", "byte_range", "granules", "row_view"]


def aligned_bytes(n: int) -> torch.Tensor:
    """Page-aligned I/O memory (huge-page advised when large) for reads that need a contiguous staging copy."""
    return aligned_empty((n,), torch.uint8)


def row_view(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``t`` seen as ``[R, *rest]`` with as many leading dims merged as its strides allow (no copy), and the
    bytes of one row. A contiguous tensor is one flat run of bytes (rows of 1 byte)."""
    if t.is_contiguous():
        return t.reshape(-1).view(torch.uint8), 1
    shape, strides = list(t.shape), list(t.stride())
    rows, rstride = 1, 0
    d = 0
    while d < len(shape):
        s, st = shape[d], strides[d]
        if s == 1:
            d += 1
            continue
        if rows == 1:
            rows, rstride = s, st
        elif rstride == st * s:
            rows, rstride = rows * s, st
        else:
            break
        d += 1
    rest_shape, rest_strides = shape[d:], strides[d:]
    row_bytes = math.prod(rest_shape) * t.element_size()
    view = torch.as_strided(t, [rows, *rest_shape], [rstride, *rest_strides], t.storage_offset())
    return view, row_bytes


def byte_range(rv: tuple[torch.Tensor, int], start: int, stop: int) -> torch.Tensor | None:
    """The view of row-major bytes ``[start, stop)`` of a tensor (given by :func:`row_view`), or ``None``
    when those bytes are not one view of it (the range cuts rows of a strided tensor)."""
    view, rb = rv
    if start % rb or stop % rb:
        return None
    return view[start // rb : stop // rb]


def granules(t: torch.Tensor, row_bytes: int) -> list[int]:
    """Natural split granules of an object written from ``t``: the byte sizes of its sub-tensors along
    leading dims (coarsest first), keeping only those the source can be cut at without a copy."""
    out = []
    isz = t.element_size()
    for k in range(1, t.dim()):
        g = math.prod(t.shape[k:]) * isz
        if g > 0 and g % row_bytes == 0:
            out.append(g)
    return sorted(set(out), reverse=True)
