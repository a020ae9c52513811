"""kvpool.pool.paged on the CPU: PagedKV validation, scatter/gather, put_paged/restore_paged through real pools, and a
structural check that the work per layer does not grow with the number of blocks."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from kvpool import KVLayout, KVPool, LayoutError
from kvpool.cuda.events import LayerEvents
from kvpool.cuda.host import gds_available, pinned_empty, register_host_memory, registered_host_memory, unregister_host_memory
from kvpool.cuda.paged_kv import PagedKV
from kvpool.pool.paged import put_paged, restore_paged

LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=16, dtype=torch.bfloat16, chunk_tokens=16)
BS = 4  # tokens per block: 4 blocks per chunk


def caches(num_blocks: int, layout: KVLayout = LAYOUT, bs: int = BS, seed: int | None = None,
           fill: float | None = None) -> list[torch.Tensor]:
    shape = (2, num_blocks, bs, layout.num_kv_heads, layout.head_dim)
    if fill is not None:
        return [torch.full(shape, fill, dtype=layout.dtype) for _ in range(layout.num_layers)]
    g = torch.Generator().manual_seed(seed or 0)
    return [torch.randn(shape, generator=g).to(layout.dtype) for _ in range(layout.num_layers)]


def shuffled_ids(num_blocks: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(num_blocks, generator=g)[:n]


def toks(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, 50_000, n).tolist()


def bits(t: torch.Tensor) -> torch.Tensor:
    """Compare bytes, not values (bf16 NaN patterns, -0.0)."""
    return t.contiguous().view(torch.int16)


def logical(p: PagedKV, n: int) -> torch.Tensor:
    """The sequence's first n tokens as [L, 2, n, H, D], by indexing block by block (an independent reference)."""
    out = []
    for cache in p.kv_caches:
        per_block = [cache[:, int(b)] for b in p.block_ids[: n // p.block_size]]
        out.append(torch.cat(per_block, dim=1))
    return torch.stack(out)


# --- validation ------------------------------------------------------------------------------------------
def test_geometry_properties() -> None:
    p = PagedKV(caches(32), shuffled_ids(32, 10, 1), BS)
    p.validate(LAYOUT)
    assert p.num_tokens == 40 and p.num_layers == 4 and p.num_blocks == 10
    assert p.device == torch.device("cpu") and p.dtype == torch.bfloat16


def test_block_ids_conversion() -> None:
    p = PagedKV(caches(8), [3, 1, 2], BS)
    assert p.block_ids.dtype == torch.int64 and p.block_ids.tolist() == [3, 1, 2]
    p.validate(LAYOUT)
    p32 = PagedKV(caches(8), torch.tensor([5, 0], dtype=torch.int32), BS)
    assert p32.block_ids.dtype == torch.int64
    p32.validate(LAYOUT)
    stacked = PagedKV(torch.stack(caches(8)), [0, 1], BS)  # one [L, 2, nb, bs, H, D] tensor
    assert stacked.num_layers == 4
    stacked.validate(LAYOUT)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: PagedKV(caches(8, LAYOUT), [0, 1], 3), "multiple of block_size"),
        (lambda: PagedKV([c.float() for c in caches(8)], [0, 1], BS), "dtype"),
        (lambda: PagedKV(caches(8)[:3], [0, 1], BS), "layers"),
        (lambda: PagedKV(caches(8, KVLayout(4, 3, 16, torch.bfloat16, 16)), [0], BS), "kv heads"),
        (lambda: PagedKV(caches(8, KVLayout(4, 2, 8, torch.bfloat16, 16)), [0], BS), "head_dim"),
        (lambda: PagedKV(caches(8, bs=8), [0], BS), "blocks of 8 tokens"),
        (lambda: PagedKV(caches(8), [0, 8], BS), r"\[0, 8\)"),
        (lambda: PagedKV(caches(8), [-1, 2], BS), r"\[0, 8\)"),
        (lambda: PagedKV(caches(8), torch.tensor([0.0, 1.0]), BS), "int64"),
        (lambda: PagedKV(caches(8), torch.tensor([[0, 1]]), BS), "1-D"),
        (lambda: PagedKV(caches(8), [1, 2, 1], BS), "repeat"),
        (lambda: PagedKV(caches(8), torch.tensor([0, 1], device="meta"), BS), "caches on cpu"),
        (lambda: PagedKV(caches(8), [0], 0), "positive"),
        (lambda: PagedKV([c[:1] for c in caches(8)], [0], BS), r"\[2, num_blocks"),
        (lambda: PagedKV(caches(8)[:3] + [torch.zeros(2, 9, BS, 2, 16, dtype=torch.bfloat16)], [0], BS), "shape"),
    ],
)
def test_validation_errors(make: Any, match: str) -> None:
    with pytest.raises(LayoutError, match=match):
        make().validate(LAYOUT)


