"""SyncPool from plain threads: the same results as the async pool, many threads at once, clean shutdown."""

from __future__ import annotations

import threading

import pytest
import torch

import kvpool

LAYOUT = kvpool.KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float32, chunk_tokens=16)


def _kv(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(LAYOUT.kv_shape(n), generator=g)


def test_round_trip_and_context_manager() -> None:
    with kvpool.SyncPool.open(layout=LAYOUT, model_id="m", backends=["dram://?capacity=16MiB"]) as pool:
        toks = list(range(40))
        kv = _kv(40, 1)
        assert pool.put(toks, kv) == 32
        assert pool.lookup(toks) == 32
        got = pool.get(toks)
        assert torch.equal(got, kv[:, :, :32])
        out = torch.zeros(LAYOUT.kv_shape(32))
        assert pool.get_into(toks, out) == 32
        assert torch.equal(out, kv[:, :, :32])
        assert pool.stats()["puts"] == 1
        pool.flush()
        assert pool.delete(toks) == 32
        assert pool.lookup(toks) == 0
    assert pool.closed
    with pytest.raises(kvpool.PoolClosedError):
        pool.lookup(toks)
    pool.close()  # idempotent


def test_many_threads() -> None:
    errors: list[BaseException] = []
    with kvpool.SyncPool.open(layout=LAYOUT, model_id="m", backends=["dram://?capacity=64MiB"]) as pool:

        def worker(i: int) -> None:
            try:
                for j in range(20):
                    toks = [i * 1000 + j] * 32  # distinct per (thread, iteration)
                    kv = _kv(32, i * 100 + j)
                    assert pool.put(toks, kv) == 32
                    assert torch.equal(pool.get(toks), kv)
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[0]


def test_open_failure_stops_thread() -> None:
    before = threading.active_count()
    with pytest.raises(kvpool.ConfigError):
        kvpool.SyncPool.open(layout=LAYOUT, model_id="m", backends=["nope://x"])
    assert threading.active_count() == before


def test_submit_returns_future() -> None:
    with kvpool.SyncPool.open(layout=LAYOUT, model_id="m", backends=["dram://?capacity=16MiB"]) as pool:
        kv = _kv(16, 3)
        fut = pool.submit(pool.pool.put(list(range(16)), kv))
        assert fut.result(timeout=10) == 16


def test_calling_from_loop_thread_is_refused() -> None:
    with kvpool.SyncPool.open(layout=LAYOUT, model_id="m", backends=["dram://?capacity=16MiB"]) as pool:

        async def inner() -> None:
            with pytest.raises(RuntimeError, match="another thread"):
                pool.lookup([1] * 16)

        pool.submit(inner()).result(timeout=10)
