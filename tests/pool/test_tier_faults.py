"""The pool's tier logic under attack: concurrent rollback, failing/full/down tiers, bad input, open/close.

Real tiers only (dram://, uring:// on files and loop devices, a real redis-server); the faults come from
kvpool.testing (a wrapper that fails or stalls on command, a loop device on a small tmpfs, SIGSTOP/SIGKILL).
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kvpool import CapacityError, ConfigError, KVLayout, KVPool, PoolClosedError
from kvpool.memory.dram import DRAMBackend
from kvpool.storage.registry import backend_from_spec
from kvpool.striped.backend import StripedBackend
from kvpool.testing import devices
from kvpool.testing.faults import FaultyBackend, LatencyBackend

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.float16, chunk_tokens=16)
CH = LAYOUT.chunk_nbytes  # 8 KiB


def kv_of(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(LAYOUT.kv_shape(n), generator=torch.Generator().manual_seed(seed)).to(LAYOUT.dtype)


def toks(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, 50_000, n).tolist()


async def open_pool(backends: list, **config: object) -> KVPool:  # type: ignore[type-arg]
    return await KVPool.open(layout=LAYOUT, model_id="m", backends=backends, config=config or None)


# --- item 1: a rollback removes only what no other call relies on --------------------------------------
async def test_cancelled_put_keeps_chunks_a_concurrent_put_acknowledged() -> None:
    tier = FaultyBackend(DRAMBackend(64 * CH))
    async with await open_pool([tier]) as pool:
        shared = toks(16, 1)
        a_t, b_t = shared + toks(16, 2), shared + toks(16, 3)
        a_kv, b_kv = kv_of(32, 2), kv_of(32, 3)
        b_kv[:, :, :16] = a_kv[:, :, :16]
        b_second = pool.keys_for(b_t)[1]
        tier.stall(keys=[b_second])  # b's prefix chunk lands, its second chunk hangs
        b = asyncio.ensure_future(pool.put(b_t, b_kv))
        while tier.stalled == 0:
            await asyncio.sleep(0.001)
        assert await pool.put(a_t, a_kv) == 32  # acknowledged: it relies on the prefix chunk b wrote
        b.cancel()
        with pytest.raises(asyncio.CancelledError):
            await b
        tier.resume()
        assert await pool.lookup(a_t) == 32, "b's rollback deleted the chunk a acknowledged"
        got = await pool.get(a_t)
        assert torch.equal(got, a_kv)
        assert len(pool._tiers.intents) == 0  # no claim leaks


async def test_cancelled_put_alone_is_rolled_back() -> None:
    tier = FaultyBackend(DRAMBackend(64 * CH))
    async with await open_pool([tier]) as pool:
        t = toks(48, 5)
        tier.stall(keys=[pool.keys_for(t)[2]])
        p = asyncio.ensure_future(pool.put(t, kv_of(48, 5)))
        while tier.stalled == 0:
            await asyncio.sleep(0.001)
        p.cancel()
        with pytest.raises(asyncio.CancelledError):
            await p
        tier.resume()
        assert len(tier.inner) == 0  # nobody else relied on them: nothing left behind


# --- item 2: a failing tier is skipped and counted; put raises only when no tier could store ----------
@pytest.mark.parametrize("error", ["eio", "enospc", "full", "timeout", "down"])
async def test_failing_first_tier_is_skipped_and_counted(tmp_path: Path, error: str) -> None:
    top = FaultyBackend(DRAMBackend(64 * CH), error=error)
    async with await open_pool([top, f"uring://{tmp_path}/p.kv?capacity=16MiB"]) as pool:
        top.broken = True
        t, kv = toks(64), kv_of(64)
        assert await pool.put(t, kv) == 64
        f = pool.stats()["tiers"][0]["faults"]
        assert f["write_failures"] + f["capacity_skips"] + f["contains_failures"] >= 1
        assert torch.equal(await pool.get(t), kv)  # from the SSD tier, the top one being down
        top.broken = False
        assert await pool.delete(t) == 64


async def test_put_raises_only_when_no_tier_can_store() -> None:
    a, b = FaultyBackend(DRAMBackend(64 * CH)), FaultyBackend(DRAMBackend(64 * CH), error="full")
    async with await open_pool([a, b]) as pool:
        a.broken = b.broken = True
        with pytest.raises(kvpool_errors().BackendError):
            await pool.put(toks(32), kv_of(32))
        a.broken = False
        assert await pool.put(toks(32), kv_of(32)) == 32


def kvpool_errors():  # type: ignore[no-untyped-def]
    import kvpool.errors

    return kvpool.errors


async def test_put_bigger_than_first_tier_fills_the_lower_tiers(tmp_path: Path) -> None:
    # the case scaled down: DRAM of 2 chunks over an SSD tier, a put of 4 chunks
    async with await open_pool([f"dram://?capacity={2 * CH}", f"uring://{tmp_path}/p.kv?capacity=16MiB"]) as pool:
        early_t, early_kv = toks(16, 9), kv_of(16, 9)
        assert await pool.put(early_t, early_kv) == 16
        t, kv = toks(64), kv_of(64)
        assert await pool.put(t, kv) == 64
        assert torch.equal(await pool.get(t), kv)
        assert torch.equal(await pool.get(early_t), early_kv)
        s = pool.stats()["tiers"]
        assert s[0]["faults"]["capacity_skips"] == 1
    # closing right after must not trip over sibling writes still running ("double free of extent")


async def test_put_bigger_than_every_tier_raises_capacity_and_leaves_nothing() -> None:
    async with await open_pool([f"dram://?capacity={CH}"]) as pool:
        big = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.float16, chunk_tokens=32)
        async with await KVPool.open(layout=big, model_id="m", backends=[f"dram://?capacity={CH}"]) as p2:
            with pytest.raises(CapacityError):
                await p2.put(toks(32), torch.zeros(big.kv_shape(32), dtype=big.dtype))
            assert p2.stats()["tiers"][0]["used_bytes"] == 0
        assert await pool.put(toks(16), kv_of(16)) == 16


async def test_no_sibling_write_runs_after_put_raises() -> None:
    # tier 0 fails at once, tier 1 is slow: put must wait for tier 1 before it returns or raises
    fast_fail = FaultyBackend(DRAMBackend(64 * CH))
    fast_fail.broken = True
    slow = LatencyBackend(DRAMBackend(64 * CH), latency=0.05)
    async with await open_pool([fast_fail, slow]) as pool:
        n = await pool.put(toks(64), kv_of(64))
        assert n == 64
        assert len(slow.inner) == 4  # every write finished before put returned


# --- a down remote tier: misses and counters, never an exception into the serving path ---------------
@pytest.fixture
def redis_srv(tmp_path: Path):  # type: ignore[no-untyped-def]
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    from kvpool.testing.servers import RedisServer

    srv = RedisServer(tmp_path / "redis")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.mark.parametrize("how", ["kill", "pause"])
async def test_down_remote_tier_does_not_fail_puts_or_deletes(redis_srv, how: str) -> None:  # type: ignore[no-untyped-def]
    async with await open_pool([f"dram://?capacity={256 * CH}", f"{redis_srv.url}?timeout=0.3&retry_after=60"]) as pool:
        t0, kv0 = toks(32, 1), kv_of(32, 1)
        assert await pool.put(t0, kv0) == 32
        redis_srv.kill() if how == "kill" else redis_srv.pause()
        try:
            for s in range(5):
                t, kv = toks(48, 10 + s), kv_of(48, 10 + s)
                assert await pool.put(t, kv) == 48
                assert torch.equal(await pool.get(t), kv)
            assert await pool.delete(t0) == 32
            assert await pool.lookup(toks(48, 99)) == 0  # a miss within the timeout
            f = pool.stats()["tiers"][1]["faults"]
            assert f["write_failures"] + f["contains_failures"] >= 1
        finally:
            redis_srv.resume()


# --- item 3: one bad put must not take a striped tier down --------------------------------------------
async def test_meta_tensor_rejected_and_striped_children_stay_up() -> None:
    striped = StripedBackend([DRAMBackend(64 * CH), DRAMBackend(64 * CH)])
    async with await open_pool([striped]) as pool:
        meta = torch.empty(LAYOUT.kv_shape(32), dtype=LAYOUT.dtype, device="meta")
        with pytest.raises(TypeError, match="meta"):
            await pool.put(toks(32), meta)
        with pytest.raises(TypeError, match="meta"):
            await pool.get_into(toks(32), meta)
        # the tier itself, handed a meta tensor directly: the caller's error, not a device failure
        with pytest.raises(Exception) as ei:
            await striped.write(b"k" * 16, torch.empty(4096, dtype=torch.uint8, device="meta"))
        assert not isinstance(ei.value, OSError)
        assert not any(striped.stats()["down"])
        for s in range(10):  # other callers' puts keep working
            assert await pool.put(toks(32, s), kv_of(32, s)) == 32


# --- item 9 and 10: open cleans up after itself; close waits for calls in flight ----------------------
async def test_failed_open_closes_every_tier_it_opened(tmp_path: Path) -> None:
    spec = f"uring://{tmp_path}/p.kv?capacity=16MiB"
    with pytest.raises(ConfigError, match="io_max_inflight"):
        await open_pool([spec], io_max_inflight=0)
    # a tier opened and then failing later (second tier cannot open): the first is closed again
    with pytest.raises(Exception):
        await open_pool([spec, f"uring://{tmp_path}/no/such/dir/p.kv?capacity=16MiB"])
    async with await open_pool([spec]) as pool:  # no PoolLockedError: the lock was released
        assert await pool.put(toks(16), kv_of(16)) == 16


async def test_close_waits_for_calls_in_flight(tmp_path: Path) -> None:
    slow = LatencyBackend(backend_from_spec(f"uring://{tmp_path}/p.kv?capacity=16MiB"), latency=0.02)
    pool = await open_pool([f"dram://?capacity={8 * CH}", slow])
    prompts = [(toks(32, s), kv_of(32, s)) for s in range(20)]

    async def use(t: list[int], kv: torch.Tensor) -> None:
        try:
            await pool.put(t, kv)
            await pool.get(t)
            await pool.lookup(t)
        except PoolClosedError:
            pass  # refused after close began: the only acceptable error

    calls = [asyncio.ensure_future(use(t, kv)) for t, kv in prompts]
    await asyncio.sleep(0.03)
    await pool.close()
    await asyncio.gather(*calls)  # no AttributeError from torn-down internals
    with pytest.raises(PoolClosedError):
        await pool.put(toks(16), kv_of(16))


# --- item 11: input edges --------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens", [[5] * 31 + [True], set(range(32)), (i for i in range(32)), iter(range(32))])
async def test_odd_token_containers_rejected(tokens: object) -> None:
    async with await open_pool([f"dram://?capacity={64 * CH}"]) as pool:
        with pytest.raises(TypeError):
            await pool.put(tokens, kv_of(32))
        with pytest.raises(TypeError):
            await pool.lookup(tokens)


async def test_get_into_out_smaller_than_a_chunk_raises() -> None:
    async with await open_pool([f"dram://?capacity={64 * CH}"]) as pool:
        await pool.put(toks(32), kv_of(32))
        with pytest.raises(ValueError, match="fewer than one chunk"):
            await pool.get_into(toks(32), torch.zeros(LAYOUT.kv_shape(8), dtype=LAYOUT.dtype))


# --- issue 10 pool parts: promotion off the caller's path; locate asks only what it must --------------
async def test_get_returns_before_promotion_and_promotion_is_bounded() -> None:
    top = FaultyBackend(DRAMBackend(64 * CH))
    async with await open_pool([top, DRAMBackend(64 * CH)], promotion="always",
                               promotion_queue_bytes=2 * CH) as pool:
        t, kv = toks(64), kv_of(64)
        await pool.put(t, kv)
        for k in pool.keys_for(t):
            await top.inner.delete(k)
        top.stall(keys=pool.keys_for(t))  # promotion writes into the top tier hang
        got = await asyncio.wait_for(pool.get(t), 5)  # returns although every promotion is stuck
        assert torch.equal(got, kv)
        s = pool.stats()
        assert s["promotions"] == 0 and s["promotions_dropped"] == 2  # 4 chunks, room for 2
        top.resume()
        await pool.flush()
        assert pool.stats()["promotions"] == 2


class CountingBackend(DRAMBackend):
    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.asked: list[int] = []

    async def contains_many(self, keys):  # type: ignore[no-untyped-def]
        self.asked.append(len(keys))
        return await super().contains_many(keys)


async def test_locate_asks_a_lower_tier_only_for_what_the_upper_lacks() -> None:
    top, low = DRAMBackend(64 * CH), CountingBackend(64 * CH)
    async with await open_pool([top, low]) as pool:
        t, kv = toks(64), kv_of(64)
        await pool.put(t, kv)
        low.asked.clear()
        assert await pool.lookup(t) == 64
        assert low.asked == []  # the top tier has everything: no round trip below
        await top.delete(pool.keys_for(t)[3])
        assert await pool.lookup(t) == 64
        assert low.asked == [1]
