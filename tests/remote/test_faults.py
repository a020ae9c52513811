"""Both remote tiers with their server stopped (SIGSTOP) or killed (SIGKILL), real servers, no mocks.

What a down server must cost (issue 15 item 6, the tier's side): every call returns or raises within a
bounded time -- reads, ``contains``/``contains_many`` and ``object_size`` are misses, ``delete`` is ``False``
and a counter, ``write``/``write_many`` raise :class:`~kvpool.BackendError` -- never a hang, never a library
exception. After the first timeout the breaker answers at once; once the server is back, the tier is too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from harness.servers import unique_prefix

from kvpool import BackendError, KVLayout, KVPool
from kvpool.storage.backend import ReadRequest
from kvpool.testing.backend_tests import rand_bytes, rand_key

KiB = 1 << 10


class Tier:
    """One remote tier on a server of its own: how to make its backend and how to hurt its server."""

    def __init__(self, kind: str, server: Any) -> None:
        self.kind = kind
        self.server = server

    def backend(self, **kw: Any) -> Any:
        if self.kind == "redis":
            from kvpool.remote.redis import RedisBackend

            return RedisBackend(self.server.url, prefix=unique_prefix(), **kw)
        return self.server.backend(**kw)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}" + ("/0" if self.kind == "redis" else "")

    def pause(self) -> None:
        self.server.pause()

    def resume(self) -> None:
        self.server.resume()

    def kill(self) -> None:
        self.server.kill()


@pytest.fixture(params=["redis", "mooncake"])
def tier(request: pytest.FixtureRequest) -> Iterator[Tier]:
    """Each remote tier, on a server of this test's own."""
    yield Tier(request.param, request.getfixturevalue("own_redis" if request.param == "redis" else "own_mooncake"))


async def _timed(call: Callable[[], Awaitable[Any]]) -> tuple[Any, float]:
    t0 = time.monotonic()
    try:
        res: Any = await call()
    except BackendError as exc:
        res = exc
    return res, time.monotonic() - t0


# --- a server that dies or stalls under a pool --------------------------------------------------------------
async def test_server_killed_mid_run(tier: Tier) -> None:
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float16, chunk_tokens=16)
    remote = tier.backend(timeout=5.0, retry_after=0.2)
    tokens = np.arange(64)
    kv = torch.randn(layout.kv_shape(64)).to(torch.float16)
    pool = await KVPool.open(layout=layout, model_id="m", backends=["dram://?capacity=1MiB", remote])
    async with pool:
        assert await pool.put(tokens, kv) == 64
        keys = pool.keys_for(tokens)
        assert await remote.contains_many(keys) == [True] * 4
        remote.timeout = 0.5  # generous while the data went in (a loaded machine), short under test
        tier.kill()
        dest = torch.empty(layout.chunk_nbytes, dtype=torch.uint8)
        for _ in range(2):  # the first call of each round meets the dead server, the others the open breaker
            t0 = time.monotonic()
            assert await remote.read_into(keys[0], dest) is False
            assert await remote.contains(keys[0]) is False
            assert await remote.contains_many(keys) == [False] * 4
            assert await remote.read_many([ReadRequest(k, dest) for k in keys[:2]]) == [False, False]
            assert await remote.object_size(keys[0]) is None
            assert time.monotonic() - t0 < 1.5
            await asyncio.sleep(0.25)
        # the pool keeps serving what DRAM holds
        assert await pool.lookup(tokens) == 64
        got = await pool.get(tokens)
        assert torch.equal(got, kv)
        # the tier's writes fail loudly (what the pool then does is the pool's business)
        with pytest.raises(BackendError):
            await remote.write(rand_key(), rand_bytes(4 * KiB))
        st = remote.stats()
        assert st["timeouts"] + st["errors"] >= 1 and st["misses"] >= 1 and st["address"] == tier.address
    assert not remote.is_open


