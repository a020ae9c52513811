"""A user's strict mypy run sees kvpool's types (py.typed) and no error from kvpool's own imports."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

USER_CODE = '''
import kvpool
import torch


async def main(tokens: kvpool.Tokens) -> int:
    lay = kvpool.KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float16)
    async with kvpool.KVPool.open(layout=lay, model_id="m", backends=["dram://?capacity=64MiB"]) as pool:
        s: kvpool.PoolStats = pool.stats()
        hits: int = s["tiers"][0].get("hits", 0)
        return await pool.lookup(tokens) + hits + s["puts"]


def sync(tokens: kvpool.Tokens) -> int:
    with kvpool.SyncPool.from_config("kvpool.toml") as pool:
        return pool.lookup(tokens)
'''

BAD_CODE = USER_CODE + '''

def wrong() -> str:
    return kvpool.KVPool.open  # type error the user must see: kvpool is typed, not Any
'''


def test_strict_user_code_type_checks_against_kvpool(tmp_path: Path) -> None:
    """The README's editable install with ``editable_mode=compat`` puts the repository on a plain .pth path, which
    mypy follows (setuptools' default import-hook finder it cannot); simulate that with a venv."""
    api = pytest.importorskip("mypy.api")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "kvpool_compat.pth").write_text(str(ROOT) + "\n")
    good = tmp_path / "good.py"
    good.write_text(USER_CODE)
    out, err, status = api.run(["--strict", "--no-incremental", "--python-executable", str(py), str(good)])
    assert status == 0, out + err
    bad = tmp_path / "bad.py"
    bad.write_text(BAD_CODE)
    out, _err, status = api.run(["--strict", "--no-incremental", "--python-executable", str(py), str(bad)])
    assert status == 1 and "bad.py:" in out and "kvpool/" not in out, out
    assert sysconfig.get_paths()["purelib"] != purelib
