"""Test data for the conformance suite: random keys and bytes, and a tensor's bytes as the store sees them."""

from __future__ import annotations

import os

import torch

__all__ = ["rand_bytes", "rand_key", "raw_bytes"]


def rand_key() -> bytes:
    """A fresh 16-byte key."""
    return os.urandom(16)


def rand_bytes(n: int, seed: int | None = None) -> torch.Tensor:
    """``n`` random bytes as a uint8 tensor, reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)


def raw_bytes(t: torch.Tensor) -> bytes:
    """The row-major bytes of ``t`` (any dtype, shape, strides, device): what a backend stores for it."""
    # a fresh tensor, not .contiguous(): a size-1 dim may keep an odd stride that a dtype view refuses
    flat = torch.empty(t.shape, dtype=t.dtype).copy_(t.detach()).reshape(-1).view(torch.uint8)
    return bytes(flat.numpy().tobytes())
