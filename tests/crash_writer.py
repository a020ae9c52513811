"""Child process for the crash tests: writes objects forever, printing 'ack I' after each put returns."""

from __future__ import annotations

import asyncio
import hashlib
import sys

import torch

from kvpool.ssd.store import UringBackend


def key_of(i: int) -> bytes:
    return hashlib.blake2b(f"obj{i}".encode(), digest_size=16).digest()


def data_of(i: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)


async def main(path: str, capacity: int, size: int) -> None:
    b = UringBackend(path, capacity)
    await b.open()
    i = 0
    while True:
        await b.write(key_of(i), data_of(i, size + (i % 7) * 4096 + (i % 3)))
        print(f"ack {i}", flush=True)
        if i % 5 == 4:
            await b.delete(key_of(i - 2))
            print(f"del {i - 2}", flush=True)
        i += 1


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
