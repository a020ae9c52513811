"""gpu:// and the CUDA paths of kvpool.pool.paged.

Without a GPU: the backend's allocator/eviction/protocol logic through the conformance suite on the CPU test
hook (``_device="cpu"``), spec parsing, and the ConfigError on open. Tests marked ``gpu`` need CUDA (they are
skipped otherwise, see conftest.py).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kvpool import CapacityError, ConfigError, KVLayout, KVPool
from kvpool.memory.gpu import GPUBackend
from kvpool.storage.buffers import aligned_empty
from kvpool.config import BackendSpec
from kvpool.cuda.events import LayerEvents, restore_stream
from kvpool.cuda.host import pinned_empty, register_host_memory, registered_host_memory, unregister_host_memory
from kvpool.cuda.paged_kv import PagedKV
from kvpool.pool.paged import put_paged, restore_paged
from kvpool.storage.registry import backend_from_spec
from harness.local_raw import ArenaRawHooks
from kvpool.testing import BackendTests
from kvpool.testing.backend_tests import rand_bytes, rand_key

HAS_CUDA = torch.cuda.is_available()
LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=16, dtype=torch.bfloat16, chunk_tokens=16)
BS = 4


def toks(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, 50_000, n).tolist()


# --- the allocator / eviction logic on the CPU test hook ------------------------------------------------
class TestGPUBackendLogicOnCPU(ArenaRawHooks, BackendTests):
    async def make_backend(self, tmp_path: Path, capacity: int) -> GPUBackend:
        return GPUBackend(capacity, _device="cpu")


async def test_lru_order_on_cpu_hook() -> None:
    async with GPUBackend(4 * 4096, _device="cpu") as b:
        ks = [rand_key() for _ in range(4)]
        for k in ks:
            await b.write(k, rand_bytes(4096))
        assert await b.read_into(ks[0], torch.empty(4096, dtype=torch.uint8))
        await b.write(rand_key(), rand_bytes(4096))
        assert await b.contains(ks[0]) and not await b.contains(ks[1])
        st = b.stats()
        assert st["evictions"] == 1 and st["device"] == "cpu" and st["scheme"] == "gpu"
        assert b.capabilities.device_memory


async def test_pinned_extent_survives_eviction_on_cpu_hook() -> None:
    size = 8 << 20  # >= 4 MiB: the copy runs in a thread with the extent pinned
    async with GPUBackend(2 * size, _device="cpu") as b:
        k1, k2 = rand_key(), rand_key()
        d1 = rand_bytes(size, 1)
        await b.write(k1, d1)
        await b.write(k2, rand_bytes(size, 2))
        out = torch.empty(size, dtype=torch.uint8)
        read = asyncio.ensure_future(b.read_into(k1, out))
        await asyncio.sleep(0)
        await b.write(rand_key(), rand_bytes(size, 3))  # must evict k2, not k1
        assert await read
        assert torch.equal(out, d1)


async def test_policy_option_on_cpu_hook() -> None:
    async with GPUBackend(1 << 20, policy="s3fifo", _device="cpu") as b:
        assert b.stats()["policy"] == "s3fifo"
        await b.write(rand_key(), rand_bytes(4096))
    # reopened after close: empty again, same policy
    await b.open()
    try:
        assert len(b) == 0 and b.used_bytes == 0 and b.policy.name == "s3fifo"
    finally:
        await b.close()


async def test_pool_over_cpu_hook_and_restore_paged() -> None:
    tier = GPUBackend(8 << 20, _device="cpu")
    async with await KVPool.open(layout=LAYOUT, model_id="gpu-hook", backends=[tier]) as pool:
        g = torch.Generator().manual_seed(0)
        src = PagedKV([torch.randn(2, 20, BS, 2, 16, generator=g).to(torch.bfloat16) for _ in range(4)],
                      torch.randperm(20, generator=g)[:16], BS)
        t = toks(64, 1)
        assert await put_paged(pool, t, src) == 64
        dst = PagedKV([torch.zeros(2, 40, BS, 2, 16, dtype=torch.bfloat16) for _ in range(4)],
                      torch.randperm(40, generator=g)[:16], BS)
        hit, _ = await restore_paged(pool, t, dst)
        assert hit == 64
        for layer in range(4):
            assert torch.equal(dst.gather_layer(layer, 64).view(torch.int16),
                               src.gather_layer(layer, 64).view(torch.int16))


# --- configuration -------------------------------------------------------------------------------------
def test_spec_parsing() -> None:
    b = GPUBackend.from_spec(BackendSpec.parse("gpu://?device=1&capacity=20GiB&policy=prefix"))
    assert b.capacity == 20 << 30 and b.device == torch.device("cuda:1") and b.policy.name == "prefix"
    b = GPUBackend.from_spec(BackendSpec.parse("gpu://?capacity=64MiB"))
    assert b.device == torch.device("cuda:0")
    assert isinstance(backend_from_spec("gpu://?capacity=1MiB"), GPUBackend)
    with pytest.raises(ConfigError, match="capacity"):
        GPUBackend.from_spec(BackendSpec.parse("gpu://?device=0"))
    with pytest.raises(ConfigError, match="unknown option"):
        GPUBackend.from_spec(BackendSpec.parse("gpu://?capacity=1MiB&devcie=0"))
    with pytest.raises(ConfigError):
        GPUBackend.from_spec(BackendSpec.parse("gpu://?capacity=1MiB&device=x"))
    with pytest.raises(ConfigError):
        GPUBackend.from_spec(BackendSpec.parse("gpu://?capacity=1MiB&device=-1"))
    with pytest.raises(ConfigError, match="policy"):
        GPUBackend.from_spec(BackendSpec.parse("gpu://?capacity=1MiB&policy=nope"))
    with pytest.raises(ConfigError):
        GPUBackend(100)


@pytest.mark.skipif(HAS_CUDA, reason="checks the behaviour without CUDA")
async def test_open_without_cuda_is_a_config_error() -> None:
    b = GPUBackend(1 << 20)
    with pytest.raises(ConfigError, match="gpu:// needs a CUDA device"):
        await b.open()
    assert not b.is_open
    with pytest.raises(ConfigError, match="gpu:// needs a CUDA device"):
        await KVPool.open(layout=LAYOUT, model_id="m", backends=["dram://?capacity=1MiB", "gpu://?capacity=1MiB"])


# --- real CUDA -------------------------------------------------------------------------------------------
@pytest.mark.gpu
class TestGPUConformanceCUDA(ArenaRawHooks, BackendTests):
    async def make_backend(self, tmp_path: Path, capacity: int) -> GPUBackend:
        return GPUBackend(capacity, device=0)


@pytest.mark.gpu
async def test_cuda_tensors_roundtrip_and_bad_device() -> None:
    async with GPUBackend(16 << 20) as b:
        kv = torch.randn(4, 2, 64, 4, 32, device="cuda").to(torch.bfloat16)
        view = kv[:, :, 16:48]  # strided, device-to-device
        k = rand_key()
        await b.write(k, view)
        dest_full = torch.zeros_like(kv)
        assert await b.read_into(k, dest_full[:, :, 16:48])
        assert torch.equal(dest_full[:, :, 16:48], view)
        assert torch.count_nonzero(dest_full[:, :, :16].float()) == 0
        # a pinned host destination and a large pageable one (worker-thread launch)
        host = torch.empty(view.shape, dtype=view.dtype, pin_memory=True)
        assert await b.read_into(k, host)
        assert torch.equal(host, view.cpu())
        big = rand_bytes(8 << 20, 5)
        k2 = rand_key()
        await b.write(k2, big)
        out = torch.empty_like(big)
        assert await b.read_into(k2, out)
        assert torch.equal(out, big)
        # the bytes are valid on another stream as soon as the coroutine returns
        other = torch.cuda.Stream()
        dst = torch.empty(8 << 20, dtype=torch.uint8, device="cuda")
        with torch.cuda.stream(other):
            assert await b.read_into(k2, dst)
            same = torch.equal(dst.cpu(), big)
        assert same
        with pytest.raises(CapacityError):
            await b.write(rand_key(), torch.zeros(17 << 20, dtype=torch.uint8, device="cuda"))
    with pytest.raises(ConfigError, match="does not exist"):
        await GPUBackend(1 << 20, device=torch.cuda.device_count()).open()


def _cuda_caches(nb: int, seed: int | None, fill: float = 0.0) -> list[torch.Tensor]:
    shape = (2, nb, BS, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    if seed is None:
        return [torch.full(shape, fill, dtype=LAYOUT.dtype, device="cuda") for _ in range(LAYOUT.num_layers)]
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(shape, generator=g, device="cuda").to(LAYOUT.dtype) for _ in range(LAYOUT.num_layers)]


@pytest.mark.gpu
@pytest.mark.parametrize("tier", ["dram", "gpu"])
async def test_restore_paged_into_cuda_with_events(tier: str) -> None:
    spec = "dram://?capacity=16MiB" if tier == "dram" else "gpu://?capacity=16MiB"
    async with await KVPool.open(layout=LAYOUT, model_id="cuda", backends=[spec]) as pool:
        src = PagedKV(_cuda_caches(64, seed=1), torch.randperm(64, device="cuda")[:32], BS)  # 128 tokens
        t = toks(128, 2)
        assert await put_paged(pool, t, src) == 128
        dst = PagedKV(_cuda_caches(100, None, fill=-1.0), torch.randperm(100, device="cuda")[:40], BS)
        compute = torch.cuda.Stream(priority=-1)
        hit, events = await restore_paged(pool, t, dst)
        assert hit == 128 and events.is_cuda
        outs = []
        with torch.cuda.stream(compute):
            for layer in range(LAYOUT.num_layers):
                events.wait(layer)  # compute waits on the GPU, the CPU goes on
                outs.append(dst.gather_layer(layer, 128))
        compute.synchronize()
        for layer, got in enumerate(outs):
            assert torch.equal(got.view(torch.int16), src.gather_layer(layer, 128).view(torch.int16))
            assert events.query(layer)
        rest = dst.block_ids[32:]
        assert bool((torch.stack(list(dst.kv_caches))[:, :, rest] == -1.0).all())
        # partial: 5 blocks = 20 tokens -> one chunk
        small = PagedKV(_cuda_caches(100, None), torch.arange(5, device="cuda"), BS)
        hit, ev = await restore_paged(pool, t, small, stream=torch.cuda.Stream())
        await ev.synchronize_async()
        assert hit == 16
        assert torch.equal(small.gather_layer(0, 16).view(torch.int16), src.gather_layer(0, 16).view(torch.int16))


@pytest.mark.gpu
async def test_restore_as_task_and_ready_on_cuda() -> None:
    async with await KVPool.open(layout=LAYOUT, model_id="cuda", backends=["dram://?capacity=16MiB"]) as pool:
        src = PagedKV(_cuda_caches(16, seed=3), torch.arange(16, device="cuda"), BS)
        t = toks(64, 3)
        await put_paged(pool, t, src)
        dst = PagedKV(_cuda_caches(16, None), torch.arange(15, -1, -1, device="cuda"), BS)
        events = LayerEvents(LAYOUT.num_layers, dst.device)
        task = asyncio.ensure_future(restore_paged(pool, t, dst, events=events))
        compute = torch.cuda.Stream()
        outs = []
        for layer in range(LAYOUT.num_layers):
            assert await events.ready(layer)
            with torch.cuda.stream(compute):
                events.wait(layer)
                outs.append(dst.gather_layer(layer, 64))
        assert (await task)[0] == 64
        compute.synchronize()
        for layer, got in enumerate(outs):
            assert torch.equal(got, src.gather_layer(layer, 64))


@pytest.mark.gpu
def test_pinned_and_registered_staging() -> None:
    buf = aligned_empty((4 << 20,), torch.uint8)
    buf.copy_(rand_bytes(4 << 20, 7))
    assert register_host_memory(buf) is True
    try:
        assert register_host_memory(buf) is False  # already ours
        assert buf.is_pinned()
        dev = torch.empty(buf.shape, dtype=buf.dtype, device="cuda")
        s = restore_stream(0)
        with torch.cuda.stream(s):
            dev.copy_(buf, non_blocking=True)
        s.synchronize()
        assert torch.equal(dev.cpu(), buf)
    finally:
        assert unregister_host_memory(buf) is True
    assert unregister_host_memory(buf) is False
    assert not buf.is_pinned()
    with registered_host_memory(bytearray(1 << 20)) as done:
        assert done
    t = pinned_empty((3, 4096), torch.float16, page_aligned=True)
    assert t.is_pinned() and t.data_ptr() % 4096 == 0
    unregister_host_memory(t)


@pytest.mark.gpu
async def test_decode_loop_beside_a_restore() -> None:
    # a decode-like loop of matmuls on a high-priority stream keeps running (and stays correct) while a
    # restore copies layers on the low-priority restore stream
    lay = KVLayout(num_layers=8, num_kv_heads=8, head_dim=128, dtype=torch.float16, chunk_tokens=256)
    n, bs = 2048, 16
    g = torch.Generator(device="cuda").manual_seed(0)
    src_c = [torch.randn(2, 160, bs, 8, 128, generator=g, device="cuda").half() for _ in range(8)]
    src = PagedKV(src_c, torch.randperm(160, device="cuda")[: n // bs], bs)
    t = toks(n, 4)
    async with await KVPool.open(layout=lay, model_id="decode", backends=["dram://?capacity=256MiB"]) as pool:
        await put_paged(pool, t, src)
        dst = PagedKV([torch.zeros_like(c) for c in src_c], torch.randperm(160, device="cuda")[: n // bs], bs)
        compute = torch.cuda.Stream(priority=-1)
        a = torch.randn(8, 4096, device="cuda", dtype=torch.float16)
        w = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
        ref = a @ w
        steps = 0
        done = False

        async def decode() -> None:
            nonlocal steps
            while not done:
                with torch.cuda.stream(compute):
                    y = a @ w
                ev = torch.cuda.Event()
                ev.record(compute)
                while not ev.query():
                    await asyncio.sleep(0)
                assert torch.allclose(y, ref)
                steps += 1

        loop_task = asyncio.ensure_future(decode())
        t0 = time.perf_counter()
        hit, events = await restore_paged(pool, t, dst)
        await events.synchronize_async()
        while steps == 0:
            await asyncio.sleep(0)
        done = True
        await loop_task
        assert hit == n and steps > 0, (hit, steps, time.perf_counter() - t0)
        for layer in range(8):
            assert torch.equal(dst.gather_layer(layer, n), src.gather_layer(layer, n))


@pytest.mark.gpu
async def test_put_paged_from_cuda_into_uring(tmp_path: Path) -> None:
    async with await KVPool.open(layout=LAYOUT, model_id="cuda",
                                 backends=[f"uring://{tmp_path}/p.kv?capacity=64MiB"]) as pool:
        src = PagedKV(_cuda_caches(32, seed=5), torch.randperm(32, device="cuda")[:24], BS)
        t = toks(96, 5)
        assert await put_paged(pool, t, src) == 96
        got = await pool.get(t)
        for layer in range(LAYOUT.num_layers):
            assert torch.equal(got[layer].view(torch.int16), src.gather_layer(layer, 96).cpu().view(torch.int16))

