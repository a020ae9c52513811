"""The README's example runs as written (no root: /var/tmp), and its config file is valid."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvpool.config import load_settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
POOL = "/var/tmp/kvpool-example.pool"


def test_readme_example_runs_as_written(tmp_path: Path) -> None:
    code = re.search(r"## Example.*?```python\n(.*?)```", README, re.S)
    assert code
    if os.path.exists(POOL):
        pytest.skip(f"{POOL} exists (another run, or yours): not touching it")
    try:
        r = subprocess.run([sys.executable, "-c", code.group(1)], capture_output=True, text=True, timeout=300,
                           cwd=tmp_path)
    finally:
        if os.path.exists(POOL):
            os.unlink(POOL)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("4096 torch.Size([32, 2, 4096, 8, 128]) <KVPool 'llama-3.1-8b' open")
    assert "staging arena" not in r.stderr  # the example sizes its memory right


def test_readme_config_file_is_valid(tmp_path: Path) -> None:
    toml = re.search(r"```toml\n(.*?)```", README, re.S)
    assert toml
    (tmp_path / "kvpool.toml").write_text(toml.group(1))
    s = load_settings(tmp_path / "kvpool.toml", environ={})
    assert s.model_id == "llama-3.1-8b" and s.layout.num_layers == 32 and s.config.write_policy == "write-back"


def test_getting_started_runs_as_written(tmp_path: Path) -> None:
    text = (ROOT / "docs" / "getting-started.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    (tmp_path / "kvpool.toml").write_text(re.findall(r"```toml\n(.*?)```", text, re.S)[0])
    pool = "/var/tmp/my.pool"
    if os.path.exists(pool):
        pytest.skip(f"{pool} exists: not touching it")
    try:
        outs = []
        for code in blocks[:2]:  # the Python pool, then the config file from threads
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
            assert r.returncode == 0, r.stderr
            outs.append(r.stdout)
    finally:
        if os.path.exists(pool):
            os.unlink(pool)
    assert outs[0].startswith("768\n768\n<KVPool 'my-model' open") and outs[1] == "4\n"
