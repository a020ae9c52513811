"""tensor_runs: the contiguous byte runs of a strided tensor, in row-major order."""

from __future__ import annotations

import ctypes

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpool.storage.buffers import tensor_runs
from kvpool.testing.backend_tests import raw_bytes


@st.composite
def strided_views(draw: st.DrawFn) -> torch.Tensor:
    ndim = draw(st.integers(1, 4))
    shape = [draw(st.integers(1, 6)) for _ in range(ndim)]
    dtype = draw(st.sampled_from([torch.uint8, torch.float16, torch.float32, torch.int64]))
    base = torch.arange(int(torch.tensor(shape).prod()), dtype=torch.int64).to(dtype).reshape(shape)
    idx = []
    for n in shape:  # a slice of every dim, with a step: a non-contiguous view in general
        start = draw(st.integers(0, n - 1))
        stop = draw(st.integers(start + 1, n))
        step = draw(st.integers(1, 2))
        idx.append(slice(start, stop, step))
    view = base[tuple(idx)]
    if ndim > 1 and draw(st.booleans()):
        view = view.transpose(0, ndim - 1)
    return view


@settings(max_examples=200, deadline=None)
@given(strided_views())
def test_runs_concatenate_to_the_row_major_bytes(t: torch.Tensor) -> None:
    runs = tensor_runs(t)
    got = b"".join(ctypes.string_at(addr, n) for addr, n in runs)
    assert got == raw_bytes(t)
    assert sum(n for _, n in runs) == t.numel() * t.element_size()
    if t.is_contiguous():
        assert len(runs) == 1
    assert tensor_runs(t, limit=len(runs)) == runs
    if len(runs) > 1:
        assert tensor_runs(t, limit=len(runs) - 1) is None


def test_kv_chunk_view_has_one_run_per_layer_and_half() -> None:
    kv = torch.zeros(4, 2, 64, 2, 8, dtype=torch.float16)
    assert len(tensor_runs(kv[:, :, 16:32])) == 8  # [L][K|V] each one contiguous run of tokens
    assert tensor_runs(torch.empty(0)) == []
