"""Child process for the concurrent crash tests: N tasks put distinct objects into one uring:// pool at once.

Prints ``ack RUN I`` after each put returns (flushed at once, so the parent learns of every acknowledged put
before it kills us) and ``done`` when the quota is written. Object ``I``'s bytes are a function of (RUN, I).
Usage: concurrent_writer.py SPEC RUN WRITERS QUOTA [hold]   (SPEC may be CHILD|CHILD|... for a striped tier;
``hold``: after ``done``, keep the pool open until killed instead of closing it)
"""

from __future__ import annotations

import asyncio
import hashlib
import sys

import torch

from kvpool.storage.backend import Backend
from kvpool.storage.registry import backend_from_spec


def key_of(run: int, i: int) -> bytes:
    return hashlib.blake2b(f"run{run}/obj{i}".encode(), digest_size=16).digest()


def size_of(i: int) -> int:
    # mostly one 4 KiB block, some longer and unaligned ones: small records, so the journal fills (and the
    # journal-full checkpoint, where acknowledged puts used to get lost, happens) every few hundred puts
    return 4096 * (1 + i % 3) - (i % 5) * 8


def data_of(run: int, i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(run * 1_000_003 + i)
    return torch.randint(0, 256, (size_of(i),), dtype=torch.uint8, generator=g)


async def main(spec: str, run: int, writers: int, quota: int, hold: bool = False) -> None:
    if "|" in spec:  # a striped tier over the children SPEC1|SPEC2|...
        from kvpool.striped.backend import StripedBackend

        b: Backend = StripedBackend.from_specs(spec.split("|"))
    else:
        b = backend_from_spec(spec)
    await b.open()
    nxt = 0

    async def writer() -> None:
        nonlocal nxt
        while nxt < quota:
            i = nxt
            nxt += 1
            await b.write(key_of(run, i), data_of(run, i))
            sys.stdout.write(f"ack {run} {i}\n")
            sys.stdout.flush()

    await asyncio.gather(*(writer() for _ in range(writers)))
    sys.stdout.write("done\n")
    sys.stdout.flush()
    if hold:  # a crash with the pool open: no close-time checkpoint
        await asyncio.sleep(3600)
    await b.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:] == ["hold"]))
