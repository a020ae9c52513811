"""The FastAPI example: a real uvicorn server (uvloop) on a free port, concurrent clients sharing a system
prompt, and the same answers whether the prompt's KV was computed or restored from the pool."""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import kvpool

pytest.importorskip("transformers")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.fastapi_server import app as example  # noqa: E402

SYSTEM = list(range(100, 148))  # 48 tokens = 3 chunks of 16, shared by every request


def reference_greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation by full recomputation (no cache at all)."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """uvicorn in a background thread, DRAM + uring tiers, lifespan on."""
    cfg = tmp_path / "kvpool.toml"  # the tiers from a config file, as a deployment would give them
    cfg.write_text(f'backends = ["dram://?capacity=64MiB", "uring://{tmp_path}/kv.pool?capacity=64MiB"]\n'
                   'write_policy = "write-through"\n')
    monkeypatch.setenv("KVPOOL_CONFIG", str(cfg))
    port = free_port()
    config = uvicorn.Config(example.app, host="127.0.0.1", port=port, loop="uvloop", lifespan="on",
                            log_level="warning")
    srv = uvicorn.Server(config)
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        if not th.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        th.join(timeout=30)
        assert not th.is_alive(), "uvicorn did not shut down"


def test_concurrent_clients_share_the_system_prompt(server: str) -> None:
    prompts = [SYSTEM + [200 + i, 300 + i, 400 + i] for i in range(8)]

    async def main() -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
        async with httpx.AsyncClient(base_url=server, timeout=120) as client:

            async def gen(p: list[int]) -> dict[str, Any]:
                r = await client.post("/generate", json={"tokens": p, "max_new_tokens": 6})
                r.raise_for_status()
                out: dict[str, Any] = r.json()
                return out

            first = await asyncio.gather(*(gen(p) for p in prompts))
            again = await gen(prompts[3])
            bad = await client.post("/generate", json={"tokens": [5, 10_000], "max_new_tokens": 2})
            assert bad.status_code == 422
            stats = (await client.get("/stats")).json()
            metrics = await client.get("/metrics")
            assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
            text = metrics.text
            import re

            puts = re.search(r'^kvpool_put_seconds_count\{pool="example"\} ([0-9.]+)$', text, re.M)
            assert puts and float(puts.group(1)) == stats["puts"] >= 1  # every put timed
            assert 'kvpool_stream_first_layer_seconds_bucket{le="+Inf",pool="example"}' in text
            assert 'kvpool_tier_hit_ratio{pool="example",scheme="uring",tier="1"}' in text
            assert 'kvpool_hit_ratio{pool="example"}' in text
            return first, again, stats

    first, again, stats = asyncio.run(main())
    for r, p in zip(first, prompts):
        assert len(r["tokens"]) == 6 and r["prompt_tokens"] == len(p)
    # The requests are served one forward at a time: all but the first find the system prompt's 3 chunks.
    hits = sorted(r["cached_tokens"] for r in first)
    assert hits[0] >= 0 and all(h == 48 for h in hits[1:]), hits
    # A repeated request restores its whole cached prefix (48 + 3 tokens -> 48: the tail is a partial chunk)
    # and answers exactly as the first time.
    assert again["cached_tokens"] == 48
    assert again["tokens"] == first[3]["tokens"]
    assert stats["model_id"] == example.MODEL_ID and len(stats["tiers"]) == 2
    assert stats["hit_tokens"] >= 7 * 48

    # Same tokens as greedy decoding by full recomputation on the same (seeded) model.
    model = example.build_model()
    for i in (0, 3, 7):
        assert first[i]["tokens"] == reference_greedy(model, prompts[i], 6)


def test_in_process_with_asgi_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same app through httpx.ASGITransport, lifespan driven by the router's lifespan context."""
    monkeypatch.delenv("KVPOOL_CONFIG", raising=False)
    monkeypatch.setenv("KVPOOL_BACKENDS", "dram://?capacity=16MiB")
    prompt = list(range(1, 40))  # 39 tokens: 2 full chunks + 7

    async def main() -> None:
        async with example.app.router.lifespan_context(example.app):
            transport = httpx.ASGITransport(app=example.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                r1 = (await client.post("/generate", json={"tokens": prompt, "max_new_tokens": 4})).json()
                r2 = (await client.post("/generate", json={"tokens": prompt, "max_new_tokens": 4})).json()
                assert r1["cached_tokens"] == 0 and r2["cached_tokens"] == 32
                assert r1["tokens"] == r2["tokens"]
                st = (await client.get("/stats")).json()
                assert st["chunks_written"] == 2

    asyncio.run(main())


def test_a_config_mistake_stops_the_server_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVPOOL_BACKENDS", "dram://?capacity=16MiB")
    monkeypatch.setenv("KVPOOL_WRITE_POLCY", "write-back")

    async def main() -> None:
        async with example.app.router.lifespan_context(example.app):
            pass

    with pytest.raises(kvpool.ConfigError, match=r"KVPOOL_WRITE_POLCY \(did you mean KVPOOL_WRITE_POLICY\?\)"):
        asyncio.run(main())
