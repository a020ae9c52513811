"""kvpool as SGLang's HiCache L3 storage, tested against SGLang 0.5.23's own classes.

The backend is built through SGLang's ``StorageBackendFactory`` dynamic route exactly as a server builds it
(``cls(storage_config, kwargs)``, then ``register_mem_pool_host``) and subclasses the real ``HiCacheStorage``.

Host pools: SGLang's ``MHATokenToKVPoolHost``/``MLATokenToKVPoolHost`` cannot be imported on this CPU-only
machine (its model-config registry imports a CUDA torchvision), so the host pools are
:mod:`kvpool.testing.sglang_host`'s stand-ins, whose methods are compiled from the installed SGLang source.

Install SGLang for these tests with ``bash .ci/install_sglang.sh``.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip(
    "sglang.srt.mem_cache.storage.backend_factory",
    reason="sglang 0.5.23 is not installed (test-only: bash .ci/install_sglang.sh)",
)

from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig
from sglang.srt.mem_cache.storage import StorageBackendFactory

import kvpool
from kvpool import Backend, BackendError, ReadRequest
from kvpool.storage.backend import Capabilities
from kvpool.testing.faults import ForwardingBackend
from kvpool.integrations.sglang import KVPoolHiCacheStorage
from kvpool.testing.sglang_host import MHATokenToKVPoolHost, MLATokenToKVPoolHost, host_indices

PAGE = 64  # tokens per page


# --- host pools whose methods are SGLang's own source (kvpool.testing.sglang_host) -------------------------------
def make_host(kind: str, layout: str, pages: int = 16) -> Any:
    return MHATokenToKVPoolHost(layout, pages) if kind == "mha" else MLATokenToKVPoolHost(layout, pages)


def fill(host: Any, pages: Sequence[int], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in pages:
        page = host.get_dummy_flat_data_page()
        page.view(torch.int16).copy_(torch.randint(-30000, 30000, page.shape, generator=g, dtype=torch.int16))
        host.set_from_flat_data_page(p * PAGE, page)


def page_bytes(host: Any, p: int) -> torch.Tensor:
    return host.get_data_page(p * PAGE, flat=True).clone().view(torch.uint8)


def storage_config(*, is_mla: bool = False, page_first: bool = True, tp_rank: int = 0, tp_size: int = 1,
                   pp_rank: int = 0, pp_size: int = 1, model: str = "meta-llama/Llama-3.1-8B",
                   **extra: Any) -> HiCacheStorageConfig:
    return HiCacheStorageConfig(
        tp_rank=tp_rank, tp_size=tp_size, pp_rank=pp_rank, pp_size=pp_size, attn_cp_rank=0, attn_cp_size=1,
        is_mla_model=is_mla, enable_storage_metrics=False, is_page_first_layout=page_first, model_name=model,
        extra_config={"backend_name": "kvpool", "module_path": "kvpool.integrations.sglang",
                      "class_name": "KVPoolHiCacheStorage", "interface_v1": 1, **extra},
    )


def build(host: Any, backends: list[Any], **cfg: Any) -> KVPoolHiCacheStorage:
    """As SGLang's HiCacheController attaches storage: the factory's dynamic route, then the host pool."""
    cfg.setdefault("is_mla", isinstance(host, MLATokenToKVPoolHost))
    cfg.setdefault("page_first", host.layout == "page_first")
    sc = storage_config(backends=backends, **cfg)
    st = StorageBackendFactory.create_backend("dynamic", sc, host)
    st.register_mem_pool_host(host)
    assert isinstance(st, KVPoolHiCacheStorage)
    return st


def uring(path: Path, capacity: str = "64MiB") -> str:
    return f"uring://{path}?capacity={capacity}"


class DownBackend(Backend):
    """A tier that is down: every call raises, as a dead remote or a failed device does."""

    scheme = "down"
    capabilities = Capabilities(
        persistent=False, durable=False, device_memory=False, partial_reads=True, remote=True, queued_io=True,
        eviction_hints=False, host_memory="none", read_bandwidth=None,
    )

    def _boom(self) -> BackendError:
        return BackendError("tier is down")

    async def write(self, key: bytes, src: torch.Tensor) -> None:
        raise self._boom()

    async def read_into(self, key: bytes, dest: torch.Tensor, offset: int = 0) -> bool:
        raise self._boom()

    async def delete(self, key: bytes) -> bool:
        raise self._boom()

    async def contains(self, key: bytes) -> bool:
        raise self._boom()

    async def keys(self) -> AsyncIterator[bytes]:  # type: ignore[override]
        raise self._boom()
        yield b""  # pragma: no cover


class CountingBackend(ForwardingBackend):
    """Delegates to a real backend and counts the calls each kind of operation gets."""

    def __init__(self, inner: Backend, latency: float = 0.0) -> None:
        super().__init__(inner)
        self.latency = latency
        self.scheme = inner.scheme
        self.calls: dict[str, int] = {}

    def _n(self, what: str) -> None:
        self.calls[what] = self.calls.get(what, 0) + 1

    async def _open(self) -> None:
        await self.inner.open()

    async def _close(self) -> None:
        await self.inner.close()

    async def write(self, key: bytes, src: torch.Tensor) -> None:
        self._n("write")
        await self.inner.write(key, src)

    async def read_into(self, key: bytes, dest: torch.Tensor, offset: int = 0) -> bool:
        self._n("read_into")
        return await self.inner.read_into(key, dest, offset)

    async def delete(self, key: bytes) -> bool:
        return await self.inner.delete(key)

    async def contains(self, key: bytes) -> bool:
        self._n("contains")
        return await self.inner.contains(key)

    def keys(self) -> AsyncIterator[bytes]:
        return self.inner.keys()

    async def object_size(self, key: bytes) -> int | None:
        return await self.inner.object_size(key)

    async def write_many(self, items: Sequence[tuple[bytes, torch.Tensor]]) -> None:
        self._n("write_many")
        await self.inner.write_many(items)

    async def read_many(self, requests: Sequence[ReadRequest]) -> list[bool]:
        self._n("read_many")
        if self.latency:
            await asyncio.sleep(self.latency)
        return await self.inner.read_many(requests)

    async def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        self._n("contains_many")
        return await self.inner.contains_many(keys)


def keys_of(n: int, tag: str = "p") -> list[str]:
    return [f"{tag}{i:04d}" + "ab" * 30 for i in range(n)]  # SGLang page hashes are hex strings


# --- construction ---------------------------------------------------------------------------------------------
def test_built_by_sglangs_factory_as_a_hicache_storage() -> None:
    host = make_host("mha", "page_first")
    st = build(host, ["dram://?capacity=64MiB"])
    try:
        assert isinstance(st, HiCacheStorage) and type(st) is KVPoolHiCacheStorage
        assert st.mem_pool_host is host
        assert st.pool.tiers[0].scheme == "dram"
    finally:
        st.close()


def test_rank_placeholders_give_each_rank_process_its_own_files(tmp_path: Path) -> None:
    host = make_host("mha", "page_first")
    st = build(host, [f"uring://{tmp_path}/kv-tp{{tp_rank}}-pp{{pp_rank}}.pool?capacity=16MiB"],
               tp_rank=1, tp_size=2, pp_rank=0, pp_size=1)
    try:
        assert (tmp_path / "kv-tp1-pp0.pool").exists()
    finally:
        st.close()


def test_large_batches_on_a_queued_tier_are_cut_into_bounded_sub_batches(tmp_path: Path) -> None:
    host = make_host("mha", "page_first")  # 32 KiB pages
    tier = CountingBackend(kvpool.get_backend_class("uring")(str(tmp_path / "kv.pool"), 16 << 20))
    st = build(host, [tier], pool_config={"io_op_bytes": 64 << 10, "io_max_inflight_bytes": 128 << 10})
    try:
        fill(host, range(8), seed=12)
        keys = keys_of(8, "s")
        assert st.batch_set_v1(keys, host_indices(range(8))) == [True] * 8
        want = [page_bytes(host, p) for p in range(8)]
        tier.calls.clear()
        assert st.batch_get_v1(keys, host_indices(range(8, 16))) == [True] * 8
        assert tier.calls == {"contains_many": 1, "read_many": 4}  # 8 pages of 32 KiB in 64 KiB sub-batches
        for p in range(8):
            assert torch.equal(page_bytes(host, 8 + p), want[p])
    finally:
        st.close()


def test_backends_default_and_bad_config_fails_at_construction() -> None:
    with pytest.raises(kvpool.ConfigError):
        build(make_host("mha", "page_first"), ["nosuch://x"])


# --- byte-exact v1 round trips ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mha", "mla"])
@pytest.mark.parametrize("layout", ["page_first", "layer_first"])
@pytest.mark.parametrize("tier", ["dram", "uring"])
def test_v1_round_trip_is_byte_exact(kind: str, layout: str, tier: str, tmp_path: Path) -> None:
    src = make_host(kind, layout)
    spec = "dram://?capacity=64MiB" if tier == "dram" else uring(tmp_path / "kv.pool")
    st = build(src, [spec])
    try:
        pages = [1, 3, 4, 7, 8, 9]
        fill(src, pages, seed=7)
        keys = keys_of(len(pages))
        assert st.batch_exists(keys) == 0
        assert st.batch_set_v1(keys, host_indices(pages)) == [True] * len(pages)
        assert st.batch_exists(keys) == len(pages)
        assert st.batch_exists(keys + ["absent"]) == len(pages)
        # read into other host pages of the same pool (SGLang restores into whatever pages it allocated)
        dst_pages = [15, 2, 11, 12, 0, 5]
        for p in dst_pages:
            src.get_data_page(p * PAGE, flat=False).zero_()
        want = [page_bytes(src, p) for p in pages]
        assert st.batch_get_v1(keys, host_indices(dst_pages)) == [True] * len(pages)
        for w, p in zip(want, dst_pages):
            assert torch.equal(page_bytes(src, p), w)
        # the object is SGLang's flat data page: the plain form reads the same bytes
        flat = st.get(keys[0], src.get_dummy_flat_data_page())
        assert flat is not None and torch.equal(flat.view(torch.uint8), want[0])
        # pages already stored are not written again
        before = st.counters["pages_written"]
        assert st.batch_set_v1(keys, host_indices(pages)) == [True] * len(pages)
        assert st.counters["pages_written"] == before
    finally:
        st.close()


def test_regions_map_to_one_strided_view_per_page() -> None:
    """Every page is one request (one object), never one per region, for both layouts."""
    for kind, layout in [("mha", "layer_first"), ("mha", "page_first"), ("mla", "layer_first"),
                         ("mla", "page_first")]:
        host = make_host(kind, layout)
        inner = kvpool.get_backend_class("dram")(capacity=64 << 20)
        tier = CountingBackend(inner)
        st = build(host, [tier])
        try:
            fill(host, range(4), seed=5)
            st.batch_set_v1(keys_of(4), host_indices(range(4)))
            dests = st._page_dests(4, host_indices(range(4)))
            assert all(isinstance(d, torch.Tensor) for d in dests)
            for p, d in enumerate(dests):
                flat = host.get_data_page(p * PAGE, flat=True).view(torch.uint8)
                assert d.numel() == flat.numel()
                assert torch.equal(d.flatten(), flat)  # same bytes, same order as SGLang's flat page
        finally:
            st.close()


# --- plain forms --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_plain_get_set_batch_forms(kind: str) -> None:
    host = make_host(kind, "layer_first")
    st = build(host, ["dram://?capacity=64MiB"])
    try:
        fill(host, [0, 1, 2], seed=9)
        keys = keys_of(3, "plain")
        # SGLang's generic path: set() flat data pages, batch_get() into dummy flat pages
        assert st.set(keys[0], host.get_data_page(0, flat=True))
        assert st.batch_set(keys[1:], [host.get_data_page(p * PAGE, flat=True) for p in (1, 2)])
        assert st.exists(keys[0]) and st.exists(keys[2]) and not st.exists("nope")
        assert st.batch_exists(keys) == 3
        outs = st.batch_get(keys + ["nope"], [host.get_dummy_flat_data_page() for _ in range(4)])
        assert outs[3] is None
        for p, o in enumerate(outs[:3]):
            assert o is not None and torch.equal(o.view(torch.uint8), page_bytes(host, p))
        assert st.get("nope", host.get_dummy_flat_data_page()) is None
        # no destination: a fresh tensor of the object's size
        o = st.get(keys[1])
        assert o is not None and torch.equal(o, page_bytes(host, 1))
        # a page set through the plain form is found by the zero-copy form (same object bytes, same key)
        host.get_data_page(5 * PAGE, flat=False).zero_()
        assert st.batch_get_v1([keys[2]], host_indices([5])) == [True]
        assert torch.equal(page_bytes(host, 5), page_bytes(host, 2))
        assert st.clear() and st.batch_exists(keys) == 0
    finally:
        st.close()


# --- keys: ranks, layouts, models ----------------------------------------------------------------------------
def test_ranks_layouts_and_models_never_share_pages(tmp_path: Path) -> None:
    path = tmp_path / "shared.pool"  # a persistent tier every rank of the node would use
    host = make_host("mha", "page_first")
    fill(host, [0, 1], seed=3)
    keys = keys_of(2, "rank")

    def exists(h: Any, **cfg: Any) -> int:
        st = build(h, [uring(path)], **cfg)
        try:
            return st.batch_exists(keys)
        finally:
            st.close()

    st = build(host, [uring(path)], tp_rank=0, tp_size=2)
    assert st.batch_set_v1(keys, host_indices([0, 1])) == [True, True]
    st.close()
    assert exists(host, tp_rank=0, tp_size=2) == 2  # persistent: the same rank finds its pages again
    assert exists(host, tp_rank=1, tp_size=2) == 0  # another TP rank holds other heads
    assert exists(host, tp_rank=0, tp_size=4) == 0  # another TP size: other head shards
    assert exists(host, tp_rank=0, tp_size=2, pp_rank=1, pp_size=2) == 0
    assert exists(host, tp_rank=0, tp_size=2, model="Qwen/Qwen3-8B") == 0
    assert exists(make_host("mha", "layer_first"), tp_rank=0, tp_size=2) == 0  # other byte order
    assert exists(MHATokenToKVPoolHost("page_first", 16, layer_num=2), tp_rank=0, tp_size=2) == 0
    assert exists(host, tp_rank=0, tp_size=2, namespace="tenant-b") == 0

    # MLA: the latent KV is the same on every TP rank, so TP ranks share it (as SGLang's file backend does)
    mla = make_host("mla", "page_first")
    fill(mla, [0, 1], seed=4)
    st = build(mla, [uring(path)], tp_rank=0, tp_size=2)
    assert st.batch_set_v1(keys, host_indices([0, 1])) == [True, True]
    st.close()
    st = build(mla, [uring(path)], tp_rank=1, tp_size=2)
    try:
        mla.get_data_page(5 * PAGE, flat=False).zero_()
        assert st.batch_get_v1(keys[:1], host_indices([5])) == [True]
        assert torch.equal(page_bytes(mla, 5), page_bytes(mla, 0))
    finally:
        st.close()
    assert exists(mla, tp_rank=0, tp_size=2, pp_rank=1, pp_size=2) == 0


# --- failures: missing, corrupt, tier down ---------------------------------------------------------------------
def test_missing_page_is_a_miss_and_stops_the_exists_prefix() -> None:
    host = make_host("mha", "page_first")
    st = build(host, ["dram://?capacity=64MiB"])
    try:
        fill(host, [0, 1, 2], seed=1)
        k = keys_of(3, "m")
        assert st.batch_set_v1([k[0], k[2]], host_indices([0, 2])) == [True, True]
        assert st.batch_exists(k) == 1
        assert st.batch_get_v1(k, host_indices([5, 6, 7])) == [True, False, True]
        assert st.counters["pages_missed"] == 1
    finally:
        st.close()


def test_corrupt_page_on_the_ssd_tier_is_false(tmp_path: Path) -> None:
    path = tmp_path / "kv.pool"
    host = make_host("mha", "page_first")
    st = build(host, [uring(path)])
    try:
        fill(host, [0, 1, 2], seed=11)
        keys = keys_of(3, "c")
        assert st.batch_set_v1(keys, host_indices([0, 1, 2])) == [True] * 3
        st.flush()
        # find page 1's bytes in the pool file and flip some of them behind kvpool's back
        needle = page_bytes(host, 1)[4096:4096 + 256].numpy().tobytes()
        data = path.read_bytes()
        at = data.find(needle)
        assert at > 0 and data.find(needle, at + 1) < 0
        fd = os.open(path, os.O_RDWR)
        try:
            os.pwrite(fd, bytes(b ^ 0xFF for b in data[at : at + 16]), at)
            os.fsync(fd)
        finally:
            os.close(fd)
        del data
        assert st.batch_get_v1(keys, host_indices([5, 6, 7])) == [True, False, True]
        assert torch.equal(page_bytes(host, 5), page_bytes(host, 0))
        assert torch.equal(page_bytes(host, 7), page_bytes(host, 2))
        tier = st.stats()["pool"]["tiers"][0]
        assert tier["corrupt"] == 1
    finally:
        st.close()


def test_a_corrupt_or_missing_page_falls_through_to_the_next_tier(tmp_path: Path) -> None:
    host = make_host("mla", "layer_first")
    st = build(host, ["dram://?capacity=64MiB", uring(tmp_path / "kv.pool")])
    try:
        fill(host, [0, 1], seed=2)
        keys = keys_of(2, "f")
        assert st.batch_set_v1(keys, host_indices([0, 1])) == [True, True]
        dram = st.pool.tiers[0]
        st._run(dram.delete(st.page_key(keys[1])))  # evicted from the fast tier
        assert st.batch_get_v1(keys, host_indices([4, 5])) == [True, True]
        assert torch.equal(page_bytes(host, 5), page_bytes(host, 1))
        assert st._run(dram.contains(st.page_key(keys[1])))  # promoted back up on the hit
    finally:
        st.close()


def test_a_tier_that_is_down_turns_into_misses_never_exceptions(tmp_path: Path) -> None:
    host = make_host("mha", "layer_first")
    fill(host, [0, 1], seed=6)
    keys = keys_of(2, "d")
    # the only tier is down: every call answers, with misses
    st = build(host, [DownBackend()])
    try:
        assert st.batch_set_v1(keys, host_indices([0, 1])) == [False, False]
        assert st.batch_get_v1(keys, host_indices([2, 3])) == [False, False]
        assert st.batch_exists(keys) == 0 and not st.exists(keys[0])
        assert st.get(keys[0], host.get_dummy_flat_data_page()) is None
        assert st.batch_get(keys, [host.get_dummy_flat_data_page()] * 2) == [None, None]
        assert not st.set(keys[0], host.get_data_page(0)) and not st.batch_set(keys, [host.get_data_page(0)] * 2)
        assert st.counters["tier_errors"] > 0
    finally:
        st.close()
    # a dead fast tier in front of a live one: the live one serves
    st = build(host, [DownBackend(), "dram://?capacity=64MiB"])
    try:
        assert st.batch_set_v1(keys, host_indices([0, 1])) == [True, True]
        assert st.batch_exists(keys) == 2
        assert st.batch_get_v1(keys, host_indices([2, 3])) == [True, True]
        assert torch.equal(page_bytes(host, 3), page_bytes(host, 1))
    finally:
        st.close()
    # an SSD tier that goes away under a running server
    st = build(host, [uring(tmp_path / "kv.pool")])
    try:
        assert st.batch_set_v1(keys, host_indices([0, 1])) == [True, True]
        st._run(st.pool.tiers[0].close())
        assert st.batch_get_v1(keys, host_indices([2, 3])) == [False, False]
        assert st.batch_exists(keys) == 0
        assert st.batch_set_v1(keys_of(2, "late"), host_indices([0, 1])) == [False, False]
    finally:
        st.close()


# --- threads, the loop, batching ----------------------------------------------------------------------------
def test_concurrent_calls_from_several_threads(tmp_path: Path) -> None:
    host = make_host("mha", "page_first", pages=64)
    st = build(host, ["dram://?capacity=8MiB", uring(tmp_path / "kv.pool")])
    errors: list[BaseException] = []
    n_threads, rounds = 4, 6

    def worker(t: int) -> None:
        try:
            for r in range(rounds):
                src, dst = [t * 16 + 2 * (r % 4)], [t * 16 + 2 * (r % 4) + 1]
                fill(host, src, seed=t * 100 + r)
                key = [f"t{t}r{r}" + "cd" * 30]
                assert st.batch_set_v1(key, host_indices(src)) == [True]
                assert st.batch_exists(key) == 1
                assert st.batch_get_v1(key, host_indices(dst)) == [True]
                assert torch.equal(page_bytes(host, dst[0]), page_bytes(host, src[0]))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        assert not errors, errors
        assert st.counters["pages_read"] == n_threads * rounds
    finally:
        st.close()


def test_one_batched_submission_per_tier_and_the_loop_stays_free() -> None:
    host = make_host("mha", "layer_first")
    fast = CountingBackend(kvpool.get_backend_class("dram")(capacity=64 << 20))
    slow = CountingBackend(kvpool.get_backend_class("dram")(capacity=64 << 20), latency=0.5)
    st = build(host, [fast, slow], promote_on_hit=False)
    try:
        fill(host, range(8), seed=8)
        keys = keys_of(8, "b")
        assert st.batch_set_v1(keys, host_indices(range(8))) == [True] * 8
        for t in (fast, slow):
            assert t.calls == {"contains_many": 1, "write_many": 1}
            t.calls.clear()
        for k in keys[:4]:
            st._run(fast.inner.delete(st.page_key(k)))
        # a slow read is in flight on the loop; other work on the loop is not held up by it
        done: list[Any] = []
        th = threading.Thread(target=lambda: done.append(st.batch_get_v1(keys, host_indices(range(8, 16)))))
        th.start()
        time.sleep(0.1)
        t0 = time.monotonic()
        st._sync.submit(asyncio.sleep(0)).result(5)
        assert time.monotonic() - t0 < 0.2
        assert st.batch_exists(keys) == 8  # another SGLang thread's call runs meanwhile
        th.join(10)
        assert done == [[True] * 8]
        assert fast.calls["contains_many"] == 2 and fast.calls["read_many"] == 1
        assert slow.calls["contains_many"] == 2 and slow.calls["read_many"] == 1  # the read, the exists
        assert "read_into" not in fast.calls and "read_into" not in slow.calls
    finally:
        st.close()
