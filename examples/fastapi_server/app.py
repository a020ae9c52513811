"""A tiny generation server whose prompt KV lives in a kvpool: repeated prefixes are restored, not recomputed.

Run it (from the repository root)::

    uvicorn examples.fastapi_server.app:app --loop uvloop
    KVPOOL_BACKENDS="uring:///tmp/kv.pool?capacity=1GiB" uvicorn examples.fastapi_server.app:app --loop uvloop

    curl -s localhost:8000/generate -H 'content-type: application/json' \\
         -d '{"tokens": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], "max_new_tokens": 8}'
    curl -s localhost:8000/stats

The model is a small Llama with random weights (seeded, so every process builds the same one): the point is the
KV plumbing, not the text. The pool is configured like any kvpool (docs/configuration.md):

- ``KVPOOL_CONFIG``   a TOML/YAML file with ``backends`` and pool options (its ``layout``, if any, must match
  the model's; the default layout is the model's with 16-token chunks, as the demo prompts are short)
- ``KVPOOL_BACKENDS`` the tiers, comma-separated, fastest first (default ``dram://?capacity=256MiB``), e.g.
  ``dram://?capacity=256MiB,uring:///var/cache/kv.pool?capacity=8GiB``
- any other ``KVPOOL_*`` option (``KVPOOL_WRITE_POLICY``, ``KVPOOL_LAYOUT_CHUNK_TOKENS``...)
- ``EXAMPLE_LAYERWISE`` ``1`` (default) overlaps the restore with the forward pass layer by layer

``GET /metrics`` is the pool in Prometheus' text format (latency histograms, hit ratios, tier counters).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, Field

import kvpool
from kvpool.config import load_settings
from kvpool.integrations.transformers import PrefillStats, cache_argument, layout_for, prefill_with_pool
from kvpool.metrics import PoolCollector

MODEL_ID = "kvpool-example-tiny-llama-seed0"
VOCAB = 1000
MAX_PROMPT = 4096


def build_model(seed: int = 0) -> Any:
    """The demo model: an 8-layer Llama with random weights, deterministic for a given seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=MAX_PROMPT + 512,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg).eval()


def pool_settings(model: Any) -> kvpool.config.PoolSettings:
    """The pool's settings: the model's layout and one DRAM tier by default; ``KVPOOL_CONFIG`` and the other
    ``KVPOOL_*`` variables override them (one schema, validated; a mistake stops the server at start-up)."""
    layout = layout_for(model, chunk_tokens=16)
    defaults: dict[str, Any] = {
        "model_id": MODEL_ID,
        "layout": {"num_layers": layout.num_layers, "num_kv_heads": layout.num_kv_heads,
                   "head_dim": layout.head_dim, "dtype": str(layout.dtype), "chunk_tokens": layout.chunk_tokens},
        "backends": ["dram://?capacity=256MiB"],
    }
    settings = load_settings(None, defaults=defaults)  # KVPOOL_CONFIG's file, if any, then KVPOOL_*
    got = settings.layout
    if (got.num_layers, got.num_kv_heads, got.head_dim) != (layout.num_layers, layout.num_kv_heads, layout.head_dim):
        raise kvpool.ConfigError(f"the configured layout {got} does not match the model's {layout}")
    return settings


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    model = build_model()
    settings = pool_settings(model)
    pool = await kvpool.KVPool.open(layout=settings.layout, model_id=settings.model_id,
                                    backends=[list(b) if isinstance(b, tuple) else b for b in settings.backends],
                                    config=settings.config)
    app.state.model = model
    app.state.pool = pool
    app.state.metrics = CollectorRegistry()
    app.state.metrics.register(PoolCollector(pool, name="example"))
    # One forward at a time: the model runs in worker threads, and the layer-wise restore installs hooks on
    # its decoder layers for the duration of a prefill.
    app.state.model_lock = asyncio.Lock()
    app.state.layerwise = os.environ.get("EXAMPLE_LAYERWISE", "1") != "0"
    try:
        yield
    finally:
        await pool.close()


app = FastAPI(title="kvpool example", lifespan=lifespan)


class GenerateRequest(BaseModel):
    tokens: list[int] = Field(min_length=1, max_length=MAX_PROMPT)
    max_new_tokens: int = Field(default=16, ge=1, le=256)


class GenerateResponse(BaseModel):
    tokens: list[int]
    cached_tokens: int
    prompt_tokens: int
    ttft_ms: float
    total_ms: float


def _decode(model: Any, cache: Any, first: int, pos: int, steps: int) -> list[int]:
    """Greedy decoding of ``steps`` more tokens after ``first`` (at position ``pos``); in a worker thread."""
    out = [first]
    with torch.no_grad():
        for _ in range(steps):
            logits = model(
                input_ids=torch.tensor([[out[-1]]]),
                **{cache_argument(model): cache},
                position_ids=torch.tensor([[pos]]),
                use_cache=True,
            ).logits
            out.append(int(logits[0, -1].argmax()))
            pos += 1
    return out


@app.post("/generate", response_model=GenerateResponse)
async def generate(req: GenerateRequest) -> GenerateResponse:
    bad = [t for t in req.tokens if not 0 <= t < VOCAB]
    if bad:
        raise HTTPException(status_code=422, detail=f"token ids must be in [0, {VOCAB}), got {bad[:5]}")
    state = app.state
    t0 = time.perf_counter()
    async with state.model_lock:
        stats = PrefillStats()
        logits, cache, hit = await prefill_with_pool(
            state.model, state.pool, req.tokens, layerwise=state.layerwise, logits_to_keep=1, stats=stats
        )
        ttft = time.perf_counter() - t0
        first = int(logits[-1].argmax())
        tokens = await asyncio.to_thread(
            _decode, state.model, cache, first, len(req.tokens), req.max_new_tokens - 1
        )
    return GenerateResponse(
        tokens=tokens,
        cached_tokens=hit,
        prompt_tokens=len(req.tokens),
        ttft_ms=ttft * 1e3,
        total_ms=(time.perf_counter() - t0) * 1e3,
    )


@app.get("/stats")
async def stats() -> dict[str, Any]:
    pool: kvpool.KVPool = app.state.pool
    return dict(pool.stats())  # a plain dict: pydantic needs typing_extensions' TypedDict on Python 3.11


@app.get("/metrics")
async def metrics() -> Response:
    """The pool in Prometheus' text exposition format (scrape it every few seconds)."""
    return Response(generate_latest(app.state.metrics), media_type=CONTENT_TYPE_LATEST)
