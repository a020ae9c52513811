"""The striped tier (``kvpool.striped.backend``) and placement (``kvpool.striped.placement``): the conformance suite
over uring files of different sizes and over DRAM, bandwidth-proportional splits, copy-free strided pieces,
persistence across reopen (and weight changes), failing children, bandwidth probes, loop block devices."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpool import BackendError, CapacityError, ConfigError, KVLayout, KVPool
from kvpool.storage.backend import Backend, ReadRequest
from kvpool.memory.dram import DRAMBackend
from kvpool.striped.backend import StripedBackend
from kvpool.striped.records import META_MAGIC, piece_key
from kvpool.ssd.store import UringBackend
from kvpool.config import BackendSpec
from kvpool.striped.placement import BandwidthProbe, makespan, split_by_weight
from kvpool.testing import BackendTests
from kvpool.testing.backend_tests import rand_bytes, rand_key

KiB = 1 << 10
MiB = 1 << 20


def aligned_empty(shape: tuple[int, ...], dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    raw = torch.empty(n + 4096, dtype=torch.uint8)
    s = (-raw.data_ptr()) % 4096
    return raw[s : s + n].view(dtype).view(shape)


async def child_pieces(child: Backend) -> dict[bytes, int]:
    """Sizes of a child's objects that are pieces (not records)."""
    out = {}
    async for k in child.keys():
        if k[:8] != META_MAGIC:
            size = await child.object_size(k)
            assert size is not None
            out[k] = size
    return out


# --- placement: split_by_weight -----------------------------------------------------------------------------
def test_split_basic() -> None:
    assert split_by_weight(32 * MiB, [1, 2]) == [11186176, 22368256]
    assert sum(split_by_weight(10_000, [1, 2])) == 10_000
    assert split_by_weight(0, [1, 2]) == [0, 0]
    assert split_by_weight(64 * KiB, [3, 0, 1]) == [48 * KiB, 0, 16 * KiB]  # weight 0 gets nothing
    # a full device (limit 0) and a nearly full one: the rest goes to the others, still by weight
    assert split_by_weight(40 * KiB, [1, 1, 1], limits=[0, 8 * KiB, None]) == [0, 8 * KiB, 32 * KiB]
    with pytest.raises(ValueError):
        split_by_weight(40 * KiB, [1, 1], limits=[8 * KiB, 8 * KiB])
    with pytest.raises(ValueError):
        split_by_weight(4096, [0, 0])
    with pytest.raises(ValueError):
        split_by_weight(4096, [1, -1])


