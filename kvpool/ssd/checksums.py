"""Per-part xxh3-64 checksums of an object, computed over the memory runs it lies in (no copy).

An object of ``length`` bytes is cut into parts of ``part_size`` (:func:`kvpool.ssd.format.part_size_for`);
part ``i`` of ``key`` is hashed with a seed derived from the key and ``i``, so a part written under another key
or at another index never verifies. Pure: no I/O.
"""

from __future__ import annotations

import ctypes

import xxhash

from . import format as fmt

__all__ = ["checksums", "part_hashes", "part_sizes"]


def _mem(addr: int, n: int) -> memoryview:
    return memoryview((ctypes.c_char * n).from_address(addr)).cast("B")


def _part_seed(key: bytes, part: int) -> int:
    return (fmt.key_seed(key) + part * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF


def part_hashes(runs: list[tuple[int, int]], key: bytes, first_part: int, sizes: list[int]) -> list[int]:
    """xxh3 of consecutive parts laid end to end over ``runs``, walking the runs once."""
    out = []
    ri, rpos = 0, 0  # current run, bytes of it consumed
    for j, size in enumerate(sizes):
        seed = _part_seed(key, first_part + j)
        addr, n = runs[ri]
        if n - rpos >= size:  # the part lies in one run: one call, no streaming state
            out.append(xxhash.xxh3_64_intdigest(_mem(addr + rpos, size), seed))
            rpos += size
        else:
            h = xxhash.xxh3_64(seed=seed)
            need = size
            while need:
                addr, n = runs[ri]
                take = min(need, n - rpos)
                h.update(_mem(addr + rpos, take))
                rpos += take
                need -= take
                if rpos == n and need:
                    ri, rpos = ri + 1, 0
            out.append(h.intdigest())
        if rpos == runs[ri][1] and ri + 1 < len(runs):
            ri, rpos = ri + 1, 0
    return out


def part_sizes(length: int, part_size: int, first: int, stop: int) -> list[int]:
    return [min(part_size, length - p * part_size) for p in range(first, stop)]


def checksums(runs: list[tuple[int, int]], key: bytes, length: int, part_size: int) -> tuple[int, ...]:
    return tuple(part_hashes(runs, key, 0, part_sizes(length, part_size, 0, -(-length // part_size))))
