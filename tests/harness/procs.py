"""Two processes sharing one remote tier: one puts a prompt, a fresh one (empty DRAM) gets it back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys
    import numpy as np, torch, kvpool

    async def main(role: str, spec: str) -> None:
        layout = kvpool.KVLayout(num_layers=4, num_kv_heads=2, head_dim=32, dtype=torch.bfloat16,
                                 chunk_tokens=32)
        tokens = np.random.default_rng(1).integers(0, 50_000, 200)
        kv = torch.randn(layout.kv_shape(200), generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
        async with await kvpool.KVPool.open(layout=layout, model_id="m",
                                            backends=["dram://?capacity=8MiB", spec]) as pool:
            if role == "put":
                n = await pool.put(tokens, kv)
            else:
                n = await pool.lookup(tokens)
                got = await pool.get(tokens)
                assert torch.equal(got, kv[:, :, :n]), "data differs"
            st = pool.stats()["tiers"]
            print(json.dumps({"n": n, "dram_hits": st[0]["hits"], "remote_hits": st[1]["hits"]}))

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


def put_then_get(spec: str, workdir: Path) -> tuple[dict[str, int], dict[str, int]]:
    """Run the putting process, then the getting one, against the remote tier ``spec``; their results."""
    script = workdir / "proc.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def run(role: str) -> dict[str, int]:
        p = subprocess.run([sys.executable, str(script), role, spec], capture_output=True, text=True, env=env,
                           timeout=60, check=False)
        assert p.returncode == 0, p.stderr[-3000:]
        result: dict[str, int] = json.loads(p.stdout.strip().splitlines()[-1])
        return result

    return run("put"), run("get")
