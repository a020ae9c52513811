"""KVPool.from_config / SyncPool.from_config: one schema from TOML, YAML, mappings and KVPOOL_* variables."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import kvpool
from kvpool.config import load_settings

TOML = """
model_id = "tiny"
backends = ["dram://?capacity=64MiB", "uring://{path}?capacity=256MiB"]
write_policy = "write-back"
staging_bytes = "64MiB"

[layout]
num_layers = 2
num_kv_heads = 2
head_dim = 16
dtype = "float16"
chunk_tokens = 16
"""

YAML = """
model_id: tiny
layout: {{num_layers: 2, num_kv_heads: 2, head_dim: 16, dtype: float16, chunk_tokens: 16}}
backends:
  - dram://?capacity=64MiB
  - uring://{path}?capacity=256MiB
pool:
  promotion: always
"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for k in list(os.environ):
        if k.startswith("KVPOOL_"):
            monkeypatch.delenv(k)


def kv(layout: kvpool.KVLayout, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layout.kv_shape(n), generator=g).to(layout.dtype)


async def test_two_tier_pool_from_a_toml_file(tmp_path: Path) -> None:
    cfg = tmp_path / "kvpool.toml"
    cfg.write_text(TOML.format(path=tmp_path / "kv.pool"))
    async with kvpool.KVPool.from_config(cfg) as pool:
        assert [t.stats()["scheme"] for t in pool.tiers] == ["dram", "uring"]
        assert pool.config.write_policy == "write-back" and pool.config.staging_bytes == 64 << 20
        tokens = list(range(64))
        x = kv(pool.layout, 64)
        assert await pool.put(tokens, x) == 64
        await pool.flush()
        assert torch.equal(await pool.get(tokens), x)
    # what reached the SSD tier is there for the next process that opens the same file
    async with kvpool.KVPool.from_config(cfg, backends=[f"uring://{tmp_path / 'kv.pool'}?capacity=256MiB"]) as p2:
        assert torch.equal(await p2.get(tokens), x)


async def test_yaml_file_and_pool_table(tmp_path: Path) -> None:
    pytest.importorskip("yaml")
    cfg = tmp_path / "kvpool.yaml"
    cfg.write_text(YAML.format(path=tmp_path / "kv.pool"))
    pool = await kvpool.KVPool.from_config(str(cfg))
    try:
        assert pool.config.promotion == "always" and len(pool.tiers) == 2
    finally:
        await pool.close()


def test_environment_overrides_the_file_and_overrides_win(tmp_path: Path) -> None:
    cfg = tmp_path / "kvpool.toml"
    cfg.write_text(TOML.format(path=tmp_path / "kv.pool"))
    env = {"KVPOOL_WRITE_POLICY": "write-through", "KVPOOL_BACKENDS": "dram://?capacity=8MiB",
           "KVPOOL_LAYOUT_CHUNK_TOKENS": "32", "KVPOOL_PROMOTE_ON_HIT": "false", "KVPOOL_NAMESPACE": "tenant-a"}
    s = load_settings(cfg, environ=env, model_id="other")
    assert s.config.write_policy == "write-through" and s.config.promote_on_hit is False
    assert s.config.namespace == "tenant-a" and s.model_id == "other"
    assert s.backends == ("dram://?capacity=8MiB",) and s.layout.chunk_tokens == 32
    assert s.layout.num_layers == 2  # the rest of the layout still comes from the file


def test_environment_alone_with_a_preset_and_a_striped_tier() -> None:
    env = {"KVPOOL_MODEL_ID": "llama", "KVPOOL_LAYOUT": "llama-3.1-8b",
           "KVPOOL_BACKENDS": "dram://?capacity=1GiB,uring:///a?capacity=1GiB+uring:///b?capacity=1GiB"}
    s = load_settings(environ=env)
    assert (s.layout.num_layers, s.layout.num_kv_heads, s.layout.head_dim) == (32, 8, 128)
    assert s.layout.dtype == torch.bfloat16
    assert s.backends == ("dram://?capacity=1GiB", ("uring:///a?capacity=1GiB", "uring:///b?capacity=1GiB"))


