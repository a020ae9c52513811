from __future__ import annotations

import numpy as np
import pytest
import torch

import kvpool
from kvpool import CapacityError, ConfigError, KVLayout, KVPool, LayoutError, PoolClosedError, UnknownBackendError
from kvpool.memory.dram import DRAMBackend

LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=16, dtype=torch.bfloat16, chunk_tokens=16)


def make_kv(n: int, seed: int = 0, layout: KVLayout = LAYOUT) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layout.kv_shape(n), generator=g).to(layout.dtype)


def toks(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, 50_000, n).tolist()


@pytest.fixture
async def pool():
    p = await KVPool.open(layout=LAYOUT, model_id="test-model", backends=["dram://?capacity=4MiB"])
    async with p:
        yield p


async def test_put_lookup_get(pool: KVPool) -> None:
    t, kv = toks(72), make_kv(72)
    assert await pool.put(t, kv) == 64  # trailing partial chunk ignored
    assert await pool.lookup(t) == 64
    got = await pool.get(t)
    assert got.shape == (4, 2, 64, 2, 16)
    assert torch.equal(got, kv[:, :, :64])


async def test_prefix_sharing_and_divergence(pool: KVPool) -> None:
    t, kv = toks(64), make_kv(64)
    await pool.put(t, kv)
    other = t[:32] + [x + 1 for x in t[32:]]
    assert await pool.lookup(other) == 32  # shares two chunks
    got = await pool.get(other)
    assert torch.equal(got, kv[:, :, :32])
    assert await pool.lookup(t[:40]) == 32
    changed_first = [t[0] + 1] + t[1:]
    assert await pool.lookup(changed_first) == 0  # the chain binds every earlier token


async def test_token_containers_agree(pool: KVPool) -> None:
    t, kv = toks(48), make_kv(48)
    await pool.put(torch.tensor(t, dtype=torch.int64), kv)
    assert await pool.lookup(np.array(t, dtype=np.int32)) == 48
    assert await pool.lookup(t) == 48
    assert await pool.lookup(tuple(t)) == 48


async def test_get_into_and_miss(pool: KVPool) -> None:
    t, kv = toks(64), make_kv(64)
    out = torch.zeros(LAYOUT.kv_shape(80), dtype=LAYOUT.dtype)
    assert await pool.get_into(t, out) == 0
    await pool.put(t, kv)
    assert await pool.get_into(t, out) == 64
    assert torch.equal(out[:, :, :64], kv)
    small = torch.zeros(LAYOUT.kv_shape(40), dtype=LAYOUT.dtype)
    assert await pool.get_into(t, small) == 32  # only whole chunks that fit
    assert torch.equal(small[:, :, :32], kv[:, :, :32])
    empty = await pool.get(toks(64, seed=9))
    assert empty.shape == (4, 2, 0, 2, 16)


async def test_stream_layers_in_order(pool: KVPool) -> None:
    t, kv = toks(64), make_kv(64)
    await pool.put(t, kv)
    seen = []
    async for layer, x in pool.stream(t):
        seen.append(layer)
        assert x.shape == (2, 64, 2, 16)
        assert torch.equal(x, kv[layer])
    assert seen == [0, 1, 2, 3]
    assert [lay async for lay, _ in pool.stream(toks(64, seed=5))] == []


async def test_stream_early_exit_cancels_prefetch(pool: KVPool) -> None:
    t, kv = toks(64), make_kv(64)
    await pool.put(t, kv)
    agen = pool.stream(t, prefetch_layers=3)
    async for layer, _ in agen:
        if layer == 1:
            break
    await agen.aclose()
    assert await pool.lookup(t) == 64


async def test_delete(pool: KVPool) -> None:
    t, kv = toks(64), make_kv(64)
    await pool.put(t, kv)
    assert await pool.delete(t[:32]) == 32
    assert await pool.lookup(t) == 0
    assert await pool.delete(t) == 32  # chunks 2, 3 were still stored


async def test_put_skips_stored_chunks(pool: KVPool) -> None:
    t, kv = toks(64), make_kv(64)
    await pool.put(t[:32], kv[:, :, :32])
    await pool.put(t, kv)
    s = pool.stats()
    assert s["chunks_written"] == 4 and s["chunks_skipped"] == 2


