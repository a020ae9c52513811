"""Acknowledged puts survive SIGKILL while many puts run at once (issue 15, item 1).

32 writer tasks in a child process put distinct objects into one pool; the parent kills the child (SIGKILL) at
a different point of each run, reopens the pool and reads back every put the child acknowledged: each must be
there, byte for byte. The objects are small, so the journal fills every few hundred puts and the kills land
around journal-full checkpoints, where a checkpoint used to start a new epoch from an index that lacked the
batch just acknowledged.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kvpool.ssd.store import UringBackend
from kvpool.storage.backend import Backend

sys.path.insert(0, str(Path(__file__).parent))
from concurrent_writer import data_of, key_of, size_of  # noqa: E402

MiB = 1 << 20
WRITER = str(Path(__file__).parent / "concurrent_writer.py")
CAPACITY = 16 * MiB  # the smallest journal (64 KiB): a checkpoint every ~16 journal blocks
QUOTA = 1200  # fits without eviction
WRITERS = 32


def run_and_kill(spec: str, run: int, kill_after: int) -> set[int]:
    """Start a writer, SIGKILL it after ``kill_after`` acks (plus a little jitter); the puts it acknowledged."""
    proc = subprocess.Popen([sys.executable, WRITER, spec, str(run), str(WRITERS), str(QUOTA)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    acked: set[int] = set()
    assert proc.stdout is not None
    deadline = time.time() + 120
    try:
        while len(acked) < kill_after and time.time() < deadline:
            line = proc.stdout.readline()
            if not line or line.startswith("done"):
                break
            _, r, i = line.split()
            assert int(r) == run
            acked.add(int(i))
        time.sleep(random.Random(run).random() * 0.004)
        os.kill(proc.pid, signal.SIGKILL)
        for line in proc.stdout.read().splitlines():  # acks written before the kill landed count too
            if line.startswith("ack"):
                acked.add(int(line.split()[2]))
    finally:
        proc.kill()
        proc.wait()
        err = proc.stderr.read() if proc.stderr else ""
    assert acked, f"the writer acknowledged nothing: {err[-2000:]}"
    return acked


async def lost_puts(b: Backend, run: int, acked: set[int]) -> list[str]:
    """Every acknowledged put must read back exactly; the ones that do not, described."""
    bad = []
    for i in sorted(acked):
        out = torch.empty(size_of(i), dtype=torch.uint8)
        if not await b.read_into(key_of(run, i), out):
            bad.append(f"{i} missing")
        elif not torch.equal(out, data_of(run, i)):
            bad.append(f"{i} wrong bytes")
    return bad


def kill_points(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(40, QUOTA - 40) for _ in range(n)]


def check_runs(spec_of: Callable[[int], str], reopen: Callable[[int], Backend], runs: int, seed: int) -> None:
    failures = []
    total = 0
    for run, k in enumerate(kill_points(runs, seed)):
        acked = run_and_kill(spec_of(run), run, k)
        total += len(acked)

        async def verify() -> list[str]:
            async with reopen(run) as b:
                return await lost_puts(b, run, acked)

        bad = asyncio.run(verify())
        if bad:
            failures.append(f"run {run} (killed after {k} acks, {len(acked)} acknowledged): lost {bad[:8]}"
                            f"{' ...' if len(bad) > 8 else ''} ({len(bad)} in all)")
    assert not failures, f"{len(failures)} of {runs} runs lost acknowledged puts ({total} acknowledged):\n" + \
        "\n".join(failures)


def test_concurrent_sigkill_file(tmp_path: Path) -> None:
    def path(run: int) -> Path:
        return tmp_path / f"pool{run}.kv"

    check_runs(lambda run: f"uring://{path(run)}?capacity={CAPACITY}",
               lambda run: UringBackend(path(run), CAPACITY), runs=16, seed=1)


@pytest.mark.blockdev
def test_concurrent_sigkill_block_device(make_loop: Callable[[int], str]) -> None:
    dev = make_loop(64 * MiB)

    def reopen(run: int) -> Backend:
        return UringBackend(dev, CAPACITY)

    asyncio.run(_format(dev))
    check_runs(lambda run: f"uring://{dev}?capacity={CAPACITY}", reopen, runs=12, seed=2)


async def _format(dev: str) -> None:
    async with UringBackend(dev, CAPACITY, format=True):
        pass


@pytest.mark.blockdev
def test_concurrent_sigkill_striped(make_loop: Callable[[int], str]) -> None:
    """The striped tier over two loop devices (its code is the striped family's; this checks it end to end).

    The runs share the devices, so a reopen finds them holding earlier runs' objects, GC'd into a fragmented
    free space: the bandwidth probe at open used to write there and make the children evict hundreds of the
    killed run's acknowledged objects; it now measures only empty children."""
    from kvpool.striped.backend import StripedBackend

    devs = [make_loop(64 * MiB), make_loop(64 * MiB)]
    children = [f"uring://{d}?capacity={CAPACITY}" for d in devs]

    def reopen(run: int) -> Backend:
        return StripedBackend.from_specs(children)

    async def fmt() -> None:
        async with StripedBackend.from_specs([c + "&format=1" for c in children]):
            pass

    asyncio.run(fmt())
    check_runs(lambda run: "|".join(children), reopen, runs=10, seed=3)
