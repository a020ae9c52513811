"""The pool over a real block device that fills up: a loop device over a sparse image on a small tmpfs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvpool import KVLayout, KVPool
from kvpool.testing import devices

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.float16, chunk_tokens=16)
CH = LAYOUT.chunk_nbytes

pytestmark = pytest.mark.skipif(devices.available() is not None, reason=str(devices.available()))


async def test_device_that_fills_up_is_skipped_and_counted() -> None:
    with devices.SmallTmpfs(12 << 20) as fs, devices.LoopDevice(fs.path, 256 << 20) as dev:
        pool = await KVPool.open(layout=LAYOUT, model_id="m",
                                 backends=[f"dram://?capacity={4096 * CH}", f"uring://{dev.path}?format=1"])
        try:
            kv = torch.randn(LAYOUT.kv_shape(64)).to(LAYOUT.dtype)
            rng = np.random.default_rng(0)
            prompts = [rng.integers(0, 50_000, 64).tolist() for _ in range(700)]  # ~22 MiB > the tmpfs
            for t in prompts:
                assert await pool.put(t, kv) == 64  # the device running out of space fails no put
            f = pool.stats()["tiers"][1]["faults"]
            assert f["write_failures"] + f["capacity_skips"] >= 1, pool.stats()["tiers"][1]
            for t in prompts[::50]:
                got = await pool.get(t)
                assert got.shape[2] == 64 and torch.equal(got, kv)
        finally:
            await pool.close()
