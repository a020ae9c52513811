"""Extent allocation over a flat byte range (a DRAM arena, a GPU arena, an SSD file or raw device).

Free space is a set of aligned extents kept coalesced: a sorted list of starts for neighbour lookups, maps
start->length and end->start, and an exact-size index, because a pool's objects are mostly one size (one
chunk of one layout) and an exact fit is then O(1). Anything else is best-fit over the free list, which
stays short for the same reason.
"""

from __future__ import annotations

import bisect
from collections import defaultdict

__all__ = ["ExtentAllocator"]


class ExtentAllocator:
    """Aligned extents of ``[0, capacity)``.

    Parameters
    ----------
    capacity
        Bytes managed (rounded down to ``alignment``).
    alignment
        Every extent's start and length are multiples of this (a power of two).
    """

    def __init__(self, capacity: int, alignment: int = 4096) -> None:
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two, got {alignment}")
        self.alignment = alignment
        self.capacity = capacity - capacity % alignment
        self._starts: list[int] = []
        self._len: dict[int, int] = {}
        self._end: dict[int, int] = {}
        self._by_size: defaultdict[int, set[int]] = defaultdict(set)
        self.used = 0
        if self.capacity > 0:
            self._add_free(0, self.capacity)

    def round(self, n: int) -> int:
        a = self.alignment
        return (n + a - 1) // a * a

    @property
    def free_bytes(self) -> int:
        return self.capacity - self.used

    @property
    def largest_free(self) -> int:
        return max(self._len.values(), default=0)

    # --- free list primitives ----------------------------------------------------------------------------
    def _add_free(self, start: int, length: int) -> None:
        bisect.insort(self._starts, start)
        self._len[start] = length
        self._end[start + length] = start
        self._by_size[length].add(start)

    def _remove_free(self, start: int) -> int:
        length = self._len.pop(start)
        del self._end[start + length]
        s = self._by_size[length]
        s.discard(start)
        if not s:
            del self._by_size[length]
        i = bisect.bisect_left(self._starts, start)
        del self._starts[i]
        return length

    # --- API ---------------------------------------------------------------------------------------------
    def alloc(self, nbytes: int) -> int | None:
        """Allocate ``nbytes`` (rounded up); return the start, or ``None`` if no free extent is large enough."""
        if nbytes <= 0:
            raise ValueError(f"cannot allocate {nbytes} bytes")
        n = self.round(nbytes)
        exact = self._by_size.get(n)
        if exact:
            start = min(exact)  # lowest address keeps the arena compact
        else:
            best = None
            for s, ln in self._len.items():
                if ln >= n and (best is None or ln < self._len[best]):
                    best = s
            if best is None:
                return None
            start = best
        length = self._remove_free(start)
        if length > n:
            self._add_free(start + n, length - n)
        self.used += n
        return start

    def free(self, start: int, nbytes: int) -> None:
        """Return an extent; coalesces with free neighbours."""
        n = self.round(nbytes)
        if start % self.alignment or start < 0 or start + n > self.capacity:
            raise ValueError(f"bad extent [{start}, {start + n})")
        i = bisect.bisect_right(self._starts, start)
        if i > 0:
            p = self._starts[i - 1]
            if p + self._len[p] > start:
                raise ValueError(f"double free of extent [{start}, {start + n})")
        if i < len(self._starts) and self._starts[i] < start + n:
            raise ValueError(f"double free of extent [{start}, {start + n})")
        self.used -= n
        s, ln = start, n
        prev = self._end.get(s)
        if prev is not None:
            ln += self._remove_free(prev)
            s = prev
        if s + ln in self._len:
            ln += self._remove_free(s + ln)
        self._add_free(s, ln)

    def reserve(self, start: int, nbytes: int) -> bool:
        """Mark a specific extent used (recovery); returns ``False`` if any of it is not free."""
        n = self.round(nbytes)
        if start % self.alignment or start < 0 or start + n > self.capacity:
            return False
        i = bisect.bisect_right(self._starts, start) - 1
        if i < 0:
            return False
        fs = self._starts[i]
        fl = self._len[fs]
        if fs + fl < start + n:
            return False
        self._remove_free(fs)
        if start > fs:
            self._add_free(fs, start - fs)
        if fs + fl > start + n:
            self._add_free(start + n, fs + fl - start - n)
        self.used += n
        return True
