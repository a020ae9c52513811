"""Run one vLLM engine (CPU) on a tiny model and report its outputs as JSON; used by tests/integrations.

    python engine.py SPEC.json OUT.json

SPEC: ``{"model": dir, "connector": extra_config or null, "engine_id": str, "llm": {extra LLM kwargs},
"phases": [{"name", "prompts": [[tokens]], "max_tokens", "flag": [path, text] (written first),
"settle": bool (wait for the connector's stores to land after the phase), "drop_caches": bool}]}``.
OUT: per phase, per prompt: generated token ids, their logprobs, num_cached_tokens; the pool's stats (asked
through the connector's lookup service, as the scheduler does) after each phase.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


def make_model(path: str, **overrides: int) -> None:
    """A tiny random Llama whose output depends on every prompt token (initializer_range=0.3)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
               initializer_range=0.3)
    cfg.update(overrides)
    LlamaForCausalLM(LlamaConfig(**cfg)).save_pretrained(path)


def pool_stats(engine_id: str, socket_dir: str | None) -> dict | None:
    from kvpool.integrations.vllm.lookup import LookupClient, socket_path

    c = LookupClient(socket_path(engine_id, 0, 0, socket_dir), connect_timeout=5)
    try:
        return c.stats()
    finally:
        c.close()


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    out_path = sys.argv[2]
    if not os.path.exists(os.path.join(spec["model"], "config.json")):
        make_model(spec["model"])
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    kw = dict(model=spec["model"], skip_tokenizer_init=True, enforce_eager=True, dtype="float32", block_size=32,
              max_model_len=4096, seed=0, disable_log_stats=True)
    kw.update(spec.get("llm", {}))
    extra = spec.get("connector")
    if extra is not None:
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KVPoolConnector", kv_connector_module_path="kvpool.integrations.vllm",
            kv_role="kv_both", engine_id=spec["engine_id"], kv_connector_extra_config=extra)
    t0 = time.perf_counter()
    llm = LLM(**kw)
    result: dict = {"init_s": time.perf_counter() - t0, "phases": {}}
    for ph in spec["phases"]:
        if ph.get("flag"):
            with open(ph["flag"][0], "w") as f:
                f.write(ph["flag"][1])
        if ph.get("drop_caches"):  # root only: the SSD tier reads from the device, not the page cache
            try:
                os.sync()
                with open("/proc/sys/vm/drop_caches", "w") as f:
                    f.write("3\n")
            except OSError:
                pass
        sp = SamplingParams(temperature=0.0, max_tokens=ph.get("max_tokens", 8), logprobs=1, seed=0)
        t = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ph["prompts"]], sp, use_tqdm=False)
        took = time.perf_counter() - t
        reqs = []
        for o in outs:
            c = o.outputs[0]
            lps = [float(lp[tid].logprob) for tid, lp in zip(c.token_ids, c.logprobs or [])]
            reqs.append({"tokens": list(c.token_ids), "logprobs": lps, "num_cached_tokens": o.num_cached_tokens})
        stats = None
        if extra is not None:
            for _ in range(600):  # the stores run in the background: wait for them before the next phase
                stats = pool_stats(spec["engine_id"], extra.get("socket_dir"))
                if not ph.get("settle") or stats is None or not stats.get("connector", {}).get("saves_pending"):
                    break
                time.sleep(0.05)
        result["phases"][ph["name"]] = {"requests": reqs, "seconds": took, "pool": stats}
    json.dump(result, open(out_path, "w"))
    del llm


if __name__ == "__main__":
    main()