def test_non_integer_block_list_rejected() -> None:
    with pytest.raises(LayoutError):
        PagedKV(caches(8), ["a", "b"], BS)


def test_chunk_tokens_must_be_multiple_of_block_size() -> None:
    lay = KVLayout(4, 2, 16, torch.bfloat16, chunk_tokens=18)
    with pytest.raises(LayoutError, match="chunk_tokens"):
        PagedKV(caches(8, lay), [0], BS).validate(lay)


# --- scatter / gather ------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_scatter_gather_roundtrip_shuffled_blocks(seed: int) -> None:
    nb, n = 64, 24
    cs = caches(nb, seed=seed + 100)
    before = [c.clone() for c in cs]
    ids = shuffled_ids(nb, n, seed)
    p = PagedKV(cs, ids, BS)
    p.validate(LAYOUT)
    T = n * BS
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(2, T, 2, 16, generator=g).to(torch.bfloat16) for _ in range(4)]
    for layer, x in enumerate(xs):
        p.scatter_layer(layer, x)
    for layer, x in enumerate(xs):
        got = p.gather_layer(layer, T)
        assert got.is_contiguous() and got.shape == (2, T, 2, 16)
        assert torch.equal(bits(got), bits(x))
        # block j of the sequence is cache block ids[j]
        for j in (0, n // 2, n - 1):
            assert torch.equal(bits(cs[layer][:, int(ids[j])]), bits(x[:, j * BS : (j + 1) * BS]))
    # blocks outside the table are untouched
    outside = sorted(set(range(nb)) - set(ids.tolist()))
    for c, b in zip(cs, before):
        assert torch.equal(bits(c[:, outside]), bits(b[:, outside]))


def test_scatter_gather_with_offset_and_chunks() -> None:
    nb = 40
    p = PagedKV(caches(nb, seed=3), shuffled_ids(nb, 16, 7), BS)  # 64 tokens = 4 chunks
    ref = logical(p, 64)
    # gather at an offset
    assert torch.equal(bits(p.gather_layer(2, 16, start_token=32)), bits(ref[2, :, 32:48]))
    # gather_chunk = the chunk view of the logical sequence, packed
    for c in range(4):
        packed = p.gather_chunk(LAYOUT, c)
        assert packed.is_contiguous() and packed.shape == LAYOUT.kv_shape(16)
        assert torch.equal(bits(packed), bits(LAYOUT.chunk_view(ref, c)))
    # scatter at an offset leaves the other tokens alone
    x = torch.randn(2, 8, 2, 16).to(torch.bfloat16)
    p.scatter_layer(1, x, start_token=20)
    after = logical(p, 64)
    assert torch.equal(bits(after[1, :, 20:28]), bits(x))
    assert torch.equal(bits(after[1, :, :20]), bits(ref[1, :, :20]))
    assert torch.equal(bits(after[1, :, 28:]), bits(ref[1, :, 28:]))
    assert torch.equal(bits(after[0]), bits(ref[0]))


def test_scatter_rejects_bad_ranges() -> None:
    p = PagedKV(caches(16), shuffled_ids(16, 4, 0), BS)
    with pytest.raises(LayoutError, match="aligned"):
        p.scatter_layer(0, torch.zeros(2, 6, 2, 16, dtype=torch.bfloat16))
    with pytest.raises(LayoutError, match="aligned"):
        p.scatter_layer(0, torch.zeros(2, 4, 2, 16, dtype=torch.bfloat16), start_token=2)
    with pytest.raises(LayoutError, match="exceeds"):
        p.scatter_layer(0, torch.zeros(2, 20, 2, 16, dtype=torch.bfloat16))
    with pytest.raises(LayoutError, match="exceeds"):
        p.gather_layer(0, 8, start_token=12)
    with pytest.raises(LayoutError, match="dtype"):
        p.scatter_layer(0, torch.zeros(2, 4, 2, 16))
    with pytest.raises(LayoutError, match="must be"):
        p.scatter_layer(0, torch.zeros(2, 4, 3, 16, dtype=torch.bfloat16))
    with pytest.raises(LayoutError, match="exceeds"):
        p.gather_chunk(LAYOUT, 1)


# --- CPU work per layer is flat in the number of blocks ---------------------------------------------------
class _CountDispatch(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


class _CountFunctions(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.calls[getattr(func, "__name__", str(func))] += 1
        return func(*args, **(kwargs or {}))


def _count(fn: Any) -> tuple[Counter[str], Counter[str]]:
    with _CountFunctions() as f, _CountDispatch() as d:
        fn()
    return f.calls, d.ops


@pytest.mark.parametrize("what", ["scatter_layer", "gather_layer", "gather_chunk"])
def test_ops_per_layer_do_not_grow_with_blocks(what: str) -> None:
    lay = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.bfloat16, chunk_tokens=16)
    counts = []
    for nblocks in (16, 4096):
        p = PagedKV(caches(nblocks + 7, lay), shuffled_ids(nblocks + 7, nblocks, 5), BS)
        p.validate(lay)
        T = nblocks * BS
        x = torch.randn(2, T, 2, 16).to(torch.bfloat16)
        if what == "scatter_layer":
            counts.append(_count(lambda p=p, x=x: p.scatter_layer(1, x)))
        elif what == "gather_layer":
            counts.append(_count(lambda p=p, T=T: p.gather_layer(1, T)))
        else:
            counts.append(_count(lambda p=p: p.gather_chunk(lay, 2)))
    (f16, d16), (f4k, d4k) = counts
    assert d16 == d4k, (d16, d4k)
    assert f16 == f4k, (f16, f4k)
    # exactly one op moves data (the rest are views of the block table, x and the cache)
    movers = {k: v for k, v in d16.items() if any(m in k for m in ("index_copy", "index_select", "copy_"))}
    if what == "scatter_layer":
        assert list(movers) == ["aten.index_copy_.default"] and movers["aten.index_copy_.default"] == 1, d16
    elif what == "gather_layer":
        assert list(movers) == ["aten.index_select.default"] and movers["aten.index_select.default"] == 1, d16
    else:  # one per layer
        assert sum(movers.values()) == lay.num_layers and all("index_select" in k for k in movers), d16
    assert sum(d16.values()) <= 8 * (lay.num_layers if what == "gather_chunk" else 1), d16


# --- through a real pool ---------------------------------------------------------------------------------
SPECS = {
    "dram": lambda tmp: "dram://?capacity=16MiB",
    "uring": lambda tmp: f"uring://{tmp}/p.kv?capacity=64MiB",
}


@pytest.fixture(params=sorted(SPECS))
async def pool(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    p = await KVPool.open(layout=LAYOUT, model_id="paged", backends=[SPECS[request.param](tmp_path)])
    async with p:
        yield p


async def test_put_then_restore_into_another_block_table(pool: KVPool) -> None:
    n_tok = 100  # 6 full chunks (96 tokens) + a partial one
    nb_src = 64
    src = PagedKV(caches(nb_src, seed=11), shuffled_ids(nb_src, 25, 1), BS)  # 25 blocks = 100 tokens
    t = toks(n_tok, 3)
    assert await put_paged(pool, t, src) == 96
    assert await pool.lookup(t) == 96

    nb_dst = 200
    dcs = caches(nb_dst, fill=-3.0)
    dst = PagedKV(dcs, shuffled_ids(nb_dst, 30, 2), BS)  # room for 120 tokens
    hit, events = await restore_paged(pool, t, dst)
    assert hit == 96
    assert isinstance(events, LayerEvents)
    assert torch.equal(bits(logical(dst, 96)), bits(logical(src, 96)))
    # blocks beyond the hit and outside the table keep their contents
    rest = dst.block_ids[24:].tolist() + sorted(set(range(nb_dst)) - set(dst.block_ids.tolist()))
    for c in dcs:
        assert bool((c[:, rest] == -3.0).all())
    # the CPU events are no-ops with the CUDA API
    for layer in range(LAYOUT.num_layers):
        events.wait(layer)
        assert events.query(layer) and events.issued(layer)
        assert await events.ready(layer)
    events.synchronize()
    await events.synchronize_async()
    # the bytes equal what a plain get returns
    got = await pool.get(t)
    assert torch.equal(bits(got), bits(logical(src, 96)))


async def test_put_paged_of_stored_prefix_is_free(pool: KVPool) -> None:
    src = PagedKV(caches(16, seed=2), list(range(8)), BS)
    t = toks(32, 4)
    assert await put_paged(pool, t, src) == 32
    before = pool.stats()["chunks_written"]
    assert await put_paged(pool, t, src) == 32
    assert pool.stats()["chunks_written"] == before
    assert await put_paged(pool, t[:10], src) == 0  # less than one chunk


async def test_partial_restore_when_dest_is_smaller(pool: KVPool) -> None:
    src = PagedKV(caches(40, seed=5), shuffled_ids(40, 32, 3), BS)  # 128 tokens = 8 chunks
    t = toks(128, 5)
    assert await put_paged(pool, t, src) == 128
    # 7 blocks = 28 tokens: one whole chunk fits
    dcs = caches(50, fill=1.0)
    dst = PagedKV(dcs, shuffled_ids(50, 7, 4), BS)
    hit, _ = await restore_paged(pool, t, dst)
    assert hit == 16
    assert torch.equal(bits(logical(dst, 16)), bits(logical(src, 16)))
    for c in dcs:  # blocks 4..6 of the sequence were not written
        assert bool((c[:, dst.block_ids[4:]] == 1.0).all())
    # 12 blocks = 48 tokens = 3 chunks
    dst3 = PagedKV(caches(50, fill=0.0), shuffled_ids(50, 12, 8), BS)
    hit, _ = await restore_paged(pool, t, dst3, prefetch_layers=0, layer_time=1e-3)
    assert hit == 48
    assert torch.equal(bits(logical(dst3, 48)), bits(logical(src, 48)))


async def test_restore_miss_and_prefix_only(pool: KVPool) -> None:
    dst = PagedKV(caches(16, fill=2.0), list(range(8)), BS)
    hit, events = await restore_paged(pool, toks(32, 99), dst)
    assert hit == 0
    assert not events.issued(0) and not await events.ready(0)
    events.wait(0)  # nothing to wait for
    assert all(bool((c == 2.0).all()) for c in dst.kv_caches)
    # a cached 2-chunk prefix of a longer prompt
    src = PagedKV(caches(16, seed=9), list(range(8)), BS)
    t = toks(64, 7)
    assert await put_paged(pool, t[:32], src) == 32
    hit, _ = await restore_paged(pool, t, PagedKV(caches(16), list(range(16)), BS))
    assert hit == 32


async def test_restore_as_task_with_ready() -> None:
    async with await KVPool.open(layout=LAYOUT, model_id="paged", backends=["dram://?capacity=16MiB"]) as pool:
        src = PagedKV(caches(16, seed=1), list(range(16)), BS)
        t = toks(64, 1)
        await put_paged(pool, t, src)
        dst = PagedKV(caches(32, fill=0.0), list(range(31, 15, -1)), BS)
        events = LayerEvents(LAYOUT.num_layers, dst.device)
        task = asyncio.ensure_future(restore_paged(pool, t, dst, events=events))
        for layer in range(LAYOUT.num_layers):
            assert await events.ready(layer)
            events.wait(layer)
            # the layer is there as soon as it is ready, before the restore finished
            assert torch.equal(bits(torch.cat([dst.kv_caches[layer][:, int(b)] for b in dst.block_ids], 1)),
                               bits(src.gather_layer(layer, 64)))
        hit, ev2 = await task
        assert hit == 64 and ev2 is events
        with pytest.raises(ValueError):
            await restore_paged(pool, t, dst, events=LayerEvents(3))


async def test_restore_validates_dest() -> None:
    async with await KVPool.open(layout=LAYOUT, model_id="paged", backends=["dram://?capacity=4MiB"]) as pool:
        with pytest.raises(LayoutError):
            await restore_paged(pool, toks(16), PagedKV(caches(8), [0, 9], BS))
        with pytest.raises(LayoutError):
            await put_paged(pool, toks(16), PagedKV([c.float() for c in caches(8)], [0], BS))


async def test_large_layers_take_the_threaded_path() -> None:
    # layers of >= 4 MiB are scattered from a worker thread; the bytes must be the same
    lay = KVLayout(num_layers=2, num_kv_heads=8, head_dim=128, dtype=torch.float16, chunk_tokens=256)
    n = 1024  # 2 * 1024 * 8 * 128 * 2 = 4 MiB per layer
    bs = 16
    src = PagedKV(caches(80, lay, bs, seed=4), shuffled_ids(80, n // bs, 1), bs)
    t = toks(n, 2)
    async with await KVPool.open(layout=lay, model_id="big", backends=["dram://?capacity=64MiB"]) as pool:
        assert await put_paged(pool, t, src) == n
        dst = PagedKV(caches(100, lay, bs, fill=0.0), shuffled_ids(100, n // bs, 9), bs)
        hit, _ = await restore_paged(pool, t, dst)
        assert hit == n
        for layer in range(2):
            assert torch.equal(dst.gather_layer(layer, n).view(torch.int16),
                               src.gather_layer(layer, n).view(torch.int16))


# --- host memory helpers ---------------------------------------------------------------------------------
def test_host_memory_helpers_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("checks the no-CUDA behaviour")
    buf = torch.empty(8192, dtype=torch.uint8)
    assert register_host_memory(buf) is False
    assert unregister_host_memory(buf) is False
    with registered_host_memory(bytearray(4096)) as done:
        assert done is False
    t = pinned_empty((2, 3), torch.float16, page_aligned=True)
    assert t.shape == (2, 3) and t.data_ptr() % 4096 == 0
    assert gds_available() is False
    ev = LayerEvents(2)
    assert not ev.is_cuda and len(ev) == 2


async def test_pool_put_and_get_into_accept_paged(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The façade routes PagedKV through put_paged / restore_paged (the issue's public API)."""
    import kvpool

    layout = kvpool.KVLayout(num_layers=3, num_kv_heads=2, head_dim=8, dtype=torch.float16, chunk_tokens=32)
    bs, nb = 16, 12
    src_caches = [torch.randn(2, nb, bs, 2, 8).half() for _ in range(3)]
    src = kvpool.PagedKV(src_caches, torch.tensor([5, 2, 9, 0]), bs)
    dst_caches = [torch.zeros(2, nb, bs, 2, 8).half() for _ in range(3)]
    dst = kvpool.PagedKV(dst_caches, torch.tensor([1, 7, 3, 11]), bs)
    tokens = list(range(64))
    async with await kvpool.KVPool.open(layout=layout, model_id="m", backends=["dram://?capacity=1MiB"]) as pool:
        assert await pool.put(tokens, src) == 64
        assert await pool.get_into(tokens, dst) == 64
    for layer in range(3):
        assert torch.equal(dst.gather_layer(layer, 64), src.gather_layer(layer, 64))
