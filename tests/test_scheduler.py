"""The I/O scheduler: priorities, deadlines, queue-depth limits, fairness, cancellation.

Driven through a latency-injecting wrapper around a real DRAM tier: the bytes are real, the device time is
simulated (one channel), and the wrapper logs the order in which operations reached the device.
"""

from __future__ import annotations

import asyncio

import attrs
import pytest
import torch

from kvpool import KVLayout, KVPool, ReadRequest
from kvpool.memory.dram import DRAMBackend
from kvpool.pool.scheduler import Priority, TierScheduler, io_class
from kvpool.testing.backend_tests import rand_bytes, rand_key
from kvpool.testing.faults import FaultyBackend, LatencyBackend

MiB = 1 << 20


async def make(latency: float = 0.01, **kw: int) -> tuple[LatencyBackend, TierScheduler]:
    dev = LatencyBackend(DRAMBackend(64 * MiB), latency=latency)
    await dev.open()
    return dev, TierScheduler(dev, **kw)


async def test_foreground_overtakes_queued_background() -> None:
    dev, io = await make(max_inflight=1, background_inflight=1, op_bytes=4096)
    keys = [rand_key() for _ in range(6)]
    data = {k: rand_bytes(4096) for k in keys}
    for k in keys:
        await dev.inner.write(k, data[k])
    dev.log.clear()

    async def background() -> None:
        with io_class(Priority.WRITE_BACK):
            await io.write_many([(rand_key(), rand_bytes(4096)) for _ in range(5)])

    bg = asyncio.ensure_future(background())
    await asyncio.sleep(0.001)  # the first background op is on the device, four are queued
    out = torch.empty(4096, dtype=torch.uint8)
    assert await io.read_into(keys[0], out)
    await bg
    kinds = [k for k, _, _ in dev.log]
    assert kinds.index("r") <= 1, kinds  # served right after the one background op already running
    assert torch.equal(out, data[keys[0]])


async def test_priority_classes_in_order() -> None:
    dev, io = await make(max_inflight=1, background_inflight=1, op_bytes=4096)
    order: list[str] = []
    blocker = asyncio.ensure_future(io.write(rand_key(), rand_bytes(4096)))  # occupies the device
    await asyncio.sleep(0.001)

    async def op(prio: Priority, name: str) -> None:
        with io_class(prio):
            await io.write(rand_key(), rand_bytes(4096))
        order.append(name)

    tasks = [asyncio.ensure_future(op(p, p.name)) for p in reversed(list(Priority))]
    await asyncio.gather(blocker, *tasks)
    assert order == ["FOREGROUND", "PREFETCH", "PROMOTION", "WRITE_BACK"]


async def test_deadlines_earliest_first_and_fifo_ties() -> None:
    dev, io = await make(max_inflight=1, op_bytes=4096)
    blocker = asyncio.ensure_future(io.write(rand_key(), rand_bytes(4096)))
    await asyncio.sleep(0.001)
    served: list[int] = []

    async def op(i: int, deadline: float) -> None:
        with io_class(Priority.FOREGROUND, deadline):
            await io.write(rand_key(), rand_bytes(4096))
        served.append(i)

    deadlines = [5.0, 1.0, 3.0, 1.0, 2.0]
    await asyncio.gather(blocker, *(op(i, d) for i, d in enumerate(deadlines)))
    assert served == [1, 3, 4, 2, 0]


async def test_queue_depth_limit_and_background_share() -> None:
    dev = LatencyBackend(DRAMBackend(64 * MiB), latency=0.01, channels=16)
    await dev.open()
    io = TierScheduler(dev, max_inflight=3, background_inflight=1, op_bytes=4096)
    peak = {"all": 0, "bg": 0}

    async def watch() -> None:
        while True:
            peak["all"] = max(peak["all"], io._running)
            peak["bg"] = max(peak["bg"], io._running_bg)
            await asyncio.sleep(0.001)

    w = asyncio.ensure_future(watch())

    async def bg() -> None:
        with io_class(Priority.PREFETCH):
            await io.write_many([(rand_key(), rand_bytes(4096)) for _ in range(6)])

    await asyncio.gather(bg(), io.write_many([(rand_key(), rand_bytes(4096)) for _ in range(6)]))
    w.cancel()
    assert peak["all"] == 3 and peak["bg"] == 1


