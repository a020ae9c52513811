"""Eviction policies: ordering, robustness of the candidates stream, scan resistance, and the DRAM tier."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpool import ConfigError
from kvpool.memory.dram import DRAMBackend
from kvpool.storage.eviction import (
    POLICIES,
    AttentionAwarePolicy,
    EvictionPolicy,
    LRUPolicy,
    PrefixAwarePolicy,
    S3FIFOPolicy,
    make_policy,
)
from kvpool.testing.backend_tests import rand_bytes

NAMES = ["lru", "s3fifo", "prefix", "attention"]


def k(i: int) -> bytes:
    return i.to_bytes(16, "little")


def first(p: EvictionPolicy, pinned: Callable[[bytes], bool] = lambda _: False) -> bytes | None:
    """What the tiers do: the first unpinned candidate of a fresh stream."""
    return next((x for x in p.candidates() if not pinned(x)), None)


class Cache:
    """A bounded cache of equal-size objects driving a policy exactly as the tiers do."""

    def __init__(self, policy: EvictionPolicy, capacity: int) -> None:
        self.p, self.capacity, self.keys = policy, capacity, set[bytes]()
        self.hits = self.misses = 0

    def access(self, key: bytes) -> bool:
        if key in self.keys:
            self.p.touch(key)
            self.hits += 1
            return True
        self.misses += 1
        while len(self.keys) >= self.capacity:
            v = first(self.p)
            assert v is not None and v in self.keys
            self.keys.discard(v)
            self.p.remove(v)
        self.keys.add(key)
        self.p.insert(key, 1)
        return False


# --- registry --------------------------------------------------------------------------------------------


def test_registry_and_make_policy() -> None:
    assert set(NAMES) <= set(POLICIES)
    for n in NAMES:
        p = make_policy(n)
        assert p.name == n and isinstance(p, POLICIES[n])
    with pytest.raises(ConfigError, match="known: attention, lru, prefix, s3fifo"):
        make_policy("fifo")


def test_base_class_link_and_observe_are_no_ops() -> None:
    p = LRUPolicy()
    p.insert(k(1), 1)
    p.insert(k(2), 1)
    p.link(k(1), k(2))
    p.observe(k(1), 5.0)
    assert list(p.candidates()) == [k(1), k(2)]


@pytest.mark.parametrize("name", NAMES)
def test_unknown_keys_and_reinsert(name: str) -> None:
    p = make_policy(name)
    p.remove(k(9))
    p.touch(k(9))
    p.observe(k(9), 1.0)
    p.link(k(9), k(10))
    assert list(p.candidates()) == [] and len(p) == 0
    for i in range(5):
        p.insert(k(i), 100)
    p.insert(k(2), 200)  # re-insert of a present key: still one entry
    assert len(p) == 5
    assert sorted(p.candidates()) == [k(i) for i in range(5)]
    p.remove(k(2))
    p.remove(k(2))
    assert len(p) == 4 and k(2) not in set(p.candidates())


@pytest.mark.parametrize("name", NAMES)
def test_stream_is_lazy_and_stopping_early_is_safe(name: str) -> None:
    p = make_policy(name)
    for i in range(50):
        p.insert(k(i), 1)
        if i % 3 == 0:
            p.touch(k(i))
    it = p.candidates()
    a, b = next(it), next(it)  # the caller skips `a` (pinned), evicts `b`, abandons the stream
    assert a != b
    del it
    p.remove(b)
    seen = list(p.candidates())
    assert len(seen) == len(set(seen)) == 49 and b not in seen and a in seen


# --- S3-FIFO ---------------------------------------------------------------------------------------------


def test_s3fifo_one_hit_wonders_leave_first_in_fifo_order() -> None:
    p = S3FIFOPolicy()
    for i in range(10):
        p.insert(k(i), 1)
    for i in (0, 3, 5):
        p.touch(k(i))
    # S holds everything: unhit keys are victims in arrival order, hit ones are promoted to M
    assert list(p.candidates())[:7] == [k(i) for i in (1, 2, 4, 6, 7, 8, 9)]


def test_s3fifo_ghost_readmits_to_main() -> None:
    c = Cache(S3FIFOPolicy(), 10)
    for i in range(10):
        c.access(k(i))
    c.access(k(100))  # evicts k(0) from S into the ghost
    assert k(0) not in c.keys
    c.access(k(0))  # ghost hit: re-admitted straight into M
    for i in range(200, 230):  # a stream of one-hit wonders churns S only
        c.access(k(i))
    assert k(0) in c.keys


def test_s3fifo_pinned_victim_is_rescued_by_its_read() -> None:
    p = S3FIFOPolicy()
    for i in range(10):
        p.insert(k(i), 1)
    v = first(p, pinned=lambda x: x == k(0))  # k(0) is doomed but pinned: k(1) is the victim
    assert v == k(1)
    p.remove(v)
    assert first(p) == k(0)  # still the best victim while nobody reads it
    p.touch(k(0))  # the pinned read finishes: a hit rescues it into M
    assert first(p) == k(2)
    assert sorted(p.candidates()) == sorted(k(i) for i in range(10) if i != 1)


def test_s3fifo_is_scan_resistant() -> None:
    cap, hot = 100, [k(i) for i in range(40)]
    caches = {n: Cache(make_policy(n), cap) for n in ("s3fifo", "lru")}
    rng = random.Random(0)
    warm = 1000
    for c in caches.values():
        for r in range(20):  # warm the hot set with repeated hits, mixed with some cold traffic
            for h in hot:
                c.access(h)
            for _ in range(30):
                c.access(k(warm + rng.randrange(10_000)))
    for c in caches.values():
        for i in range(5000):  # a long one-off scan of new keys
            c.access(k(1_000_000 + i))
            if i % 50 == 0:
                assert len(c.keys) <= cap
    assert all(h in caches["s3fifo"].keys for h in hot)
    assert not any(h in caches["lru"].keys for h in hot)  # the test means something


def test_s3fifo_small_queue_is_ten_percent_of_bytes() -> None:
    c = Cache(S3FIFOPolicy(), 100)
    for r in range(3):
        for i in range(100):
            c.access(k(i))
    for i in range(1000):
        c.access(k(10_000 + i))
    # after the scan, the 100 hot keys share the cache with about 10% new ones
    survivors = sum(k(i) in c.keys for i in range(100))
    assert 85 <= survivors <= 92


def test_s3fifo_parameters_are_checked() -> None:
    for kw in ({"small_ratio": 0.0}, {"small_ratio": 1.0}, {"move_threshold": 0}, {"ghost_ratio": -1.0}):
        with pytest.raises(ValueError):
            S3FIFOPolicy(**kw)  # type: ignore[arg-type]


# --- prefix-aware ----------------------------------------------------------------------------------------


def test_prefix_evicts_leaves_first() -> None:
    p = PrefixAwarePolicy()
    a, b, c, x = k(1), k(2), k(3), k(4)
    for key in (a, b, c, x):
        p.insert(key, 1)
    p.link(a, b)
    p.link(b, c)
    for key in (a, b, c):  # a prompt re-reads its prefix: a is the least recently used
        p.touch(key)
    lru = LRUPolicy()
    for key in (a, b, c, x):
        lru.insert(key, 1)
    for key in (a, b, c):
        lru.touch(key)
    assert list(lru.candidates()) == [x, a, b, c]
    assert list(p.candidates()) == [x, c, a, b]  # leaves in LRU order, then chunks others depend on
    p.remove(x)
    p.remove(c)  # b lost its only cached child: it is a leaf now, before its parent a
    assert list(p.candidates()) == [b, a]


def test_prefix_links_before_insert_and_relinks() -> None:
    p = PrefixAwarePolicy()
    a, b, c = k(1), k(2), k(3)
    p.link(a, b)  # the pool may link before the tier has the chunks
    p.insert(b, 1)
    p.insert(a, 1)
    assert list(p.candidates()) == [b, a]
    p.insert(c, 1)
    assert list(p.candidates()) == [b, c, a]
    p.link(c, b)  # b now follows c instead: a has no cached child left
    assert list(p.candidates()) == [b, a, c]
    p.link(b, b)  # ignored
    p.remove(b)
    assert list(p.candidates()) == [a, c]
    p.insert(b, 1)  # the link c -> b survived while c stayed cached
    assert list(p.candidates()) == [a, b, c]


def test_prefix_shared_parent_stays_until_its_last_child_goes() -> None:
    p = PrefixAwarePolicy()
    sys_prompt = [k(i) for i in range(3)]
    for s in sys_prompt:
        p.insert(s, 1)
    for s1, s2 in itertools.pairwise(sys_prompt):
        p.link(s1, s2)
    suffixes = [k(100 + i) for i in range(5)]
    for s in suffixes:
        p.insert(s, 1)
        p.link(sys_prompt[-1], s)
    c = list(p.candidates())
    assert c[:5] == suffixes and set(c[5:]) == set(sys_prompt)
    for s in suffixes[:4]:
        p.remove(s)
    assert first(p) == suffixes[4]
    p.remove(suffixes[4])
    assert first(p) == sys_prompt[-1]


def test_prefix_forgets_links_of_uncached_chunks() -> None:
    p = PrefixAwarePolicy()
    for i in range(5000):
        p.link(k(i), k(i + 1))  # never stored
    assert len(p._parent) <= 1024 + 1  # bounded
    for i in range(100):
        p.insert(k(i), 1)
        if i:
            p.link(k(i - 1), k(i))
    for i in range(100):
        p.remove(k(i))
    assert len(p) == 0
    assert all(k(i) not in p._parent for i in range(1, 100))


# --- attention-aware -------------------------------------------------------------------------------------


def test_attention_keeps_a_high_mass_key_over_lru_order() -> None:
    p = AttentionAwarePolicy()
    keys = [k(i) for i in range(6)]
    for key in keys:
        p.insert(key, 1)
    for key in keys:
        p.observe(key, 0.01)
    p.observe(keys[0], 5.0)  # the sink: the model keeps looking at it
    for key in keys[1:]:
        p.touch(key)  # recency says keys[0] goes first
    c = list(p.candidates())
    assert c[-1] == keys[0]
    assert c[:-1] == keys[1:]  # equal mass: least recently used first


def test_attention_without_observations_is_lru() -> None:
    p, lru = AttentionAwarePolicy(), LRUPolicy()
    rng = random.Random(1)
    for i in range(30):
        for q in (p, lru):
            q.insert(k(i), 1)
    for _ in range(100):
        key = k(rng.randrange(30))
        p.touch(key)
        lru.touch(key)
    assert list(p.candidates()) == list(lru.candidates())


def test_attention_decay_half_life_in_observe_calls() -> None:
    p = AttentionAwarePolicy(half_life=100)
    a, b = k(1), k(2)
    p.insert(a, 1)
    p.insert(b, 1)
    p.observe(a, 1.0)
    for _ in range(100):
        p.observe(k(99), 1.0)  # unknown keys still advance the clock
    assert p.score(a) == pytest.approx(0.5, rel=1e-9)
    p.observe(b, 0.6)  # fresh mass beats older, larger mass that has decayed
    assert first(p) == a
    assert p.score(k(99)) is None


def test_attention_rescale_keeps_order_and_scores() -> None:
    p = AttentionAwarePolicy(half_life=1.0)  # the weight doubles every call: rescales after 512 calls
    for i in range(10):
        p.insert(k(i), 1)
    for step in range(3000):
        p.observe(k(step % 10), float(step % 10 + 1))
    assert p._weight < 2.0**512
    s = [p.score(k(i)) for i in range(10)]
    assert all(v is not None and v > 0 for v in s)
    assert list(p.candidates()) == sorted((k(i) for i in range(10)), key=lambda x: p.score(x) or 0.0)


def test_attention_fresh_keys_wait_for_their_first_observation() -> None:
    p = AttentionAwarePolicy(fresh_ratio=0.5)
    for i in range(4):
        p.insert(k(i), 1)
        p.observe(k(i), 0.1 * (i + 1))
    p.insert(k(10), 1)  # written, not attended to yet: evicted after every scored key
    p.insert(k(11), 1)
    assert list(p.candidates()) == [k(0), k(1), k(2), k(3), k(10), k(11)]
    p.observe(k(11), 0.001)  # the model barely looked at it
    p.observe(k(10), 0.25)
    assert list(p.candidates()) == [k(11), k(0), k(1), k(10), k(2), k(3)]
    assert p.score(k(10)) == pytest.approx(0.25, rel=1e-3)


def test_attention_fresh_window_is_bounded() -> None:
    p = AttentionAwarePolicy(fresh_ratio=0.25)
    for i in range(8):
        p.insert(k(i), 1)
        p.observe(k(i), 1.0)
    for i in range(100, 112):  # never observed: the oldest leave the window with score 0
        p.insert(k(i), 1)
    c = list(p.candidates())
    assert c[:7] == [k(i) for i in range(100, 107)]
    assert set(c[7:15]) == {k(i) for i in range(8)}
    assert c[15:] == [k(i) for i in range(107, 112)]
    p.touch(k(100))  # a hit on a key with no attention on record: back to the window
    assert list(p.candidates())[-1] == k(100)


def test_attention_default_half_life_follows_the_tier_size() -> None:
    p = AttentionAwarePolicy()
    for i in range(200):
        p.insert(k(i), 1)
        p.observe(k(i), 1.0)
    s0 = p.score(k(0)) or 0.0
    for _ in range(200):
        p.observe(k(10_000), 1.0)
    assert (p.score(k(0)) or 0.0) == pytest.approx(s0 / 2, rel=1e-9)


def test_attention_rejects_bad_mass_and_parameters() -> None:
    p = AttentionAwarePolicy()
    p.insert(k(1), 1)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            p.observe(k(1), bad)
    for kw in ({"half_life": 0.0}, {"half_life": float("inf")}, {"fresh_ratio": 1.0}):
        with pytest.raises(ValueError):
            AttentionAwarePolicy(**kw)


def test_attention_heap_stays_bounded() -> None:
    p = AttentionAwarePolicy()
    for i in range(10):
        p.insert(k(i), 1)
    for step in range(10_000):
        p.touch(k(step % 10))
        p.observe(k(step % 7), 0.1)
    assert len(p._heap) <= 2 * 10 + 64 + 1
    assert sorted(p.candidates()) == [k(i) for i in range(10)]


# --- property test: random op sequences against a bounded cache ------------------------------------------

ops = st.lists(
    st.tuples(
        st.sampled_from(["access", "access", "access", "delete", "link", "observe", "peek", "drain"]),
        st.integers(0, 40),
        st.integers(0, 40),
        st.floats(0, 10, allow_nan=False),
        st.integers(1, 4),
    ),
    max_size=300,
)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seq=ops, capacity=st.integers(1, 12), pin_seed=st.integers(0, 2**16))
def test_property_candidates_stream_is_sound(
    name: str, seq: list[tuple[str, int, int, float, int]], capacity: int, pin_seed: int
) -> None:
    p = make_policy(name)
    rng = random.Random(pin_seed)
    sizes: dict[bytes, int] = {}  # present key -> size; the cache holds at most `capacity` size units

    def stream_ok(limit: int | None = None) -> list[bytes]:
        out: list[bytes] = []
        for x in p.candidates():
            assert x in sizes, "candidates yielded a key that is not present"
            out.append(x)
            if limit is not None and len(out) >= limit:
                break
        assert len(out) == len(set(out)), "a key was yielded twice in one stream"
        return out

    for op, a, b, mass, size in seq:
        ka, kb = k(a), k(b)
        if op == "access":
            if ka in sizes:
                p.touch(ka)
                continue
            size = min(size, capacity)
            while sum(sizes.values()) + size > capacity:
                pinned = {x for x in sizes if rng.random() < 0.2}
                v = first(p, pinned=pinned.__contains__)
                if v is None:
                    v = first(p)
                assert v is not None and v in sizes
                del sizes[v]
                p.remove(v)
            sizes[ka] = size
            p.insert(ka, size)
        elif op == "delete":
            sizes.pop(ka, None)
            p.remove(ka)
        elif op == "link":
            p.link(ka, kb)
        elif op == "observe":
            p.observe(ka, mass)
        elif op == "peek":  # a partial stream, then the caller stops
            stream_ok(limit=b % 5 + 1)
        else:  # every present key eventually appears
            assert set(stream_ok()) == set(sizes)
        assert len(p) == len(sizes)
    assert set(stream_ok()) == set(sizes)


# --- through the real DRAM tier --------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
async def test_dram_tier_with_each_policy(name: str) -> None:
    obj, slots = 4096, 8
    async with DRAMBackend(slots * obj, policy=name) as b:
        assert b.stats()["policy"] == name
        rng = random.Random(2)
        hot = [k(i) for i in range(3)]
        out = torch.empty(obj, dtype=torch.uint8)
        prev: bytes | None = None
        for i in range(200):
            key = k(1000 + i)
            await b.write(key, rand_bytes(obj, i))
            if prev is not None:
                b.policy.link(prev, key)
            b.policy.observe(key, rng.random())
            prev = key if rng.random() < 0.7 else None
            assert b.used_bytes <= b.capacity and len(b) <= slots
            assert await b.contains(key)  # the newest write is present
            if i % 4 == 0:
                h = hot[rng.randrange(3)]
                if not await b.read_into(h, out):
                    await b.write(h, rand_bytes(obj, 10_000 + i))
                b.policy.observe(h, 2.0)
        assert len(b.policy) == len(b)
        assert set(b.policy.candidates()) == {x async for x in b.keys()}  # noqa: SIM118
        assert b.stats()["evictions"] > 0


@pytest.mark.parametrize("name", NAMES)
async def test_dram_tier_mixed_sizes(name: str) -> None:
    async with DRAMBackend(16 * 4096, policy=name) as b:
        for i in range(120):
            n = 4096 * (1 + i % 4)
            await b.write(k(i), rand_bytes(n, i))
            assert b.used_bytes <= b.capacity
            assert await b.contains(k(i))
            if i % 3 == 2:
                await b.delete(k(i - 1))
        assert len(b.policy) == len(b)


def _reference_s3fifo_hits(trace: list[int], cap: int) -> int:
    """S3-FIFO written straight from the paper (equal sizes, evict on demand), to check the lazy version."""
    from collections import OrderedDict, deque

    small: deque[int] = deque()
    main: deque[int] = deque()
    ghost: OrderedDict[int, None] = OrderedDict()
    freq: dict[int, int] = {}
    hits = 0

    def evict() -> None:
        if small and (len(small) >= 0.1 * len(freq) or not main):
            while small:
                t = small.popleft()
                if freq[t] >= 1:
                    freq[t] = 0
                    main.append(t)
                    continue
                del freq[t]
                ghost[t] = None
                while len(ghost) > int(0.9 * len(freq)):
                    ghost.popitem(last=False)
                return
        while True:
            t = main.popleft()
            if freq[t]:
                freq[t] -= 1
                main.append(t)
                continue
            del freq[t]
            return

    for x in trace:
        if x in freq:
            freq[x] = min(3, freq[x] + 1)
            hits += 1
            continue
        if len(freq) >= cap:
            evict()
        freq[x] = 0
        if x in ghost:
            del ghost[x]
            main.append(x)
        else:
            small.append(x)
    return hits


@pytest.mark.parametrize("seed", range(3))
def test_s3fifo_matches_the_reference_algorithm(seed: int) -> None:
    rng = random.Random(seed)
    hot = list(range(60))
    trace = [rng.choice(hot) if rng.random() < 0.6 else rng.randrange(100, 3000) for _ in range(20_000)]
    c = Cache(S3FIFOPolicy(), 50)
    for x in trace:
        c.access(k(x))
    assert c.hits == _reference_s3fifo_hits(trace, 50)


@pytest.mark.parametrize("name", NAMES)
async def test_through_the_pool(name: str) -> None:
    # the pool feeds link() on put and observe() from observe_attention(); every policy takes both
    import numpy as np

    from kvpool import KVLayout, KVPool

    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float16, chunk_tokens=16)
    cap = 8 * layout.chunk_nbytes
    async with await KVPool.open(layout=layout, model_id="m", backends=[f"dram://?capacity={cap}&policy={name}"]) as pool:
        tier = pool.tiers[0]
        assert isinstance(tier, DRAMBackend) and tier.policy.name == name
        rng = np.random.default_rng(0)
        for i in range(12):
            t = rng.integers(0, 50_000, 64).tolist()
            await pool.put(t, torch.randn(layout.kv_shape(64)).to(layout.dtype))
            await pool.observe_attention(t, [0.7, 0.1, 0.1, 0.1])
            assert tier.used_bytes <= cap
            assert await pool.lookup(t) >= 16  # the newest prompt's chunks went in last
        assert len(tier.policy) == len(tier)
        if isinstance(tier.policy, PrefixAwarePolicy):
            assert tier.policy._parent
        if isinstance(tier.policy, AttentionAwarePolicy):
            assert any((tier.policy.score(key) or 0.0) > 0 for key in tier.policy.candidates())
