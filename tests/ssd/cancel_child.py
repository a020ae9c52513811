"""Child process of the cancellation test, run inside a throttled cgroup (``devices run``), so that reads of
the loop device are slow and a cancellation lands while the kernel still holds I/O into ``out``.

Usage: cancel_child.py DEVICE TRIALS. Prints one JSON line: trials that were cancelled mid-read, and how
many of those saw ``out`` change after the cancellation returned.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys

import torch

from kvpool.ssd.store import UringBackend
from kvpool.storage.buffers import aligned_empty

MiB = 1 << 20
N = 16 * MiB
SENTINEL = 0xAB


async def main(dev: str, trials: int) -> None:
    rng = random.Random(7)
    out_report = {"cancelled": 0, "completed": 0, "overwritten": 0, "direct": 0, "bounce": 0}
    async with UringBackend(dev, 64 * MiB, bounce=64 * MiB, format=True) as b:
        key = bytes(range(16))
        await b.write(key, torch.randint(0, 255, (N,), dtype=torch.uint8))  # never SENTINEL-only
        for t in range(trials):
            direct = t % 2 == 0
            # aligned memory is read into directly by the kernel; a misaligned view goes through bounce buffers
            out = aligned_empty((N,), torch.uint8) if direct else torch.empty(N + 64, dtype=torch.uint8)[64:]
            out.zero_()
            task = asyncio.ensure_future(b.read_into(key, out))
            await asyncio.sleep(rng.uniform(0.01, 0.25))
            task.cancel()
            try:
                await task
                out_report["completed"] += 1
                continue
            except asyncio.CancelledError:
                pass
            out_report["cancelled"] += 1
            out_report["direct" if direct else "bounce"] += 1
            out.fill_(SENTINEL)  # the caller reuses its buffer at once
            await asyncio.sleep(0.6)  # longer than the whole read takes at the throttled rate
            if not bool((out == SENTINEL).all()):
                out_report["overwritten"] += 1
    print(json.dumps(out_report), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