async def test_lru_eviction_through_pool() -> None:
    layout = LAYOUT
    cap = 4 * layout.chunk_nbytes
    async with await KVPool.open(layout=layout, model_id="m", backends=[f"dram://?capacity={cap}"]) as pool:
        a, b = toks(32, 1), toks(48, 2)
        await pool.put(a, make_kv(32, 1))
        await pool.put(b, make_kv(48, 2))  # 5 chunks into room for 4: a's oldest chunk goes
        assert await pool.lookup(b) == 48
        assert await pool.lookup(a) == 0
        assert pool.stats()["tiers"][0]["used_bytes"] <= cap


# --- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda kv: kv.float(), "dtype"),
        (lambda kv: kv[0], "5 dims"),
        (lambda kv: kv[:3], "layers"),
        (lambda kv: kv[:, :, :, :1], "kv heads"),
        (lambda kv: kv[..., :8], "head_dim"),
        (lambda kv: kv[:, :, :16], "tokens"),
        (lambda kv: kv[:, :1], "K, V"),
    ],
)
async def test_layout_errors(pool: KVPool, bad, match) -> None:  # type: ignore[no-untyped-def]
    t, kv = toks(32), make_kv(32)
    with pytest.raises(LayoutError, match=match):
        await pool.put(t, bad(kv))
    assert pool.stats()["chunks_written"] == 0
    with pytest.raises(ValueError):  # LayoutError is a ValueError too
        await pool.put(t, bad(kv))
    assert await pool.put(t, kv) == 32  # still usable


@pytest.mark.parametrize(
    "tokens, exc",
    [
        ([1.5] * 32, TypeError),
        (["a"] * 32, TypeError),
        ([True] * 32, TypeError),
        (torch.ones(32), TypeError),
        (np.ones((2, 16), dtype=np.int64), TypeError),
        ([-1] + [0] * 31, ValueError),
        ([2**40] + [0] * 31, ValueError),
        (np.full(32, -3, dtype=np.int64), ValueError),
        ("abc", TypeError),
    ],
)
async def test_bad_tokens(pool: KVPool, tokens, exc) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(exc):
        await pool.lookup(tokens)
    with pytest.raises(exc):
        await pool.put(tokens, make_kv(32))


async def test_bad_open_arguments() -> None:
    with pytest.raises(UnknownBackendError, match="dram"):
        await KVPool.open(layout=LAYOUT, model_id="m", backends=["nosuch://x"])
    with pytest.raises(ConfigError):
        await KVPool.open(layout=LAYOUT, model_id="m", backends=[])
    with pytest.raises(ConfigError):
        await KVPool.open(layout=LAYOUT, model_id="m", backends="dram://?capacity=1MiB")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        await KVPool.open(layout=LAYOUT, model_id="", backends=["dram://?capacity=1MiB"])
    with pytest.raises(ConfigError, match="capacity"):
        await KVPool.open(layout=LAYOUT, model_id="m", backends=["dram://?capacity=12XB"])
    with pytest.raises(LayoutError):
        KVLayout(num_layers=0, num_kv_heads=1, head_dim=1, dtype=torch.float16)
    with pytest.raises(LayoutError):
        KVLayout(num_layers=1, num_kv_heads=1, head_dim=1, dtype="float16")  # type: ignore[arg-type]


async def test_capacity_error_leaves_pool_unchanged() -> None:
    cap = 2 * LAYOUT.chunk_nbytes
    async with await KVPool.open(layout=LAYOUT, model_id="m", backends=[f"dram://?capacity={cap}"]) as pool:
        big = KVLayout(num_layers=4, num_kv_heads=2, head_dim=16, dtype=torch.bfloat16, chunk_tokens=16)
        assert big == LAYOUT
        t = toks(16)
        await pool.put(t, make_kv(16))
        # an object bigger than the whole tier
        huge_layout = KVLayout(num_layers=4, num_kv_heads=2, head_dim=16, dtype=torch.bfloat16, chunk_tokens=64)
        async with await KVPool.open(layout=huge_layout, model_id="m",
                                     backends=[f"dram://?capacity={cap}"]) as p2:
            with pytest.raises(CapacityError):
                await p2.put(toks(64), make_kv(64, layout=huge_layout))
            assert p2.stats()["tiers"][0]["used_bytes"] == 0
        assert await pool.lookup(t) == 16