async def test_fairness_between_concurrent_requests() -> None:
    dev, io = await make(latency=0.002, max_inflight=1, op_bytes=4096)
    keys = {name: [rand_key() for _ in range(4)] for name in "ab"}
    for ks in keys.values():
        for k in ks:
            await dev.inner.write(k, rand_bytes(4096))
    dev.log.clear()
    outs = [torch.empty(4096, dtype=torch.uint8) for _ in range(4)]
    await asyncio.gather(*(io.read_many([ReadRequest(k, o) for k, o in zip(ks, outs)]) for ks in keys.values()))
    who = ["a" if k in keys["a"] else "b" for _, k, _ in dev.log]
    # interleaved, not one request's whole batch before the other's
    assert who == ["a", "b"] * 4, who


async def test_cancellation_frees_the_slot() -> None:
    dev, io = await make(latency=0.05, max_inflight=1, op_bytes=4096)
    first = asyncio.ensure_future(io.write(rand_key(), rand_bytes(4096)))
    await asyncio.sleep(0.001)
    queued = asyncio.ensure_future(io.write(rand_key(), rand_bytes(4096)))
    await asyncio.sleep(0.001)
    queued.cancel()
    running = first
    running.cancel()
    for t in (queued, running):
        with pytest.raises(asyncio.CancelledError):
            await t
    assert io._running == 0 and io.stats()["cancelled"] >= 1
    k = rand_key()
    await asyncio.wait_for(io.write(k, rand_bytes(4096)), 1.0)  # the scheduler still serves
    assert await dev.contains(k)


async def test_stream_cancel_through_pool_returns_cleanly() -> None:
    layout = KVLayout(num_layers=8, num_kv_heads=2, head_dim=16, dtype=torch.float16, chunk_tokens=16)
    dev = LatencyBackend(DRAMBackend(8 * MiB), latency=0.01)
    async with await KVPool.open(layout=layout, model_id="m", backends=[dev]) as pool:
        t = list(range(64))
        await pool.put(t, torch.randn(layout.kv_shape(64)).half())
        agen = pool.stream(t, prefetch_layers=4, layer_time=0.005)
        async for layer, _ in agen:
            if layer == 2:
                break
        await agen.aclose()
        assert pool._io[0]._running == 0
        assert await pool.lookup(t) == 64


async def test_failing_lower_tier_degrades_to_misses() -> None:
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float16, chunk_tokens=16)
    top, bottom = DRAMBackend(4 * MiB), FaultyBackend(DRAMBackend(4 * MiB))
    async with await KVPool.open(layout=layout, model_id="m", backends=[top, bottom]) as pool:
        t, kv = list(range(32)), torch.randn(layout.kv_shape(32)).half()
        await pool.put(t, kv)
        for k in pool.keys_for(t):
            await top.delete(k)
        bottom.broken = True
        assert (await pool.get(t)).shape[2] == 0  # misses, no exception
        bottom.broken = False
        assert torch.equal(await pool.get(t), kv)


# --- the scheduler as a full proxy ----------------------------------------------------------------------------
class _RemoteLikeDRAM(DRAMBackend):
    """A real DRAM tier declared remote, so its membership queries are queued like a network tier's."""

    capabilities = attrs.evolve(DRAMBackend.capabilities, remote=True, queued_io=True)


async def test_membership_and_deletes_go_through_the_scheduler() -> None:
    local = DRAMBackend(MiB)
    remote = _RemoteLikeDRAM(MiB)
    for b in (local, remote):
        await b.open()
        io = TierScheduler(b, max_inflight=1)
        k = rand_key()
        await io.write(k, rand_bytes(4096))
        assert await io.contains_many([k, rand_key()]) == [True, False]
        assert await io.contains(k) and await io.object_size(k) == 4096
        assert await io.delete(k) and not await io.contains(k)
        assert io.stats()["ops_meta"] == 5
        await b.close()


async def test_remote_membership_queues_behind_the_running_operation() -> None:
    dev = LatencyBackend(_RemoteLikeDRAM(4 * MiB), latency=0.05)
    await dev.open()
    io = TierScheduler(dev, max_inflight=1)
    k = rand_key()
    await dev.inner.write(k, rand_bytes(4096))
    order: list[str] = []

    async def read() -> None:
        await io.read_into(k, torch.empty(4096, dtype=torch.uint8))
        order.append("read")

    async def lookup() -> None:
        await io.contains(k)
        order.append("contains")

    r = asyncio.ensure_future(read())
    await asyncio.sleep(0.01)  # the read holds the only slot
    await asyncio.gather(lookup(), r)
    assert order == ["read", "contains"]  # a remote round trip waits its turn on the connection
    local = TierScheduler(DRAMBackend(MiB), max_inflight=1)
    await local.backend.open()
    assert local.queued is False and not await local.contains(k)  # a local index lookup: straight through
    await local.backend.close()
    await dev.close()


