"""The `kvpool` command: bench runs end to end; inspect and fsck read a real pool file; fsck finds damage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from kvpool import KVLayout, KVPool


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvpool.cli", *args], capture_output=True, text=True, timeout=300)


def test_bench_small_json(tmp_path: Path) -> None:
    r = run("bench", "--size", "48MiB", "--layout", "small", "--repeat", "1", "--no-fio", "--json", "--dir",
            str(tmp_path))
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["get_into_GBps"] > 0 and res["tier"]["hits"] > 0 and res["tier"]["corrupt"] == 0
    assert "restore" in r.stderr  # progress output
    assert not list(tmp_path.iterdir())  # the temp pool is removed


async def test_inspect_and_fsck(tmp_path: Path) -> None:
    path = tmp_path / "p.kv"
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.float16, chunk_tokens=256)
    async with await KVPool.open(layout=layout, model_id="m", backends=[f"uring://{path}?capacity=16MiB"]) as pool:
        await pool.put(list(range(1024)), torch.randn(layout.kv_shape(1024)).half())
        tier = pool.tiers[0]
        first = next(iter(tier._index.values()))  # type: ignore[attr-defined]
        data_off = tier._geo.d_off  # type: ignore[attr-defined]
    r = run("inspect", str(path))
    assert r.returncode == 0 and json.loads(r.stdout)["objects"] == 4
    assert json.loads(run("fsck", str(path)).stdout)["bad"] == 0
    with open(path, "r+b") as f:
        f.seek(data_off + first.offset + 100)
        f.write(b"\xde\xad")
    r = run("fsck", str(path))
    assert r.returncode == 1 and json.loads(r.stdout)["bad"] == 1
    r = run("fsck", "--repair", str(path))
    assert json.loads(r.stdout)["repaired"] == 1
    assert json.loads(run("fsck", str(path)).stdout) == {"objects": 3, "bad": 0, "repaired": 0}
