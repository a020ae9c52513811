"""``attention``: lowest decayed attention mass first (heavy hitters stay)."""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Iterator

from .base import EvictionPolicy


class AttentionAwarePolicy(EvictionPolicy):
    """Lowest decayed attention mass first (H2O/Quest-style heavy hitters), ties least recently used.

    ``observe(key, mass)`` adds ``mass`` to the key's score. Scores decay exponentially with a half-life
    measured in *observe calls* (the pool makes one per chunk per :meth:`~kvpool.KVPool.observe_attention`):
    deterministic, independent of wall-clock time and load. By default (``half_life=None``) the half-life is
    as many calls as there are keys cached (at least 64): a chunk's attention halves about once per turnover
    of the tier, whatever its size; a number fixes it. Decay is lazy: instead of shrinking every score, each
    observation is weighted by a global factor that grows by ``2 ** (1 / half_life)`` per call, so the stored
    values keep their order; when the factor passes 2**512 every value is rescaled at once (O(n), every ~512
    half-lives).

    Keys not observed yet (a chunk just written, before the model attended to it) wait in a *fresh* LRU queue
    that is evicted only after every scored key, as H2O keeps its recent window; the first observation
    moves a key to the scored set (``observe(k, 0.0)`` too: evidence of no attention). The fresh queue holds
    at most ``fresh_ratio`` of the keys (a prompt must fit in that share of the tier to wait whole for its
    attention); beyond that its least recently used key joins the scored set with score 0. So a tier whose
    keys are never observed is exactly LRU (a hit on a key of score 0 returns it to the fresh queue), and
    one whose keys are observed only now and then protects at most that share of unobserved keys.
    ``touch``/``insert`` otherwise only refresh recency, the tie-breaker. Observations of keys not cached are
    ignored (they still advance the decay clock).

    Scored victims come from a heap of ``(value, last use, key)`` with lazy deletion: a touch or an
    observation pushes a fresh entry and the old one goes stale; the heap is rebuilt when stale entries
    outnumber live ones. :meth:`candidates` pops stale entries off the top, walks the heap in order without
    changing it (a second small heap over positions) yielding only live entries, then the fresh queue: lazy,
    O(log n) per key.
    """

    name = "attention"

    _RESCALE_AT = 2.0**512

    def __init__(self, half_life: float | None = None, fresh_ratio: float = 0.5) -> None:
        if half_life is not None and not (half_life > 0 and math.isfinite(half_life)):
            raise ValueError(f"half_life must be a positive number of observe calls, got {half_life}")
        if not 0.0 <= fresh_ratio < 1.0:
            raise ValueError(f"fresh_ratio must be in [0, 1), got {fresh_ratio}")
        self.half_life = half_life
        self.fresh_ratio = fresh_ratio
        self._growth = 2.0 ** (1.0 / half_life) if half_life is not None else 0.0
        self._weight = 1.0  # weight of a unit of mass observed now, relative to the stored values
        self._value: dict[bytes, float] = {}  # scored keys
        self._fresh: OrderedDict[bytes, None] = OrderedDict()  # keys not observed yet, LRU first
        self._used: dict[bytes, int] = {}  # every key -> last use
        self._heap: list[tuple[float, int, bytes]] = []
        self._clock = 0

    def score(self, key: bytes) -> float | None:
        """The key's decayed attention mass now (0.0 while fresh), or ``None`` when it is not cached."""
        if key in self._fresh:
            return 0.0
        v = self._value.get(key)
        return None if v is None else v / self._weight

    def _push(self, key: bytes) -> None:
        heap = self._heap
        heapq.heappush(heap, (self._value[key], self._used[key], key))
        if len(heap) > 2 * len(self._value) + 64:
            self._rebuild()

    def _rebuild(self) -> None:
        used = self._used
        self._heap = [(v, used[k], k) for k, v in self._value.items()]
        heapq.heapify(self._heap)

    def _use(self, key: bytes) -> None:
        self._clock += 1
        self._used[key] = self._clock

    def insert(self, key: bytes, nbytes: int) -> None:
        if key in self._used:
            self.touch(key)
            return
        self._use(key)
        fresh = self._fresh
        fresh[key] = None
        while len(fresh) > max(1, int(self.fresh_ratio * len(self._used))):
            old, _ = fresh.popitem(last=False)
            self._value[old] = 0.0
            self._push(old)

    def touch(self, key: bytes) -> None:
        if key not in self._used:
            return
        self._use(key)
        if key in self._fresh:
            self._fresh.move_to_end(key)
        elif self._value[key] == 0.0:  # no attention on record: back to the fresh window
            del self._value[key]
            self._fresh[key] = None
            while len(self._fresh) > max(1, int(self.fresh_ratio * len(self._used))):
                old, _ = self._fresh.popitem(last=False)
                self._value[old] = 0.0
                self._push(old)
        else:
            self._push(key)

    def remove(self, key: bytes) -> None:
        if self._used.pop(key, None) is None:
            return
        if self._value.pop(key, None) is None:
            del self._fresh[key]
        if not self._value:
            self._heap.clear()

    def observe(self, key: bytes, mass: float) -> None:
        if not (mass >= 0 and math.isfinite(mass)):
            raise ValueError(f"attention mass must be finite and non-negative, got {mass}")
        growth = self._growth or 2.0 ** (1.0 / max(64, len(self._used)))
        self._weight *= growth
        if self._weight > self._RESCALE_AT:
            self._rescale()
        if key in self._fresh:
            del self._fresh[key]
            self._value[key] = mass * self._weight
            self._push(key)
            return
        v = self._value.get(key)
        if v is None:
            return
        nv = v + mass * self._weight
        if nv == v:  # nothing changed (or too small to register): a second identical heap entry is a duplicate
            return
        self._value[key] = nv
        self._push(key)

    def _rescale(self) -> None:
        w = self._weight
        self._value = {k: v / w for k, v in self._value.items()}
        self._weight = 1.0
        self._rebuild()

    def candidates(self) -> Iterator[bytes]:
        heap, value, used = self._heap, self._value, self._used

        def live(e: tuple[float, int, bytes]) -> bool:
            return value.get(e[2]) == e[0] and used[e[2]] == e[1]

        while heap and not live(heap[0]):  # stale tops are garbage: dropping them changes no order
            heapq.heappop(heap)
        n = len(heap)
        frontier: list[tuple[tuple[float, int, bytes], int]] = [(heap[0], 0)] if heap else []
        while frontier:
            e, i = heapq.heappop(frontier)
            if live(e):
                yield e[2]
            j = 2 * i + 1
            if j < n:
                heapq.heappush(frontier, (heap[j], j))
                if j + 1 < n:
                    heapq.heappush(frontier, (heap[j + 1], j + 1))
        yield from self._fresh

    def __len__(self) -> int:
        return len(self._used)