class _WholeObjects(DRAMBackend):
    """A real DRAM tier that declares it reads whole objects only, and holds callers to that."""

    capabilities = attrs.evolve(DRAMBackend.capabilities, partial_reads=False, queued_io=True)

    async def read_into(self, key: bytes, dest: torch.Tensor, offset: int = 0) -> bool:
        size = await self.object_size(key)
        assert offset == 0 and (size is None or dest.numel() * dest.element_size() == size), "a range was asked"
        return await super().read_into(key, dest, offset)


async def test_range_reads_on_a_whole_object_tier() -> None:
    layout = KVLayout(num_layers=4, num_kv_heads=2, head_dim=8, dtype=torch.float16, chunk_tokens=16)
    kv = torch.randn(layout.kv_shape(48)).half()
    tokens = list(range(48))
    async with await KVPool.open(layout=layout, model_id="m", backends=[_WholeObjects(8 * MiB)]) as pool:
        await pool.put(tokens, kv)
        seen = [(layer, x.clone()) async for layer, x in pool.stream(tokens)]  # layer-wise: ranges of objects
        assert [layer for layer, _ in seen] == list(range(4))
        for layer, x in seen:
            assert torch.equal(x, kv[layer])
        assert torch.equal(await pool.get(tokens), kv)  # whole objects go straight through
        io = pool.stats()["tiers"][0]["io"]
        assert io["whole_object_reads"] == 4 * 3  # each layer read each of the 3 objects whole, once
    sched = TierScheduler(_WholeObjects(MiB))
    await sched.backend.open()
    k, d = rand_key(), rand_bytes(8192)
    await sched.write(k, d)
    with pytest.raises(ValueError):
        await sched.read_into(k, torch.empty(100, dtype=torch.uint8), 8100)
    out = torch.empty(3, dtype=torch.uint8)
    assert await sched.read_into(k, out, 5) and torch.equal(out, d[5:8])
    assert not await sched.read_into(rand_key(), out, 5)
    await sched.backend.close()


async def _split_batch_tier() -> tuple[DRAMBackend, FaultyBackend, TierScheduler]:
    """A tier whose batches are cut into 1 MiB operations that run in parallel (4 channels at 10 MiB/s:
    0.1 s per MiB), so that a small failing operation ends long before its siblings."""
    dram = DRAMBackend(64 * MiB)
    dev = FaultyBackend(LatencyBackend(dram, bandwidth=10 * MiB, channels=4))
    await dev.open()
    return dram, dev, TierScheduler(dev, op_bytes=1 * MiB, max_inflight=8)


async def test_a_failed_write_batch_waits_for_its_sibling_operations() -> None:
    dram, dev, sched = await _split_batch_tier()
    keys = [rand_key() for _ in range(4)]
    dev.fail_keys, dev.write_fail = {keys[0]}, 1.0  # the first operation fails at once
    items = [(keys[0], rand_bytes(4096))] + [(k, rand_bytes(1 * MiB)) for k in keys[1:]]
    with pytest.raises(OSError):
        await sched.write_many(items)
    # when the error reaches the caller, no sibling operation is still reading the caller's tensors
    assert sched.stats()["running"] == 0
    assert await dram.contains_many(keys[1:]) == [True] * 3
    await dev.close()


async def test_a_failed_read_batch_waits_for_its_sibling_operations() -> None:
    dram, dev, sched = await _split_batch_tier()
    keys = [rand_key() for _ in range(4)]
    data = [rand_bytes(4096)] + [rand_bytes(1 * MiB) for _ in keys[1:]]
    await dram.write_many(list(zip(keys, data)))
    outs = [torch.zeros(4096, dtype=torch.uint8)] + [torch.zeros(1 * MiB, dtype=torch.uint8) for _ in keys[1:]]
    # the first request's range lies outside its object: that operation raises, the others take 0.1 s
    reqs = [ReadRequest(keys[0], outs[0], 4096)] + [ReadRequest(k, o) for k, o in zip(keys[1:], outs[1:])]
    with pytest.raises(ValueError):
        await sched.read_many(reqs)
    assert sched.stats()["running"] == 0
    # every sibling read had landed before the call raised: nothing writes into the caller's memory later
    assert all(torch.equal(o, d) for o, d in zip(outs[1:], data[1:]))
    await dev.close()
