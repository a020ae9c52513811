"""Adapters between kvpool and model runtimes.

Each integration lives in its own module and imports its runtime lazily, so ``import kvpool`` never pulls in
a heavy framework:

- :mod:`kvpool.integrations.transformers` -- Hugging Face ``transformers`` causal LMs (``DynamicCache``):
  layout from a config, cache <-> ``[L, 2, T, H, D]`` conversion, and :func:`prefill_with_pool`, a prefill
  that restores the cached prefix from the pool (optionally layer by layer, overlapping the forward pass).
"""

from __future__ import annotations

__all__: list[str] = []