def test_kvpool_config_names_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('model_id = "m"\nlayout = "qwen2.5-7b"\nbackends = ["dram://?capacity=8MiB"]\n')
    s = load_settings(environ={"KVPOOL_CONFIG": str(cfg)})
    assert s.layout.num_kv_heads == 4 and s.source == str(cfg)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('model_id = "m"\nlayout = "llama-3.1-8b"\nbackends = ["dram://"]\nwrite_polcy = "x"\n',
         "unknown option(s) write_polcy; valid: backends,"),
        ('model_id = "m"\nlayout = "llama-9"\nbackends = ["dram://"]\n', "unknown layout preset 'llama-9'; presets:"),
        ('model_id = "m"\nlayout = {num_layers = 2}\nbackends = ["dram://"]\n', "layout lacks num_kv_heads, head_dim"),
        ('model_id = "m"\nlayout = "llama-3.1-8b"\n', "backends is required"),
        ('layout = "llama-3.1-8b"\nbackends = ["dram://"]\n', "model_id is required"),
        ('model_id = "m"\nlayout = "llama-3.1-8b"\nbackends = ["dram"]\n', "not of the form 'scheme://"),
        ('model_id = "m"\nlayout = "llama-3.1-8b"\nbackends = ["dram://"]\nstaging_bytes = "1XB"\n',
         "staging_bytes: cannot parse '1XB'"),
        ('model_id = "m"\nlayout = "llama-3.1-8b"\nbackends = ["dram://"]\npromote_on_hit = "maybe"\n',
         "promote_on_hit must be true or false"),
        ('model_id = "m"\nlayout = "llama-3.1-8b"\nbackends = ["dram://"]\nwrite_policy = "later"\n',
         "write_policy must be 'write-through' or 'write-back'"),
        ('model_id = "m"\nlayout = {preset = "llama-3.1-8b", dtype = "float64x"}\nbackends = ["dram://"]\n',
         "layout dtype 'float64x' is not one of"),
        ("model_id = [", "not valid TOML"),
    ],
)
def test_errors_name_the_file_the_key_and_the_valid_values(tmp_path: Path, text: str, needle: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    with pytest.raises(kvpool.ConfigError) as exc:
        load_settings(cfg, environ={})
    assert needle in str(exc.value)
    assert str(cfg) in str(exc.value)


def test_a_misspelt_environment_variable_is_an_error_others_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    base = {"KVPOOL_MODEL_ID": "m", "KVPOOL_LAYOUT": "llama-3.1-8b", "KVPOOL_BACKENDS": "dram://"}
    with pytest.raises(kvpool.ConfigError, match=r"KVPOOL_WRITEPOLICY \(did you mean KVPOOL_WRITE_POLICY\?\)"):
        load_settings(environ={**base, "KVPOOL_WRITEPOLICY": "write-back"})
    with caplog.at_level("WARNING", logger="kvpool"):
        load_settings(environ={**base, "KVPOOL_MINE": "1"})
    assert "ignoring environment variable(s) KVPOOL_MINE" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="kvpool"):
        load_settings(environ={**base, "KVPOOL_MINE": "1", "KVPOOL_ENV_IGNORE": "KVPOOL_MINE"})
    assert "KVPOOL_MINE" not in caplog.text


def test_missing_file_and_wrong_suffix(tmp_path: Path) -> None:
    with pytest.raises(kvpool.ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", environ={})
    (tmp_path / "c.ini").write_text("")
    with pytest.raises(kvpool.ConfigError, match=r"\.toml, \.yaml or \.yml"):
        load_settings(tmp_path / "c.ini", environ={})


async def test_config_error_raised_before_any_tier_opens(tmp_path: Path) -> None:
    with pytest.raises(kvpool.ConfigError, match="io_max_inflight"):
        await kvpool.KVPool.from_config({"model_id": "m", "layout": "llama-3.2-1b",
                                         "backends": [f"uring://{tmp_path / 'p.kv'}?capacity=64MiB"],
                                         "io_max_inflight": "lots"})
    assert not (tmp_path / "p.kv").exists()


def test_sync_pool_from_config_used_from_threads(tmp_path: Path) -> None:
    cfg = tmp_path / "kvpool.toml"
    cfg.write_text(TOML.format(path=tmp_path / "kv.pool"))
    errors: list[BaseException] = []
    with kvpool.SyncPool.from_config(cfg) as pool:
        layout = pool.layout

        def worker(i: int) -> None:
            try:
                tokens = [i * 1000 + j for j in range(48)]
                x = kv(layout, 48, seed=i)
                assert pool.put(tokens, x) == 48
                assert pool.lookup(tokens) == 48
                got = pool.get(tokens)
                assert torch.equal(got, x)
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        stats: Any = pool.stats()
        assert stats["puts"] == 8 and stats["chunks_written"] >= 8 * 3
