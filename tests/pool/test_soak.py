"""A short run of benchmarks/soak.py (the full one is 10 minutes): must report 0 wrong, 0 lost."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_soak_briefly(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--seconds", "30",
                           "--dir", str(tmp_path / "w"), "--json", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert out.exists(), proc.stdout[-2000:] + proc.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert rep["acknowledged_puts"] > 0 and rep["kills"] >= 1
    assert rep["wrong_bytes"] == 0 and rep["wrong_reads_in_child"] == 0
    assert rep["lost_acknowledged_puts"] == 0, rep
