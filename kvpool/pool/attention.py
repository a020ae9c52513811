"""Attention scores a caller reports for a prompt, reduced to one mass per chunk (for attention-aware
eviction)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["per_chunk_mass"]


def per_chunk_mass(scores: Any, num_chunks: int, chunk_tokens: int) -> list[float]:
    """``scores`` per chunk (``len == num_chunks``) or per token (``len >= num_chunks * chunk_tokens``,
    summed per chunk), as one float per chunk.

    Raises
    ------
    ValueError
        For another length, or scores that are not finite and non-negative.
    """
    mass = torch.as_tensor(scores, dtype=torch.float64).flatten()
    n, ct = num_chunks, chunk_tokens
    if mass.numel() == n:
        per_chunk = mass
    elif mass.numel() >= n * ct:
        per_chunk = mass[: n * ct].view(n, ct).sum(dim=1)
    else:
        raise ValueError(f"scores must have one value per chunk ({n}) or per token (>= {n * ct}), got {mass.numel()}")
    if not torch.isfinite(per_chunk).all() or (per_chunk < 0).any():
        raise ValueError("attention scores must be finite and non-negative")
    return [float(v) for v in per_chunk.tolist()]
