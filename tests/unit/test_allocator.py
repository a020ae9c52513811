"""ExtentAllocator: aligned, coalesced free space; checked against a byte-map model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpool.storage.allocator import ExtentAllocator

A = 4096


def test_exact_fit_lowest_address_and_coalescing() -> None:
    a = ExtentAllocator(10 * A + 123)
    assert a.capacity == 10 * A  # rounded down to the alignment
    xs = [a.alloc(A) for _ in range(10)]
    assert xs == [i * A for i in range(10)]
    assert a.alloc(1) is None and a.free_bytes == 0
    for s in (xs[3], xs[5], xs[4]):  # the middle one joins its neighbours
        a.free(s, A)
    assert a.largest_free == 3 * A
    assert a.alloc(3 * A) == 3 * A
    assert a.alloc(A + 1) is None  # rounds up to 2 blocks: none free


def test_errors() -> None:
    with pytest.raises(ValueError):
        ExtentAllocator(A, alignment=3000)
    a = ExtentAllocator(4 * A)
    with pytest.raises(ValueError):
        a.alloc(0)
    s = a.alloc(A)
    assert s is not None
    a.free(s, A)
    with pytest.raises(ValueError, match="double free"):
        a.free(s, A)
    with pytest.raises(ValueError, match="bad extent"):
        a.free(1, A)
    with pytest.raises(ValueError, match="bad extent"):
        a.free(3 * A, 2 * A)


def test_reserve() -> None:
    a = ExtentAllocator(8 * A)
    assert a.reserve(2 * A, 3 * A)
    assert not a.reserve(3 * A, A)  # already used
    assert not a.reserve(7 * A, 2 * A)  # past the end
    assert not a.reserve(100, A)  # unaligned
    assert a.used == 3 * A
    assert a.alloc(2 * A) == 0 and a.alloc(3 * A) == 5 * A
    assert a.alloc(A) is None


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 5 * A), st.integers(0, 1000)), max_size=60))
def test_random_alloc_free_matches_a_model(ops: list[tuple[bool, int, int]]) -> None:
    cap = 32 * A
    a = ExtentAllocator(cap)
    live: dict[int, int] = {}  # start -> rounded length
    for is_alloc, n, pick in ops:
        if is_alloc or not live:
            s = a.alloc(n)
            r = -(-n // A) * A
            if s is None:
                # refused only when no free run of r bytes exists
                used = sorted(live.items())
                gaps, pos = [], 0
                for st_, ln in used:
                    gaps.append(st_ - pos)
                    pos = st_ + ln
                gaps.append(cap - pos)
                assert max(gaps) < r
                continue
            assert s % A == 0 and s + r <= cap
            for t, ln in live.items():
                assert s + r <= t or t + ln <= s, "overlapping extents"
            live[s] = r
        else:
            s = sorted(live)[pick % len(live)]
            a.free(s, live.pop(s))
        assert a.used == sum(live.values())
        assert a.free_bytes == cap - a.used
    for s, ln in list(live.items()):
        a.free(s, ln)
    assert a.used == 0 and a.largest_free == cap  # everything coalesced back into one extent