@settings(max_examples=300, deadline=None, database=None)
@given(
    nbytes=st.integers(0, 1 << 30),
    weights=st.lists(st.floats(0, 1e10, allow_nan=False), min_size=1, max_size=6),
    align=st.sampled_from([512, 4096, 65536, 3 * 4096]),
    seed=st.one_of(st.none(), st.integers(0, (1 << 64) - 1)),
)
def test_split_properties(nbytes: int, weights: list[float], align: int, seed: int | None) -> None:
    if not any(w > 0 for w in weights):
        with pytest.raises(ValueError):
            split_by_weight(max(nbytes, 1), weights, align, seed=seed)
        return
    out = split_by_weight(nbytes, weights, align, seed=seed)
    assert sum(out) == nbytes and all(x >= 0 for x in out)
    nz = [i for i, x in enumerate(out) if x]
    for i in nz[:-1]:
        assert out[i] % align == 0  # only the last piece carries the unaligned tail
    for i, w in enumerate(weights):
        if w == 0:
            assert out[i] == 0
    # within one unit of the exact proportional share (two for the piece that carries the partial unit)
    total_w = sum(weights)
    units = -(-nbytes // align)
    for i, w in enumerate(weights):
        assert abs(out[i] / align - units * w / total_w) <= 2.0 + 1e-6


@settings(max_examples=200, deadline=None, database=None)
@given(
    nbytes=st.integers(1, 1 << 26),
    weights=st.lists(st.floats(0.1, 10), min_size=2, max_size=4),
    data=st.data(),
)
def test_split_limits(nbytes: int, weights: list[float], data: Any) -> None:
    limits = data.draw(st.lists(st.one_of(st.none(), st.integers(0, 1 << 26)), min_size=len(weights),
                                max_size=len(weights)))
    try:
        out = split_by_weight(nbytes, weights, 4096, limits)
    except ValueError:
        room = sum((lim // 4096) * 4096 if lim is not None else 1 << 40 for lim in limits)
        assert room < -(-nbytes // 4096) * 4096 or all(lim is not None and lim < 4096 for lim in limits)
        return
    assert sum(out) == nbytes
    for x, lim in zip(out, limits):
        assert lim is None or x <= lim


def test_split_seeded_rounding_spreads_small_objects() -> None:
    # one-unit objects over weights 1:3: each goes whole to one device, a quarter of them to the first
    counts = [0, 0]
    for s in range(4000):
        out = split_by_weight(4096, [1, 3], seed=int.from_bytes(os.urandom(8), "little") ^ s)
        counts[out.index(4096)] += 1
    assert 800 < counts[0] < 1200


def test_makespan() -> None:
    assert makespan([1, 2], [1, 2]) == pytest.approx(1.0)
    assert makespan([2, 2], [1, 3]) == pytest.approx(2.0)


# --- conformance ---------------------------------------------------------------------------------------------
class TestStripedUringConformance(BackendTests):
    """Two pool files of different sizes, weighted 1:2 by ``bw=`` hints in their specs."""

    async def make_backend(self, tmp_path: Path, capacity: int) -> StripedBackend:
        tmp_path.mkdir(parents=True, exist_ok=True)
        small = capacity * 3 // 8 + 256 * KiB
        large = capacity * 5 // 8 + 256 * KiB
        return StripedBackend.from_specs([
            f"uring://{tmp_path}/a.kv?capacity={small}&bounce=8MiB&bw=1GB/s",
            f"uring://{tmp_path}/b.kv?capacity={large}&bounce=8MiB&bw=2GB/s",
        ])


class TestStripedDramConformance(BackendTests):
    """Two DRAM children, weighted by a bandwidth probe at open."""

    async def make_backend(self, tmp_path: Path, capacity: int) -> StripedBackend:
        probe = BandwidthProbe(nbytes=2 * MiB, object_nbytes=512 * KiB, use_cache=False)
        return StripedBackend([DRAMBackend(capacity // 2), DRAMBackend(capacity // 2)], probe=probe)


class TestStripedThreeWayConformance(BackendTests):
    """Three unequal children, one of them far too small for its share (placement by free space)."""

    async def make_backend(self, tmp_path: Path, capacity: int) -> StripedBackend:
        return StripedBackend(
            [DRAMBackend(capacity // 8), DRAMBackend(capacity // 2), DRAMBackend(capacity * 3 // 8)],
            weights=[4, 1, 2],
        )


# --- weights and splits ------------------------------------------------------------------------------------
async def test_weights_honoured(tmp_path: Path) -> None:
    b = StripedBackend([UringBackend(tmp_path / "a", 64 * MiB), UringBackend(tmp_path / "b", 64 * MiB)],
                       weights=[1, 3])
    async with b:
        data = {rand_key(): rand_bytes(8 * MiB, i) for i in range(4)}
        await b.write_many(list(data.items()))
        a_sizes = sorted((await child_pieces(b.children[0])).values())
        b_sizes = sorted((await child_pieces(b.children[1])).values())
        assert len(a_sizes) == len(b_sizes) == 4
        for x, y in zip(a_sizes, b_sizes):
            assert x % 4096 == 0
            assert abs(y / x - 3.0) < 0.01
            assert x + y == 8 * MiB
        for k, d in data.items():
            out = aligned_empty((8 * MiB,))
            assert await b.read_into(k, out) and torch.equal(out, d)
        st_ = b.stats()
        assert st_["weights"] == [1.0, 3.0] and len(st_["children"]) == 2
        assert st_["capacity"] == b.children[0].capacity + b.children[1].capacity  # type: ignore[operator]


async def test_hints_from_specs(tmp_path: Path) -> None:
    b = StripedBackend.from_specs([
        f"uring://{tmp_path}/a?capacity=32MiB&bw=3GB/s",
        f"uring://{tmp_path}/b?capacity=32MiB&bw=1.5GB/s",
    ])
    assert isinstance(b.children[0], UringBackend) and b.children[0].capacity == 32 * MiB
    async with b:
        assert b.weights == [3e9, 1.5e9]
        assert b.weight_sources == ["hint", "hint"]
        assert b.capabilities.read_bandwidth == pytest.approx(4.5e9)
        assert b.capabilities.persistent


def test_from_spec_and_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="nested list"):
        StripedBackend.from_spec(BackendSpec.parse("striped://?x=1"))
    with pytest.raises(ConfigError):
        StripedBackend([])
    with pytest.raises(ConfigError):
        StripedBackend([DRAMBackend(1 * MiB)], weights=[1, 2])
    with pytest.raises(ConfigError):
        StripedBackend([DRAMBackend(1 * MiB), DRAMBackend(1 * MiB)], weights=[0, 0])
    d = DRAMBackend(1 * MiB)
    with pytest.raises(ConfigError):
        StripedBackend([d, d])


async def test_strided_pieces_are_views_not_copies(tmp_path: Path) -> None:
    """A chunk view of a caller's [L, 2, T, H, D] tensor is split on row boundaries (no packing copy) and read
    back into such a view in place (no temporary); layer ranges read like pool.stream does."""
    # 64 rows (K or V of a layer) per object: a 1:2 split on rows is within 1 % of the best one
    layout = KVLayout(num_layers=32, num_kv_heads=4, head_dim=64, dtype=torch.float16, chunk_tokens=64)
    kv = aligned_empty(layout.kv_shape(256), torch.float16)
    kv.copy_(torch.randn(layout.kv_shape(256)))
    b = StripedBackend([UringBackend(tmp_path / "a", 64 * MiB), UringBackend(tmp_path / "b", 64 * MiB)],
                       weights=[1, 2])
    async with b:
        keys = [rand_key() for _ in range(4)]
        await b.write_many([(k, layout.chunk_view(kv, c)) for c, k in enumerate(keys)])
        assert b.counters["contiguous_copies"] == 0
        for k in keys:
            pieces = b._index[k].pieces
            assert len(pieces) == 2 and pieces[0][2] % (64 * 4 * 64 * 2) == 0  # whole rows
        out = aligned_empty(layout.kv_shape(256), torch.float16)
        res = await b.read_many([ReadRequest(k, layout.chunk_view(out, c)) for c, k in enumerate(keys)])
        assert res == [True] * 4 and torch.equal(out, kv)
        assert b.counters["temp_reads"] == 0
        assert b.children[0].stats()["direct_reads"] > 0  # straight into the caller's memory
        # layer by layer, as pool.stream reads: [2, T, H, D] views at layer offsets
        for layer in range(layout.num_layers):
            x = aligned_empty((2, 256, 4, 64), torch.float16)
            views = [layout.layer_chunk_view(x, c) for c in range(4)]
            off = layout.layer_offset(layer)
            assert await b.read_many([ReadRequest(k, v, off) for k, v in zip(keys, views)]) == [True] * 4
            assert torch.equal(x, kv[layer])
        # an odd range of bytes into a flat buffer
        flat = torch.empty(10_001, dtype=torch.uint8)
        assert await b.read_into(keys[1], flat, 123_456)
        ref = layout.chunk_view(kv, 1).contiguous().view(-1).view(torch.uint8)[123_456 : 133_457]
        assert torch.equal(flat, ref)


async def test_split_not_on_rows_copies_once(tmp_path: Path) -> None:
    b = StripedBackend([DRAMBackend(16 * MiB), DRAMBackend(16 * MiB)], weights=[1, 2])
    async with b:
        x = torch.randn(3, 2, 400, 7)  # rows of 8960 bytes: no 4 KiB-aligned split falls on them
        v = x[:, :, 5:325]
        k = rand_key()
        await b.write(k, v)
        assert len(b._index[k].pieces) == 2
        assert b.counters["contiguous_copies"] == 1
        out = torch.zeros_like(x)
        assert await b.read_into(k, out[:, :, 5:325])
        assert torch.equal(out[:, :, 5:325], v) and torch.count_nonzero(out[:, :, :5]) == 0
        assert b.counters["temp_reads"] == 1


# --- persistence -------------------------------------------------------------------------------------------
async def test_reopen_keeps_objects_written_under_old_weights(tmp_path: Path) -> None:
    def make(weights: list[float]) -> StripedBackend:
        return StripedBackend(
            [UringBackend(tmp_path / "a", 48 * MiB), UringBackend(tmp_path / "b", 96 * MiB)], weights=weights
        )

    data = {rand_key(): rand_bytes(3 * MiB + 4096 * i + i, i) for i in range(6)}
    ks = list(data)
    async with make([1, 1]) as b:
        await b.write_many(list(data.items()))
        over = rand_bytes(1 * MiB + 5, 99)
        await b.write(ks[0], over)  # overwrite: the old pieces go
        data[ks[0]] = over
        await b.delete(ks[1])
        del data[ks[1]]
        old_split = {k: b._index[k].pieces for k in data}
    async with make([1, 4]) as b:
        assert b.stats()["recovered_objects"] == len(data)
        assert b.stats()["gc_deleted"] == 0
        assert {k async for k in b.keys()} == set(data)
        for k, d in data.items():
            assert b._index[k].pieces == old_split[k]  # the recorded split, not today's weights
            out = torch.empty_like(d)
            assert await b.read_into(k, out) and torch.equal(out, d)
            assert await b.object_size(k) == d.numel()
        k_new, d_new = rand_key(), rand_bytes(5 * MiB, 7)
        await b.write(k_new, d_new)
        (_, _, n0), (_, _, n1) = b._index[k_new].pieces
        assert abs(n1 / n0 - 4) < 0.01
        data[k_new] = d_new
    async with make([2, 1]) as b:
        for k, d in data.items():
            out = torch.empty_like(d)
            assert await b.read_into(k, out) and torch.equal(out, d)


async def test_reopen_collects_leftovers_and_drops_incomplete(tmp_path: Path) -> None:
    def make() -> StripedBackend:
        return StripedBackend([UringBackend(tmp_path / "a", 32 * MiB), UringBackend(tmp_path / "b", 32 * MiB)],
                              weights=[1, 1])

    async with make() as b:
        k_ok, k_broken = rand_key(), rand_key()
        await b.write(k_ok, rand_bytes(1 * MiB, 1))
        await b.write(k_broken, rand_bytes(1 * MiB, 2))
        obj = b._index[k_broken]
        # a crash between pieces and record leaves a piece that no record names
        await b.children[1].write(piece_key(rand_key(), 12345, 1), rand_bytes(64 * KiB))
        # a piece lost behind the tier's back: the object must not come back
        await b.children[1].delete(piece_key(obj.key, obj.seq, 1))
    async with make() as b:
        assert await b.contains(k_ok)
        assert not await b.contains(k_broken)
        assert b.stats()["dropped_on_recovery"] == 1
        assert b.stats()["gc_deleted"] >= 3  # the orphan, the broken object's other piece and its record
        objs = [len([k async for k in c.keys()]) for c in b.children]
        assert sum(objs) == 3  # k_ok's two pieces and its record


async def test_evicted_piece_is_a_miss_and_the_rest_is_freed() -> None:
    b = StripedBackend([DRAMBackend(8 * MiB), DRAMBackend(8 * MiB)], weights=[1, 1])
    async with b:
        k = rand_key()
        await b.write(k, rand_bytes(1 * MiB))
        obj = b._index[k]
        await b.children[0].delete(piece_key(k, obj.seq, 0))  # as if the child evicted it
        out = torch.empty(1 * MiB, dtype=torch.uint8)
        assert await b.read_into(k, out) is False
        assert not await b.contains(k)
        await b._drain()
        assert b.used_bytes == 0


# --- failing children ---------------------------------------------------------------------------------------
class FlakyDRAM(DRAMBackend):
    """A DRAM tier whose I/O raises while ``broken`` is set (a dying device)."""

    broken = False

    def _maybe_fail(self) -> None:
        if self.broken:
            raise BackendError(5, "injected I/O error")

    async def write(self, key: bytes, src: torch.Tensor) -> None:
        self._maybe_fail()
        await super().write(key, src)

    async def read_into(self, key: bytes, dest: torch.Tensor, offset: int = 0) -> bool:
        self._maybe_fail()
        return await super().read_into(key, dest, offset)

    async def contains_many(self, keys: Any) -> list[bool]:
        self._maybe_fail()
        return await super().contains_many(keys)


async def test_failing_child_reads_miss_writes_degrade() -> None:
    good, bad = FlakyDRAM(16 * MiB), FlakyDRAM(16 * MiB)
    b = StripedBackend([good, bad], weights=[1, 1], retry_after=3600)
    async with b:
        before = {rand_key(): rand_bytes(1 * MiB, i) for i in range(3)}
        await b.write_many(list(before.items()))
        bad.broken = True
        for k, d in before.items():
            assert await b.read_into(k, torch.empty_like(d)) is False  # a failed child's reads are misses
        assert b.stats()["down"] == [False, True]
        assert b.stats()["child_errors"] >= 1
        # new objects go to the healthy child only
        after = {rand_key(): rand_bytes(1 * MiB, 10 + i) for i in range(3)}
        await b.write_many(list(after.items()))
        for k, d in after.items():
            assert [c for c, _s, _n in b._index[k].pieces] == [0]
            out = torch.empty_like(d)
            assert await b.read_into(k, out) and torch.equal(out, d)
            assert await b.contains(k)
        assert b.stats()["degraded_writes"] >= 3
        # the failure was transient: objects on it read again, and it takes writes once it is retried
        bad.broken = False
        for k, d in before.items():
            out = torch.empty_like(d)
            assert await b.read_into(k, out) and torch.equal(out, d)
        b._retry_after = 0
        b._down_until = [0.0, 0.0]
        k = rand_key()
        await b.write(k, rand_bytes(1 * MiB))
        assert len(b._index[k].pieces) == 2


async def test_child_failing_mid_write_is_retried_on_the_others() -> None:
    good, bad = FlakyDRAM(16 * MiB), FlakyDRAM(16 * MiB)
    b = StripedBackend([good, bad], weights=[1, 3])
    async with b:
        bad.broken = True  # not yet known to be down: the first attempt fails, the retry avoids it
        k, d = rand_key(), rand_bytes(2 * MiB)
        await b.write(k, d)
        assert [c for c, _s, _n in b._index[k].pieces] == [0]
        out = torch.empty_like(d)
        assert await b.read_into(k, out) and torch.equal(out, d)
        assert bad.used_bytes == 0  # nothing left behind on the failed child... (it never stored anything)
        assert good.used_bytes <= 2 * MiB + 4096
        good.broken = True  # every child failing: the write raises, nothing is published
        k2 = rand_key()
        with pytest.raises(BackendError):
            await b.write(k2, d)
        assert not await b.contains(k2)


async def test_closed_uring_child(tmp_path: Path) -> None:
    a, c = UringBackend(tmp_path / "a", 32 * MiB), UringBackend(tmp_path / "b", 32 * MiB)
    b = StripedBackend([a, c], weights=[1, 1])
    async with b:
        k, d = rand_key(), rand_bytes(2 * MiB)
        await b.write(k, d)
        await c.close()  # the device went away
        assert await b.read_into(k, torch.empty_like(d)) is False
        assert not await b.contains(k)
        k2 = rand_key()
        await b.write(k2, d)
        out = torch.empty_like(d)
        assert await b.read_into(k2, out) and torch.equal(out, d)
        assert b.stats()["down"] == [False, True]


async def test_full_child_gets_no_share() -> None:
    tiny, big = DRAMBackend(256 * KiB), DRAMBackend(32 * MiB)
    b = StripedBackend([tiny, big], weights=[10, 1])
    async with b:
        k, d = rand_key(), rand_bytes(4 * MiB)
        await b.write(k, d)
        (c0, _s0, n0), (c1, _s1, n1) = b._index[k].pieces
        assert n0 <= 256 * KiB and n0 + n1 == 4 * MiB
        out = torch.empty_like(d)
        assert await b.read_into(k, out) and torch.equal(out, d)
        with pytest.raises(CapacityError):
            await b.write(rand_key(), torch.zeros(40 * MiB, dtype=torch.uint8))
        assert await b.contains(k)


async def test_overwrite_during_reads_never_mixes_pieces() -> None:
    b = StripedBackend([DRAMBackend(64 * MiB), DRAMBackend(64 * MiB)], weights=[1, 1])
    async with b:
        k = rand_key()
        versions = [rand_bytes(8 * MiB, i) for i in range(4)]
        await b.write(k, versions[0])

        async def reader() -> None:
            for _ in range(10):
                out = torch.empty(8 * MiB, dtype=torch.uint8)
                assert await b.read_into(k, out)
                assert any(torch.equal(out, v) for v in versions)

        await asyncio.gather(*(reader() for _ in range(4)), *(b.write(k, v) for v in versions[1:]))
        await b._drain()
        # one version left: two pieces and a record
        assert sum(len(c) for c in b.children if isinstance(c, DRAMBackend)) == 3


# --- bandwidth probe -----------------------------------------------------------------------------------------
async def test_probe_at_open_is_cached_next_to_the_pool_file(tmp_path: Path) -> None:
    probe = BandwidthProbe(nbytes=8 * MiB, object_nbytes=2 * MiB)

    def make() -> StripedBackend:
        return StripedBackend([UringBackend(tmp_path / "a", 32 * MiB), UringBackend(tmp_path / "b", 32 * MiB)],
                              probe=probe)

    async with make() as b:
        assert b.weight_sources == ["probe", "probe"]
        assert all(w > 0 for w in b.weights)
        assert b.used_bytes == 0  # probe objects deleted
        assert not [k async for k in b.children[0].keys()]
    cache = json.loads((tmp_path / "a.bw.json").read_text())
    assert cache["read_bandwidth"] > 0 and cache["identity"]["path"] == str(tmp_path / "a")
    async with make() as b:
        assert b.weight_sources == ["probe-cache", "probe-cache"]
        assert b.weights[0] == pytest.approx(cache["read_bandwidth"])


async def test_probe_cache_dir_and_skip_without_room(tmp_path: Path) -> None:
    probe = BandwidthProbe(nbytes=4 * MiB, object_nbytes=1 * MiB, cache_dir=tmp_path / "bw")
    d = DRAMBackend(16 * MiB)
    assert probe.cache_path(d) is None  # nothing to name it by
    async with d:
        r = await probe.get(d)
        assert r is not None and r.read_bandwidth > 0 and not r.cached
        await d.write(rand_key(), rand_bytes(15 * MiB))
        assert await probe.measure(d) is None  # would evict: skipped
    u = UringBackend(tmp_path / "p", 16 * MiB)
    assert probe.cache_path(u) == Path(str(tmp_path / "p") + ".bw.json")


async def test_probe_at_reopen_never_evicts_stored_objects(tmp_path: Path) -> None:
    """Issue 15.1: a reopened striped tier probed its children while they held data; the probe's large
    objects did not fit the fragmented free space, the child evicted, and acknowledged objects were gone."""
    child = tmp_path / "a.kv"
    keys = [rand_key() for _ in range(1000)]  # 8 KiB pieces + 4 KiB records: 12 of the 16 MiB
    async with StripedBackend([UringBackend(child, 16 * MiB)], probe=False) as b:
        for k in keys:
            await b.write(k, torch.full((8 * KiB,), k[0], dtype=torch.uint8))
        assert b.children[0].stats()["evictions"] == 0
        for k in keys[::2]:  # free space in holes of a few blocks: no room for a 2 MiB probe object
            await b.delete(k)
    probe = BandwidthProbe(nbytes=8 * MiB, object_nbytes=2 * MiB, use_cache=False)
    async with StripedBackend([UringBackend(child, 16 * MiB)], probe=probe) as b:
        assert b.children[0].stats()["evictions"] == 0
        out = torch.empty(8 * KiB, dtype=torch.uint8)
        lost = [k for k in keys[1::2] if not (await b.read_into(k, out) and bool((out == k[0]).all()))]
        assert not lost, f"{len(lost)} of {len(keys[1::2])} stored objects lost at reopen"
        assert b.weight_sources == ["default"]  # a child holding data is not probed


# --- the pool ----------------------------------------------------------------------------------------------
async def test_pool_with_a_striped_tier(tmp_path: Path) -> None:
    layout = KVLayout(num_layers=4, num_kv_heads=4, head_dim=64, dtype=torch.float16, chunk_tokens=64)
    tokens = list(range(256))
    kv = torch.randn(layout.kv_shape(256)).half()
    tier = [f"uring://{tmp_path}/a.kv?capacity=16MiB", f"uring://{tmp_path}/b.kv?capacity=32MiB"]
    backends: list[Any] = [tier]  # a nested list is one striped tier
    async with await KVPool.open(layout=layout, model_id="m", backends=backends) as pool:
        assert isinstance(pool.tiers[0], StripedBackend)
        await pool.put(tokens, kv)
    async with await KVPool.open(layout=layout, model_id="m", backends=backends) as pool:
        assert await pool.lookup(tokens) == 256
        assert torch.equal(await pool.get(tokens), kv)
        layers = [x async for _, x in pool.stream(tokens)]
        assert all(torch.equal(x, kv[i]) for i, x in enumerate(layers))


# --- loop block devices --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_loopdevs(module_loops: Callable[[int], str]) -> list[str]:
    return [module_loops(48 * MiB), module_loops(96 * MiB)]


@pytest.mark.blockdev
async def test_striping_over_two_block_devices(two_loopdevs: list[str], tmp_path: Path) -> None:
    for dev in two_loopdevs:  # blank devices
        with open(dev, "r+b", buffering=0) as f:
            f.write(b"\0" * 4096)
    probe = BandwidthProbe(nbytes=8 * MiB, object_nbytes=2 * MiB, cache_dir=tmp_path / "bw")

    def make() -> StripedBackend:
        # fresh loop devices hold zeros: kvpool formats only what it is told to
        return StripedBackend([UringBackend(d, format=True) for d in two_loopdevs], probe=probe)

    layout = KVLayout(num_layers=8, num_kv_heads=4, head_dim=64, dtype=torch.float16, chunk_tokens=128)
    kv = aligned_empty(layout.kv_shape(512), torch.float16)
    kv.copy_(torch.randn(layout.kv_shape(512)))
    keys = [rand_key() for _ in range(4)]
    async with make() as b:
        assert all(c.stats()["block_device"] for c in b.children)
        assert b.weight_sources == ["probe", "probe"]
        assert len(list((tmp_path / "bw").glob("*.bw.json"))) == 2
        await b.write_many([(k, layout.chunk_view(kv, c)) for c, k in enumerate(keys)])
        assert all(len(b._index[k].pieces) == 2 for k in keys)
    async with make() as b:
        assert b.weight_sources == ["probe-cache", "probe-cache"]
        out = aligned_empty(layout.kv_shape(512), torch.float16)
        assert await b.read_many([ReadRequest(k, layout.chunk_view(out, c)) for c, k in enumerate(keys)]) == [True] * 4
        assert torch.equal(out, kv)
        flat = aligned_empty((layout.chunk_nbytes,))
        assert await b.read_into(keys[3], flat)
        assert torch.equal(flat, layout.chunk_view(kv, 3).contiguous().view(-1).view(torch.uint8))


async def test_pool_nested_list_builds_a_striped_tier(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import torch

    import kvpool
    from kvpool.striped.backend import StripedBackend

    layout = kvpool.KVLayout(num_layers=4, num_kv_heads=4, head_dim=64, dtype=torch.float16, chunk_tokens=64)
    backends = ["dram://?capacity=4MiB",
                [f"uring://{tmp_path}/a.kv?capacity=32MiB&bw=300MB/s", f"uring://{tmp_path}/b.kv?capacity=32MiB&bw=600MB/s"]]
    t = list(range(256))
    kv = torch.randn(layout.kv_shape(256)).half()
    async with await kvpool.KVPool.open(layout=layout, model_id="m", backends=backends) as pool:
        assert isinstance(pool.tiers[1], StripedBackend)
        await pool.put(t, kv)
    async with await kvpool.KVPool.open(layout=layout, model_id="m", backends=backends) as pool:
        assert await pool.lookup(t) == 256  # DRAM is empty after reopen: found on the striped SSD tier
        assert torch.equal(await pool.get(t), kv)
