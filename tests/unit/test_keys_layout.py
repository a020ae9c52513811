"""Keys (token validation, chained prefix hashes) and the KV layout's byte arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpool.errors import LayoutError
from kvpool.keys import PrefixHasher, as_token_array
from kvpool.layout import KVLayout
from kvpool.testing.backend_tests import raw_bytes

LAYOUT = KVLayout(num_layers=3, num_kv_heads=2, head_dim=4, dtype=torch.float16, chunk_tokens=8)


# --- tokens ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("good", [[1, 2, 3], (0, 2**32 - 1), np.arange(5, dtype=np.int64), torch.arange(4)])
def test_token_arrays(good: object) -> None:
    arr = as_token_array(good)
    assert arr.dtype == np.dtype("<u4") and arr.flags.c_contiguous
    assert list(arr) == [int(x) for x in good]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("bad", "err"),
    [([1.5], TypeError), ([True, 2], TypeError), ("abc", TypeError), ({1, 2}, TypeError),
     (np.zeros((2, 2), dtype=np.int32), TypeError), (torch.tensor([1.0]), TypeError), ([-1], ValueError),
     ([2**32], ValueError), (np.array([-3]), ValueError)],
)
def test_token_errors(bad: object, err: type[Exception]) -> None:
    with pytest.raises(err):
        as_token_array(bad)


# --- chained keys ------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), max_size=80), st.integers(0, 80))
def test_keys_are_prefix_closed(tokens: list[int], cut: int) -> None:
    h = PrefixHasher("m", LAYOUT.fingerprint, 8)
    full = h.keys(tokens)
    assert len(full) == len(tokens) // 8  # a trailing partial chunk has no key
    assert h.keys(tokens[:cut]) == full[: cut // 8]  # a prefix's keys are a prefix of the keys
    assert h.keys(tokens, max_chunks=2) == full[:2]
    assert all(len(k) == 16 for k in full)
    assert len(set(full)) == len(full)


def test_keys_bind_the_whole_prefix_model_layout_and_namespace() -> None:
    t = list(range(32))
    base = PrefixHasher("m", LAYOUT.fingerprint, 8).keys(t)
    changed = t.copy()
    changed[0] = 999  # a change in chunk 0 changes every later key
    assert all(a != b for a, b in zip(base, PrefixHasher("m", LAYOUT.fingerprint, 8).keys(changed)))
    other_layout = KVLayout(num_layers=3, num_kv_heads=2, head_dim=4, dtype=torch.bfloat16, chunk_tokens=8)
    for h in (PrefixHasher("m2", LAYOUT.fingerprint, 8), PrefixHasher("m", other_layout.fingerprint, 8),
              PrefixHasher("m", LAYOUT.fingerprint, 8, namespace="tenant")):
        assert not set(h.keys(t)) & set(base)
    assert PrefixHasher("m", LAYOUT.fingerprint, 8).keys(np.array(t)) == base  # stable across input types
    with pytest.raises(ValueError):
        PrefixHasher("", LAYOUT.fingerprint, 8)


# --- layout ------------------------------------------------------------------------------------------------
def test_layout_sizes() -> None:
    assert LAYOUT.itemsize == 2
    assert LAYOUT.token_nbytes == 2 * 4 * 2
    assert LAYOUT.layer_nbytes == 2 * 8 * 16
    assert LAYOUT.chunk_nbytes == 3 * LAYOUT.layer_nbytes
    assert [LAYOUT.layer_offset(i) for i in range(3)] == [0, 256, 512]
    with pytest.raises(LayoutError):
        LAYOUT.layer_offset(3)
    with pytest.raises((ValueError, TypeError)):
        KVLayout(num_layers=0, num_kv_heads=1, head_dim=1, dtype=torch.float16)


def test_a_layer_of_a_chunk_is_one_contiguous_byte_range() -> None:
    kv = torch.randn(LAYOUT.kv_shape(24)).half()
    for c in range(3):
        obj = raw_bytes(LAYOUT.chunk_view(kv, c))
        assert len(obj) == LAYOUT.chunk_nbytes
        for layer in range(3):
            x = kv[layer]  # [2, T, H, D]: one layer of every chunk
            want = raw_bytes(LAYOUT.layer_chunk_view(x, c))
            off = LAYOUT.layer_offset(layer)
            assert obj[off : off + LAYOUT.layer_nbytes] == want


def test_fingerprint_and_check_kv() -> None:
    same = KVLayout(num_layers=3, num_kv_heads=2, head_dim=4, dtype=torch.float16, chunk_tokens=8)
    assert same.fingerprint == LAYOUT.fingerprint and len(LAYOUT.fingerprint) == 16
    for other in (KVLayout(num_layers=4, num_kv_heads=2, head_dim=4, dtype=torch.float16, chunk_tokens=8),
                  KVLayout(num_layers=3, num_kv_heads=2, head_dim=4, dtype=torch.float16, chunk_tokens=16)):
        assert other.fingerprint != LAYOUT.fingerprint
    good = torch.zeros(LAYOUT.kv_shape(8), dtype=torch.float16)
    assert LAYOUT.check_kv(good) is good
    for bad in (good.float(), good[0], torch.zeros(3, 3, 8, 2, 4, dtype=torch.float16),
                torch.zeros(3, 2, 8, 1, 4, dtype=torch.float16), [1, 2]):
        with pytest.raises(LayoutError):
            LAYOUT.check_kv(bad)
    with pytest.raises(LayoutError, match="tokens"):
        LAYOUT.check_kv(good, num_tokens=9)
