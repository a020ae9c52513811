"""A cancelled read whose staging is a slice of the pool's arena (fixed ops) leaves the caller's memory alone
once the cancellation returns, and the slice goes back to the arena only after the kernel is done with it.

As in test_cancel.py: a loop device throttled to 40 MB/s by the shared testbed's blkio cgroup, so a 16 MiB
read takes ~0.4 s. Cancellations land after 0..7 turns of the event loop (the awaits before the I/O: staging,
submission) and at random points up to past the I/O's end (the awaits after it: verify and copy in worker
threads). After each cancellation the caller fills its buffer with a sentinel and checks that nothing
overwrites it; the staging slice must also be back in the arena. Run as a script, this file is the child.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20
N = 16 * MiB
SENTINEL = 0xAB



@pytest.mark.blockdev
def test_cancelled_read_staged_in_the_arena_leaves_caller_memory_alone(slow_device: tuple[str, Path]) -> None:
    from conftest import TESTBED  # type: ignore[import-not-found]  (not at the top: this file is also the child)

    dev, bed = slow_device
    res = subprocess.run([str(TESTBED), "run", str(bed), "--", sys.executable, __file__, dev, "16"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["cancelled"] >= 8, report
    assert report["fixed_ops"] > 0 and report["arena_staging"] >= report["cancelled"], report
    assert report["bounce_staging"] == 0, report
    assert report["overwritten"] == 0 and report["leaked"] == 0, report


async def child(dev: str, trials: int) -> None:
    from kvpool.ssd.store import UringBackend
    from kvpool.storage.staging import StagingArena

    rng = random.Random(11)
    report = {"cancelled": 0, "completed": 0, "overwritten": 0, "leaked": 0}
    arena = StagingArena(64 * MiB)
    async with UringBackend(dev, 64 * MiB, bounce=64 * MiB, format=True) as b:
        await b.attach_staging(arena)
        await arena.wait_ready()
        await b._transport.wait_registered()  # type: ignore[union-attr]
        key = bytes(range(16))
        await b.write(key, torch.randint(0, 255, (N,), dtype=torch.uint8))  # never SENTINEL-only
        for t in range(trials):
            base = torch.empty(N + 1024, dtype=torch.uint8)
            out = base[(-base.data_ptr()) % 512 + 64 :][:N]  # off the DIO alignment: staged in the arena
            out.zero_()
            task = asyncio.ensure_future(b.read_into(key, out))
            if t < 8:
                for _ in range(t):
                    await asyncio.sleep(0)
            else:
                await asyncio.sleep(rng.uniform(0.01, 0.5))
            task.cancel()
            try:
                await task
                report["completed"] += 1
                continue
            except asyncio.CancelledError:
                pass
            report["cancelled"] += 1
            out.fill_(SENTINEL)  # the caller reuses its buffer at once
            await asyncio.sleep(0.6)  # longer than the whole read takes at the throttled rate
            if not bool((out == SENTINEL).all()):
                report["overwritten"] += 1
            if arena.free_bytes != arena.nbytes:
                report["leaked"] += 1
        st = b.stats()
        report.update({k: st[k] for k in ("fixed_ops", "arena_staging", "bounce_staging")})
    arena.close()
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    asyncio.run(child(sys.argv[1], int(sys.argv[2])))