async def test_paused_server_reads_time_out(tier: Tier) -> None:
    async with tier.backend(timeout=5.0, retry_after=0.3, part_size=16 * KiB) as b:
        k1, k2 = rand_key(), rand_key()
        d1, d2 = rand_bytes(4 * KiB, 1), rand_bytes(64 * KiB, 2)
        await b.write_many([(k1, d1), (k2, d2)])
        b.timeout = 0.5  # generous while the data went in (a loaded machine), short under test
        o1, o2 = torch.empty_like(d1), torch.empty_like(d2)
        tier.pause()
        try:
            t0 = time.monotonic()
            assert await b.read_into(k2, o2) is False
            assert 0.4 < time.monotonic() - t0 < 1.2
            t0 = time.monotonic()
            assert await b.read_into(k1, o1) is False  # the breaker answers at once
            assert await b.contains(k1) is False
            assert time.monotonic() - t0 < 0.2
            await asyncio.sleep(0.35)
            t0 = time.monotonic()
            assert await b.contains_many([k1, k2]) == [False, False]
            assert 0.4 < time.monotonic() - t0 < 1.2
            with pytest.raises(BackendError):
                await b.write(rand_key(), d1)
            assert b.stats()["timeouts"] == 2
        finally:
            tier.resume()
        # the tier comes back by itself once the server answers again
        await asyncio.sleep(0.35)
        deadline = time.monotonic() + 10
        while not await b.read_into(k2, o2):
            assert time.monotonic() < deadline, b.stats()
            await asyncio.sleep(0.2)
        assert torch.equal(o2, d2)
        assert await b.read_into(k1, o1) and torch.equal(o1, d1)


# --- every call is bounded, with and without the breaker ----------------------------------------------------
@pytest.mark.parametrize("fault", ["pause", "kill"])
@pytest.mark.parametrize("retry_after", [0.0, 30.0])
async def test_every_call_is_bounded_on_a_down_server(tier: Tier, fault: str, retry_after: float) -> None:
    """``retry_after=0`` turns the breaker off, so every call meets the down server itself; 30 s keeps it
    open after the first failure, so every later call is answered at once."""
    timeout = 0.5
    # one call may take the timeout, plus the deadline's allowance for its bytes (tiny here), plus slack for a
    # loaded 2-core machine
    bound = timeout + 0.7
    async with tier.backend(timeout=5.0, retry_after=retry_after, part_size=16 * KiB) as b:
        keys = [rand_key() for _ in range(4)]
        data = [rand_bytes(n, i) for i, n in enumerate((4 * KiB, 40 * KiB, 4 * KiB, 100 * KiB))]
        await b.write_many(list(zip(keys, data)))
        b.timeout = timeout  # generous while the data went in (a loaded machine), short under test
        getattr(tier, fault)()
        try:
            calls: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
                ("write", lambda: b.write(rand_key(), data[1])),
                ("write_many", lambda: b.write_many([(rand_key(), d) for d in data])),
                ("delete", lambda: b.delete(keys[0])),
                ("contains_many", lambda: b.contains_many(keys)),
                ("contains", lambda: b.contains(keys[1])),
                ("read_many", lambda: b.read_many([ReadRequest(k, torch.empty_like(d)) for k, d in zip(keys, data)])),
                ("object_size", lambda: b.object_size(keys[2])),
            ]
            before = b.stats()
            for rnd in range(2):
                for name, call in calls:
                    res, took = await _timed(call)
                    assert took < bound, (name, rnd, took)
                    if retry_after and (rnd or name != "write"):
                        assert took < 0.2, (name, rnd, took)  # the open breaker answers at once
                    if name.startswith("write"):
                        assert isinstance(res, BackendError), (name, res)
                        assert res.errno is not None
                    elif name == "contains_many":
                        assert res == [False] * 4
                    elif name == "read_many":
                        assert res == [False] * 4
                    elif name == "object_size":
                        assert res is None
                    else:
                        assert res is False, (name, res)
            st = b.stats()
            assert st["delete_errors"] - before["delete_errors"] == 2
            assert st["write_errors"] - before["write_errors"] == 4
            assert st["misses"] - before["misses"] == 2 * (4 + 0)  # read_many (contains counts no misses)
            if retry_after:
                assert st["unavailable"] > before["unavailable"]
            else:
                assert st["timeouts"] + st["errors"] - before["timeouts"] - before["errors"] >= 12
        finally:
            tier.resume()
    assert not b.is_open


async def test_close_is_bounded_on_a_paused_server(tier: Tier) -> None:
    b = tier.backend(timeout=5.0, retry_after=0.0)
    await b.open()
    await b.write(rand_key(), rand_bytes(4 * KiB))
    b.timeout = 0.5
    tier.pause()
    try:
        assert await b.contains(rand_key()) is False
        t0 = time.monotonic()
        await b.close()
        assert time.monotonic() - t0 < 2.0
    finally:
        tier.resume()
