"""Prompt tokens -> chunk keys: chunking and chained prefix hashing.

key_0 = H(seed, tokens of chunk 0), key_i = H(key_{i-1}, tokens of chunk i), with
seed = H("kvpool-keys-v1", model_id, layout fingerprint, namespace). H is BLAKE3 truncated to 128 bits:
stable across processes, machines and Python versions (never ``hash()``), and cryptographic, so one tenant
cannot craft a prompt whose key collides with another's cached prefix. A key therefore binds the model, the
layout and *every* earlier token: equal keys mean equal prefixes.

Tokens are hashed as little-endian uint32, so the same prompt given as a list, a numpy array or a torch
tensor of any integer dtype yields the same keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import blake3
import numpy as np
import torch

__all__ = ["KEY_BYTES", "PrefixHasher", "as_token_array"]

KEY_BYTES = 16
_MAX_TOKEN = 2**32 - 1
_U4 = np.dtype("<u4")


def as_token_array(tokens: Any) -> np.ndarray[Any, np.dtype[np.uint32]]:
    """Validate ``tokens`` and return them as a contiguous little-endian uint32 array.

    Accepts a sequence of ints, a 1-D integer numpy array or a 1-D integer torch tensor.

    Raises
    ------
    TypeError
        For non-integer tokens (floats, bools, strings) or a container that is not 1-D.
    ValueError
        For negative tokens or tokens >= 2**32.
    """
    if type(tokens) is np.ndarray and tokens.dtype == _U4 and tokens.ndim == 1 and tokens.flags.c_contiguous:
        return tokens  # already canonical (e.g. validated once by the caller)
    if isinstance(tokens, torch.Tensor):
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must be integers, got a tensor of {tokens.dtype}")
        arr: np.ndarray[Any, Any] = tokens.detach().cpu().numpy()
    elif isinstance(tokens, np.ndarray):
        arr = tokens
    elif isinstance(tokens, (str, bytes, bytearray)):
        raise TypeError(f"tokens must be a sequence of ints, got {type(tokens).__name__}")
    elif isinstance(tokens, Sequence):
        # Only ordered, re-readable containers: a set has no token order and a generator would be consumed
        # by the first of the several passes a call makes over its tokens.
        seq = tokens
        if len(seq) == 0:
            return np.empty(0, dtype="<u4")
        if bool in map(type, seq):  # numpy would silently turn True into 1
            raise TypeError("tokens must be ints, got a bool among them")
        try:
            arr = np.asarray(seq)
        except (ValueError, OverflowError) as exc:
            raise TypeError(f"tokens must be a flat sequence of ints: {exc}") from None
        if arr.dtype == object:
            # Mixed big ints or non-numbers; check the elements one by one to give a precise error.
            for t in seq:
                if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                    raise TypeError(f"tokens must be ints, got {type(t).__name__} ({t!r})")
            if any(t < 0 for t in seq):
                raise ValueError("tokens must be non-negative")
            raise ValueError(f"tokens must be < 2**32, got {max(seq)}")
    else:
        raise TypeError(
            f"tokens must be a sequence of ints (list, tuple) or a 1-D integer array, got {type(tokens).__name__}"
        )
    if arr.ndim != 1:
        raise TypeError(f"tokens must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return np.empty(0, dtype="<u4")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"tokens must be integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "i" and int(arr.min()) < 0:
        raise ValueError(f"tokens must be non-negative, got {int(arr.min())}")
    if arr.dtype.itemsize > 4 and int(arr.max()) > _MAX_TOKEN:
        raise ValueError(f"tokens must be < 2**32, got {int(arr.max())}")
    return np.ascontiguousarray(arr, dtype="<u4")


class PrefixHasher:
    """Cuts a prompt into chunks and names each by a chained 128-bit hash of its whole prefix.

    Parameters
    ----------
    model_id
        Name of the model (and weights revision) whose KV this is.
    layout_fingerprint
        :attr:`KVLayout.fingerprint`.
    chunk_tokens
        Tokens per chunk.
    namespace
        Optional tenant / adapter / salt; different namespaces never share keys.
    """

    def __init__(self, model_id: str, layout_fingerprint: bytes, chunk_tokens: int, namespace: str = "") -> None:
        if not isinstance(model_id, str) or not model_id:
            raise ValueError("model_id must be a non-empty str")
        self.chunk_tokens = chunk_tokens
        h = blake3.blake3(b"kvpool-keys-v1\0")
        for part in (model_id.encode(), layout_fingerprint, namespace.encode()):
            h.update(len(part).to_bytes(4, "little"))
            h.update(part)
        self.seed = h.digest(length=KEY_BYTES)

    def num_chunks(self, num_tokens: int) -> int:
        return num_tokens // self.chunk_tokens

    def keys(self, tokens: Any, max_chunks: int | None = None) -> list[bytes]:
        """Keys of every full chunk of ``tokens`` (a trailing partial chunk has none)."""
        arr = as_token_array(tokens)
        n = len(arr) // self.chunk_tokens
        if max_chunks is not None:
            n = min(n, max_chunks)
        if n == 0:
            return []
        step = self.chunk_tokens * 4
        data = memoryview(arr[: n * self.chunk_tokens].tobytes())
        out: list[bytes] = []
        prev = self.seed
        new = blake3.blake3
        for i in range(n):
            h = new(prev)
            h.update(data[i * step : (i + 1) * step])
            prev = h.digest(length=KEY_BYTES)
            out.append(prev)
        return out