async def test_closed_pool_refuses() -> None:
    pool = await KVPool.open(layout=LAYOUT, model_id="m", backends=["dram://?capacity=1MiB"])
    await pool.close()
    await pool.close()
    with pytest.raises(PoolClosedError):
        await pool.lookup(toks(16))
    with pytest.raises(kvpool.KVPoolError):
        await pool.get(toks(16))


async def test_keys_bind_model_layout_namespace() -> None:
    t = toks(32)
    other_layout = KVLayout(num_layers=4, num_kv_heads=2, head_dim=16, dtype=torch.float16, chunk_tokens=16)
    pools = [
        await KVPool.open(layout=LAYOUT, model_id="a", backends=["dram://?capacity=1MiB"]),
        await KVPool.open(layout=LAYOUT, model_id="b", backends=["dram://?capacity=1MiB"]),
        await KVPool.open(layout=other_layout, model_id="a", backends=["dram://?capacity=1MiB"]),
        await KVPool.open(layout=LAYOUT, model_id="a", backends=["dram://?capacity=1MiB"], namespace="tenant2"),
    ]
    keys = [p.keys_for(t) for p in pools]
    assert len({k[0] for k in keys}) == 4
    again = await KVPool.open(layout=LAYOUT, model_id="a", backends=["dram://?capacity=1MiB"])
    assert again.keys_for(t) == keys[0]  # stable
    for p in pools + [again]:
        await p.close()


async def test_two_tiers_spill_and_promote() -> None:
    small, big = DRAMBackend(2 * LAYOUT.chunk_nbytes), DRAMBackend(16 * LAYOUT.chunk_nbytes)
    async with await KVPool.open(layout=LAYOUT, model_id="m", backends=[small, big]) as pool:
        t, kv = toks(64), make_kv(64)
        await pool.put(t, kv)  # write-through: all 4 chunks in big, the first 2 (all that fit) in small
        assert len(small) == 2 and len(big) == 4
        got = await pool.get(t)
        assert torch.equal(got, kv)
        await pool.flush()
        assert pool.stats()["promotions"] == 0  # second-hit admission: one read from below is no reason
        got = await pool.get(t)
        assert torch.equal(got, kv)
        await pool.flush()  # promotion runs after get returned, in the background: flush waits for it
        assert pool.stats()["promotions"] >= 2


async def test_pool_accepts_backend_objects_and_registry() -> None:
    assert "dram" in kvpool.known_backends()
    assert "dram" in kvpool.registry()
    with pytest.raises(ConfigError):
        kvpool.register_backend("dram", DRAMBackend)
    kvpool.register_backend("dram2", "kvpool.memory.dram:DRAMBackend", clobber=True)
    async with await KVPool.open(layout=LAYOUT, model_id="m", backends=["dram2://?capacity=1MiB"]) as pool:
        assert await pool.put(toks(16), make_kv(16)) == 16
    with pytest.raises(ConfigError):
        kvpool.register_backend("x", int)  # type: ignore[arg-type]


async def test_concurrent_puts_and_gets(pool: KVPool) -> None:
    import asyncio

    prompts = [(toks(48, s), make_kv(48, s)) for s in range(6)]
    await asyncio.gather(*(pool.put(t, kv) for t, kv in prompts))
    results = await asyncio.gather(*(pool.get(t) for t, _ in prompts))
    for (t, kv), got in zip(prompts, results):
        assert torch.equal(got, kv)


async def test_prefetch_moves_up_and_get_joins() -> None:
    small, big = DRAMBackend(8 * LAYOUT.chunk_nbytes), DRAMBackend(16 * LAYOUT.chunk_nbytes)
    async with await KVPool.open(layout=LAYOUT, model_id="m", backends=[small, big]) as pool:
        t, kv = toks(64), make_kv(64)
        await pool.put(t, kv)
        for k in pool.keys_for(t):
            await small.delete(k)  # only the lower tier has it now
        assert await pool.prefetch(t) == 64  # returns at once
        got = await pool.get(t)  # joins the move in flight
        assert torch.equal(got, kv)
        await pool.flush()
        assert len(small) == 4
        s = pool.stats()
        assert s["prefetches"] == 1 and s["promotions"] >= 4
        assert await pool.prefetch(toks(64, seed=3)) == 0


