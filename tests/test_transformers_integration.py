"""End-to-end: a small random Llama restores its prompt's KV from the pool and gets the same logits as a full
prefill -- DRAM and SSD (uring) tiers, chunk-aligned and unaligned prompts, restore-then-forward and the
layer-wise overlap, under asyncio and uvloop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

transformers = pytest.importorskip("transformers")

import kvpool  # noqa: E402
from kvpool.integrations.transformers import (  # noqa: E402
    cache_argument,
    output_cache,
    PrefillStats,
    cache_to_kv,
    kv_to_cache,
    layout_for,
    prefill_with_pool,
)

T = TypeVar("T")
CHUNK = 16
ATOL = 1e-4


# --- event loops: every test runs under asyncio's default loop and under uvloop ------------------------------
def _loop_factories() -> list[Any]:
    params: list[Any] = [pytest.param(None, id="asyncio")]
    try:
        import uvloop
    except ImportError:
        params.append(pytest.param(None, id="uvloop", marks=pytest.mark.skip(reason="uvloop not installed")))
    else:
        params.append(pytest.param(uvloop.new_event_loop, id="uvloop"))
    return params


@pytest.fixture(params=_loop_factories())
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, T]], T]:
    """Run a coroutine to completion on a fresh loop of the parametrized kind."""
    factory = request.param

    def _run(coro: Coroutine[Any, Any, T]) -> T:
        with asyncio.Runner(loop_factory=factory) as runner:
            if factory is not None:
                assert type(runner.get_loop()).__module__.startswith("uvloop")
            return runner.run(coro)

    return _run


# --- the model ----------------------------------------------------------------------------------------------
def make_model(attn: str = "sdpa") -> Any:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=2048,
        attn_implementation=attn,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model() -> Any:
    return make_model("sdpa")


def ids(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1000, (n,), generator=g)


def full_logits(model: Any, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x.unsqueeze(0)).logits[0]


async def open_pool(model: Any, spec: str) -> kvpool.KVPool:
    return await kvpool.KVPool.open(
        layout=layout_for(model, chunk_tokens=CHUNK), model_id="tiny-llama", backends=[spec]
    )


def spec_for(tier: str, tmp_path: Path) -> str:
    return "dram://?capacity=64MiB" if tier == "dram" else f"uring://{tmp_path}/p.kv?capacity=64MiB"


# --- geometry and conversion ----------------------------------------------------------------------------------
def test_layout_for_model_and_config(model: Any) -> None:
    lay = layout_for(model, chunk_tokens=32)
    assert (lay.num_layers, lay.num_kv_heads, lay.head_dim, lay.dtype, lay.chunk_tokens) == (
        8, 4, 64, torch.float32, 32
    )
    cfg = transformers.LlamaConfig(hidden_size=512, num_attention_heads=8, num_key_value_heads=2,
                                   num_hidden_layers=3)
    lay = layout_for(cfg, dtype=torch.bfloat16)
    assert (lay.num_layers, lay.num_kv_heads, lay.head_dim, lay.dtype) == (3, 2, 64, torch.bfloat16)


def test_cache_kv_round_trip(model: Any) -> None:
    x = ids(40, seed=1)
    with torch.no_grad():
        cache = output_cache(model(x.unsqueeze(0), use_cache=True))
    kv = cache_to_kv(cache)
    assert kv.shape == (8, 2, 40, 4, 64)
    k0 = cache.layers[0].keys if hasattr(cache, "layers") else cache.key_cache[0]
    assert torch.equal(kv[0, 0], k0[0].transpose(0, 1))
    back = kv_to_cache(kv, model.config)
    assert back.get_seq_length() == 40
    assert torch.equal(cache_to_kv(back), kv)
    assert torch.equal(cache_to_kv(cache, end=32), kv[:, :, :32])
    with pytest.raises(kvpool.LayoutError):
        kv_to_cache(kv[:, :, :, :2], model.config)


def test_restored_cache_decodes_like_full(model: Any, run: Callable[..., Any]) -> None:
    """A restored cache is a real cache: prefill + one decode step == full forward."""
    x = ids(50, seed=2)

    async def main() -> None:
        async with await open_pool(model, "dram://?capacity=64MiB") as pool:
            await prefill_with_pool(model, pool, x[:40])
            logits, cache, hit = await prefill_with_pool(model, pool, x[:49])
            assert hit == 32 and cache.get_seq_length() == 49
            with torch.no_grad():
                step = model(x[49:50].unsqueeze(0), **{cache_argument(model): cache}, use_cache=True,
                             position_ids=torch.tensor([[49]])).logits[0]
            full = full_logits(model, x)
            torch.testing.assert_close(logits, full[32:49], atol=ATOL, rtol=0)
            torch.testing.assert_close(step, full[49:], atol=ATOL, rtol=0)

    run(main())


# --- the main property ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("tier", ["dram", "uring"])
@pytest.mark.parametrize("layerwise", [False, True], ids=["restore-then-forward", "layerwise"])
@pytest.mark.parametrize("prompt_len", [64, 70], ids=["aligned", "unaligned"])
def test_logits_match_full_prefill(
    model: Any, run: Callable[..., Any], tmp_path: Path, tier: str, layerwise: bool, prompt_len: int
) -> None:
    prompt, suffix = ids(prompt_len, seed=3), ids(23, seed=4)
    x = torch.cat([prompt, suffix])
    full = full_logits(model, x)

    async def main() -> None:
        async with await open_pool(model, spec_for(tier, tmp_path)) as pool:
            st0 = PrefillStats()
            logits0, _, hit0 = await prefill_with_pool(model, pool, prompt, stats=st0)
            assert hit0 == 0 and st0.stored_tokens == (prompt_len // CHUNK) * CHUNK
            torch.testing.assert_close(logits0, full[:prompt_len], atol=ATOL, rtol=0)
            assert await pool.lookup(prompt) == (prompt_len // CHUNK) * CHUNK

            st = PrefillStats()
            logits, cache, hit = await prefill_with_pool(model, pool, x, layerwise=layerwise, stats=st)
            assert hit == (prompt_len // CHUNK) * CHUNK
            assert st.layerwise is layerwise and not st.fallback
            assert st.computed_tokens == len(x) - hit == logits.shape[0]
            assert cache.get_seq_length() == len(x)
            torch.testing.assert_close(logits, full[hit:], atol=ATOL, rtol=0)
            # Only the chunks the pool lacked were written.
            written = pool.stats()["chunks_written"]
            assert written == len(x) // CHUNK
            assert st.stored_tokens == (len(x) // CHUNK) * CHUNK - hit

            # The whole prompt is now cached: everything but the last token comes back.
            if len(x) % CHUNK == 0:
                hit_all = len(x) - 1
            else:
                hit_all = (len(x) // CHUNK) * CHUNK
            logits2, _, hit2 = await prefill_with_pool(model, pool, x, layerwise=layerwise)
            assert hit2 == hit_all
            torch.testing.assert_close(logits2, full[hit2:], atol=ATOL, rtol=0)
            assert pool.stats()["chunks_written"] == written

    run(main())


@pytest.mark.parametrize("layerwise", [False, True], ids=["restore-then-forward", "layerwise"])
def test_fully_cached_aligned_prompt_recomputes_last_token(
    model: Any, run: Callable[..., Any], layerwise: bool
) -> None:
    x = ids(4 * CHUNK, seed=5)
    full = full_logits(model, x)

    async def main() -> None:
        async with await open_pool(model, "dram://?capacity=64MiB") as pool:
            await prefill_with_pool(model, pool, x)
            st = PrefillStats()
            logits, cache, hit = await prefill_with_pool(model, pool, x.tolist(), layerwise=layerwise, stats=st)
            assert hit == len(x) - 1 and st.computed_tokens == 1 and st.hit_tokens == len(x)
            assert logits.shape == (1, 1000) and cache.get_seq_length() == len(x)
            torch.testing.assert_close(logits, full[-1:], atol=ATOL, rtol=0)
            # logits_to_keep and a [1, T] tensor are accepted too.
            logits, _, _ = await prefill_with_pool(model, pool, x.unsqueeze(0), logits_to_keep=1)
            torch.testing.assert_close(logits, full[-1:], atol=ATOL, rtol=0)

    run(main())


def test_eager_attention(run: Callable[..., Any]) -> None:
    model = make_model("eager")
    x = ids(77, seed=6)
    full = full_logits(model, x)

    async def main() -> None:
        async with await open_pool(model, "dram://?capacity=64MiB") as pool:
            await prefill_with_pool(model, pool, x[:50])
            for lw in (False, True):
                logits, _, hit = await prefill_with_pool(model, pool, x, layerwise=lw, store=False)
                assert hit == 48
                torch.testing.assert_close(logits, full[48:], atol=ATOL, rtol=0)

    run(main())


# --- layer-wise overlap: stalls and failures ---------------------------------------------------------------
class SlowStream:
    """Wraps pool.stream: sleeps before each layer (I/O slower than compute), or fails at one layer."""

    def __init__(self, pool: kvpool.KVPool, delay: float = 0.0, fail_at: int | None = None) -> None:
        self.inner = pool.stream
        self.delay, self.fail_at = delay, fail_at

    async def __call__(self, tokens: Any, **kw: Any) -> AsyncIterator[tuple[int, torch.Tensor]]:
        async for layer, x in self.inner(tokens, **kw):
            await asyncio.sleep(self.delay)
            if layer == self.fail_at:
                raise kvpool.RestoreError(f"object vanished at layer {layer}", layer)
            yield layer, x


def test_layerwise_stalls_are_measured(model: Any, run: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    x = ids(90, seed=7)
    full = full_logits(model, x)

    async def main() -> None:
        async with await open_pool(model, "dram://?capacity=64MiB") as pool:
            await pool.ready()  # the arena's population does not compete with the timed compute
            first = PrefillStats()
            await prefill_with_pool(model, pool, x[:64], stats=first)
            # I/O must be slower than compute for stalls to exist: at least 20 ms per layer, and at least twice
            # a layer's compute as measured on this machine now (a loaded CI core made 20 ms too little)
            delay = max(0.02, 2 * first.compute_s / model.config.num_hidden_layers)
            monkeypatch.setattr(pool, "stream", SlowStream(pool, delay=delay))
            st = PrefillStats()
            logits, _, hit = await prefill_with_pool(model, pool, x, layerwise=True, stats=st, store=False)
            assert hit == 64 and st.layerwise
            # Layers 1..7 each arrive >= 20 ms after the one before, far slower than their compute.
            assert st.stalled_layers >= 6 and st.stall_s >= 0.08, st
            assert st.restore_s >= 0.14 and st.ttft_s >= st.restore_s
            torch.testing.assert_close(logits, full[hit:], atol=ATOL, rtol=0)

    run(main())


@pytest.mark.parametrize("layerwise", [False, True], ids=["restore-then-forward", "layerwise"])
@pytest.mark.parametrize("fail_at", [0, 5])
def test_restore_failure_recomputes(
    model: Any, run: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, layerwise: bool, fail_at: int
) -> None:
    x = ids(80, seed=8)
    full = full_logits(model, x)

    async def main() -> None:
        async with await open_pool(model, "dram://?capacity=64MiB") as pool:
            await prefill_with_pool(model, pool, x[:64])
            monkeypatch.setattr(pool, "stream", SlowStream(pool, fail_at=fail_at))
            st = PrefillStats()
            logits, cache, hit = await prefill_with_pool(model, pool, x, layerwise=layerwise, stats=st)
            assert hit == 0 and "restore failed" in st.fallback and st.computed_tokens == 80
            assert cache.get_seq_length() == 80
            torch.testing.assert_close(logits, full, atol=ATOL, rtol=0)

    run(main())


def test_layout_mismatch_is_refused(model: Any, run: Callable[..., Any]) -> None:
    async def main() -> None:
        lay = kvpool.KVLayout(num_layers=4, num_kv_heads=4, head_dim=64, dtype=torch.float32, chunk_tokens=CHUNK)
        async with await kvpool.KVPool.open(layout=lay, model_id="m", backends=["dram://?capacity=8MiB"]) as pool:
            with pytest.raises(kvpool.LayoutError):
                await prefill_with_pool(model, pool, ids(20, seed=9))
            with pytest.raises(ValueError):
                await prefill_with_pool(model, pool, [])

    run(main())


def test_event_loop_stays_responsive(model: Any, run: Callable[..., Any]) -> None:
    """The forward runs in a worker thread: other coroutines keep running during a prefill."""
    x = ids(600, seed=10)

    async def main() -> None:
        async with await open_pool(model, "dram://?capacity=64MiB") as pool:
            ticks = 0
            done = asyncio.Event()

            async def ticker() -> None:
                nonlocal ticks
                while not done.is_set():
                    ticks += 1
                    await asyncio.sleep(0.001)

            t = asyncio.create_task(ticker())
            await prefill_with_pool(model, pool, x)
            done.set()
            await t
            assert ticks >= 3

    run(main())


@pytest.mark.parametrize("layerwise", [False, True], ids=["restore-then-forward", "layerwise"])
def test_cancelled_prefill_leaves_the_model_clean(
    model: Any, run: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, layerwise: bool
) -> None:
    """Cancelling mid-restore returns only once the worker thread is done, and no hooks are left behind."""
    x = ids(90, seed=11)
    full = full_logits(model, x)

    async def main() -> None:
        async with await open_pool(model, "dram://?capacity=64MiB") as pool:
            await prefill_with_pool(model, pool, x[:64])
            real_stream = pool.stream
            monkeypatch.setattr(pool, "stream", SlowStream(pool, delay=0.05))
            task = asyncio.create_task(prefill_with_pool(model, pool, x, layerwise=layerwise))
            await asyncio.sleep(0.12)  # a few layers in
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert all(not layer._forward_pre_hooks for layer in model.model.layers)
            monkeypatch.setattr(pool, "stream", real_stream)
            logits, _, hit = await prefill_with_pool(model, pool, x, layerwise=layerwise)
            assert hit == 64
            torch.testing.assert_close(logits, full[hit:], atol=ATOL, rtol=0)

    run(main())


def test_forward_uses_the_currentcache_argument(model: Any, run: Callable[..., Any]) -> None:
    """No deprecation warning from transformers: the forward gets the cache under the name it declares
    (``cache`` since 5.20, ``past_key_values`` in the 5.16-5.19 that vLLM pins)."""
    import warnings

    x = ids(40, seed=7)

    async def main() -> None:
        async with await open_pool(model, "dram://?capacity=64MiB") as pool:
            await prefill_with_pool(model, pool, x[:33])
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                _logits, cache, hit = await prefill_with_pool(model, pool, x)
            assert hit == 32 and cache.get_seq_length() == 40
            deprecations = [w for w in caught if "past_key_values" in str(w.message) or "deprecat" in
                            str(w.message).lower()]
            assert not deprecations, [str(w.message) for w in deprecations]

    run(main())