async def test_write_back_reaches_lower_tier_after_flush() -> None:
    small, big = DRAMBackend(8 * LAYOUT.chunk_nbytes), DRAMBackend(16 * LAYOUT.chunk_nbytes)
    async with await KVPool.open(layout=LAYOUT, model_id="m", backends=[small, big],
                                 config={"write_policy": "write-back"}) as pool:
        t, kv = toks(64), make_kv(64)
        await pool.put(t, kv)
        await pool.flush()
        assert len(big) == 4 and pool.stats()["write_backs"] == 4
        for k in pool.keys_for(t):
            await small.delete(k)
        assert torch.equal(await pool.get(t), kv)


async def test_observe_attention_validates_and_feeds_policies(pool: KVPool) -> None:
    t, kv = toks(64), make_kv(64)
    await pool.put(t, kv)
    await pool.observe_attention(t, [0.1, 0.5, 0.2, 0.2])  # per chunk
    await pool.observe_attention(t, torch.rand(64))  # per token
    with pytest.raises(ValueError):
        await pool.observe_attention(t, [1.0, 2.0])
    with pytest.raises(ValueError):
        await pool.observe_attention(t, [float("nan")] * 4)
    assert pool.stats()["attention_observations"] == 2


async def test_promotion_always_config() -> None:
    small, big = DRAMBackend(8 * LAYOUT.chunk_nbytes), DRAMBackend(16 * LAYOUT.chunk_nbytes)
    async with await KVPool.open(layout=LAYOUT, model_id="m", backends=[small, big],
                                 config={"promotion": "always"}) as pool:
        t, kv = toks(64), make_kv(64)
        await pool.put(t, kv)
        for k in pool.keys_for(t):
            await small.delete(k)
        await pool.get(t)
        await pool.flush()  # promotions run in the background after get returned
        assert pool.stats()["promotions"] == 4


async def test_result_memory_is_reused_only_after_release() -> None:
    import gc

    layout = KVLayout(num_layers=4, num_kv_heads=8, head_dim=128, dtype=torch.float16, chunk_tokens=256)
    async with await KVPool.open(layout=layout, model_id="m", backends=["dram://?capacity=64MiB"]) as pool:
        a, b = toks(1024, 1), toks(1024, 2)
        kva, kvb = make_kv(1024, 1, layout), make_kv(1024, 2, layout)
        await pool.put(a, kva)
        await pool.put(b, kvb)
        ga = await pool.get(a)
        gb = await pool.get(b)  # ga is alive: must not share memory
        assert torch.equal(ga, kva) and torch.equal(gb, kvb)
        ptr = ga.data_ptr()
        del ga
        gc.collect()
        ga2 = await pool.get(a)
        assert ga2.data_ptr() == ptr and pool._staging.contains(ptr, 1)
        assert torch.equal(ga2, kva) and torch.equal(gb, kvb)


async def test_results_come_from_populated_staging_memory() -> None:
    """No request pays first-touch faults: get() and empty() hand out memory populated at open."""
    import resource

    layout = KVLayout(num_layers=4, num_kv_heads=8, head_dim=128, dtype=torch.float16, chunk_tokens=256)
    async with await KVPool.open(layout=layout, model_id="m", backends=["dram://?capacity=64MiB"],
                                 config={"staging_bytes": 64 << 20}) as pool:
        assert await pool.ready() >= 0 and pool.stats()["staging"]["ready"]
        t = toks(1024, 1)
        kv = make_kv(1024, 1, layout)
        await pool.put(t, kv)
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        got = await pool.get(t)
        out = pool.empty(t)
        assert await pool.get_into(t, out) == 1024
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        assert torch.equal(got, kv) and torch.equal(out, kv)
        assert pool._staging.contains(got.data_ptr(), 1) and pool._staging.contains(out.data_ptr(), 1)
        assert out.data_ptr() % 4096 == 0 and out.shape == layout.kv_shape(1024)
        # 16 MiB landed in each tensor: fresh memory would have cost ~8k faults (4 KiB pages)
        assert faults < 1000, faults
        assert pool.empty(0).shape == layout.kv_shape(0)
