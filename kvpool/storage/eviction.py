"""Eviction policies: which object a full tier gives up first.

A policy only orders keys; the tier that owns the bytes asks it for candidates and skips the ones it cannot
evict right now (pinned by an in-flight read). Policies are plain synchronous objects: every call is O(1)
amortised (the attention-aware policy: O(log n), a heap), because they run on every hit.

The calling protocol (what :mod:`kvpool.memory.dram` and :mod:`kvpool.ssd.store` do)::

    victim = next((k for k in policy.candidates() if not pinned(k)), None)
    ... policy.remove(victim) ...        # then ask for a fresh candidates() stream for the next victim

``insert`` on a write, ``touch`` on a read hit, ``remove`` on a delete or an eviction (also before an
overwrite's ``insert``). The pool additionally calls ``link(parent, child)`` for consecutive chunk keys of
every stored prompt and ``observe(key, mass)`` with the attention mass a chunk received; policies that do not
use them inherit the no-ops.

Policies (``make_policy(name)``, ``dram://?policy=NAME``):

``lru``        least recently used first.
``s3fifo``     S3-FIFO (Yang et al., SOSP'23): a small probationary FIFO, a main FIFO with reinsertion and a
               ghost FIFO; one-hit wonders leave quickly, so a one-off scan does not flush the hot set.
``prefix``     LRU among chunks no other cached chunk depends on (leaves) before any chunk that has cached
               children, so a cached prefix is peeled from its tail and never loses its head first.
``attention``  lowest decayed attention mass first (H2O/Quest-style heavy hitters), ties least recently used.
"""

from __future__ import annotations

import abc
import heapq
import math
from collections import OrderedDict
from collections.abc import Iterator

from ..errors import ConfigError

__all__ = [
    "POLICIES",
    "AttentionAwarePolicy",
    "EvictionPolicy",
    "LRUPolicy",
    "PrefixAwarePolicy",
    "PolicyHints",
    "S3FIFOPolicy",
    "make_policy",
]


class EvictionPolicy(abc.ABC):
    """Orders a tier's keys for eviction."""

    name: str = ""

    @abc.abstractmethod
    def insert(self, key: bytes, nbytes: int) -> None:
        """A new object arrived."""

    @abc.abstractmethod
    def touch(self, key: bytes) -> None:
        """An object was read (a hit)."""

    @abc.abstractmethod
    def remove(self, key: bytes) -> None:
        """An object left (deleted or evicted); unknown keys are ignored."""

    @abc.abstractmethod
    def candidates(self) -> Iterator[bytes]:
        """Keys in the order they should be evicted, best victim first.

        Lazy: the caller must not insert/remove while iterating (collect victims, then evict them).
        """

    def link(self, parent: bytes, child: bytes) -> None:
        """``child`` is the chunk that follows ``parent`` in some prompt (it is useless without it)."""

    def observe(self, key: bytes, mass: float) -> None:
        """The model paid ``mass`` (>= 0) attention to the chunk ``key``."""

    def __len__(self) -> int:
        return 0


class LRUPolicy(EvictionPolicy):
    """Least recently used first."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[bytes, None] = OrderedDict()

    def insert(self, key: bytes, nbytes: int) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, key: bytes) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: bytes) -> None:
        self._order.pop(key, None)

    def candidates(self) -> Iterator[bytes]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)


class S3FIFOPolicy(EvictionPolicy):
    """S3-FIFO: small FIFO ``S`` (10% of the bytes), main FIFO ``M``, ghost FIFO ``G``, 2-bit frequencies.

    A new key enters ``S`` (or ``M`` when ``G`` remembers it). A hit increments its frequency (capped at 3);
    nothing moves on a hit. To find a victim: when ``S`` holds at least ``small_ratio`` of the bytes (or
    ``M`` is empty), heads of ``S`` are promoted to the tail of ``M`` while they were hit at least
    ``move_threshold`` times since they arrived (their frequency restarts at 0; libCacheSim's default is 2,
    1 keeps a chunk re-read once, as a chat turn does), and the first that was not is the victim,
    remembered in ``G`` when it leaves. Else the head of ``M`` is reinserted at ``M``'s tail with its
    frequency decremented while that is positive, otherwise it is the victim. ``G`` holds as many keys as
    ``ghost_ratio`` times the objects cached. The bytes of the whole tier stand for the cache size (a policy
    does not know the capacity; eviction only runs when the tier is full).

    How :meth:`candidates` maps onto this: the stream first yields keys already chosen as victims by an
    earlier stream but still present (pinned, or collected and not evicted), then runs the algorithm above
    step by step. Each chosen victim is moved, complete, from ``S``/``M`` to a *doomed* FIFO and then
    yielded; promotions and reinsertions happen between yields. So at every yield the structure is valid and
    a caller may stop at any point: the doomed keys are simply the first victims of the next stream. Every
    present key appears exactly once in a stream (once ``S`` and ``M`` are drained, all keys are doomed) and
    the stream is finite. A hit on a doomed key (a pinned read finishing) rescues it to the tail of ``M``, as
    S3-FIFO would have done at eviction time. Draining a stream without evicting anything is harmless: it
    leaves the keys doomed in the order yielded with their frequencies spent, as evicting would have. Only
    a doomed key that came from ``S`` enters ``G`` when removed, so a delete or an overwrite does not fake a
    ghost hit. Promotion work is paid for by inserts and reinsertion by hits: O(1) amortised.
    """

    name = "s3fifo"

    def __init__(self, small_ratio: float = 0.1, move_threshold: int = 1, ghost_ratio: float = 0.9) -> None:
        if not 0.0 < small_ratio < 1.0:
            raise ValueError(f"small_ratio must be in (0, 1), got {small_ratio}")
        if not 1 <= move_threshold <= 3:
            raise ValueError(f"move_threshold must be 1, 2 or 3, got {move_threshold}")
        if ghost_ratio < 0:
            raise ValueError(f"ghost_ratio must be >= 0, got {ghost_ratio}")
        self.small_ratio = small_ratio
        self.move_threshold = move_threshold
        self.ghost_ratio = ghost_ratio
        self._small: OrderedDict[bytes, None] = OrderedDict()
        self._main: OrderedDict[bytes, None] = OrderedDict()
        self._doomed: OrderedDict[bytes, bool] = OrderedDict()  # victim chosen, still present -> came from S
        self._ghost: OrderedDict[bytes, None] = OrderedDict()
        self._freq: dict[bytes, int] = {}
        self._size: dict[bytes, int] = {}
        self._small_bytes = 0
        self._total_bytes = 0

    def insert(self, key: bytes, nbytes: int) -> None:
        old = self._size.get(key)
        if old is not None:  # re-insert of a present key: new size, counts as an access
            self._size[key] = nbytes
            self._total_bytes += nbytes - old
            if key in self._small:
                self._small_bytes += nbytes - old
            self.touch(key)
            return
        self._size[key] = nbytes
        self._freq[key] = 0
        self._total_bytes += nbytes
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = None
        else:
            self._small[key] = None
            self._small_bytes += nbytes

    def touch(self, key: bytes) -> None:
        f = self._freq.get(key)
        if f is None:
            return
        if key in self._doomed:
            del self._doomed[key]
            self._freq[key] = 0
            self._main[key] = None
        elif f < 3:
            self._freq[key] = f + 1

    def remove(self, key: bytes) -> None:
        n = self._size.pop(key, None)
        if n is None:
            return
        del self._freq[key]
        self._total_bytes -= n
        if key in self._small:
            del self._small[key]
            self._small_bytes -= n
        elif key in self._main:
            del self._main[key]
        elif self._doomed.pop(key):  # an eviction chosen in S: remember it
            self._ghost[key] = None
            limit = int(self.ghost_ratio * len(self._size))
            while len(self._ghost) > limit:
                self._ghost.popitem(last=False)

    def _choose(self) -> bytes:
        """Run S3-FIFO until a victim is found; move it to the doomed FIFO. ``S`` or ``M`` is non-empty."""
        small, main, freq, size = self._small, self._main, self._freq, self._size
        if small and (self._small_bytes >= self.small_ratio * self._total_bytes or not main):
            while small:  # once S is chosen, it evicts (unless promoting empties it)
                key, _ = small.popitem(last=False)
                self._small_bytes -= size[key]
                if freq[key] >= self.move_threshold:
                    freq[key] = 0
                    main[key] = None
                    continue
                self._doomed[key] = True
                return key
        while True:  # M is not empty here: it was, or S's promotions went there
            key, _ = main.popitem(last=False)
            f = freq[key]
            if f > 0:
                freq[key] = f - 1
                main[key] = None
                continue
            self._doomed[key] = False
            return key

    def candidates(self) -> Iterator[bytes]:
        if self._doomed:
            yield from list(self._doomed)  # a snapshot: _choose appends to it below
        while self._small or self._main:
            yield self._choose()

    def __len__(self) -> int:
        return len(self._size)


class PrefixAwarePolicy(EvictionPolicy):
    """LRU among leaves first (chunks no cached chunk depends on), then LRU among chunks with cached children.

    A chunk's KV is only usable after every chunk before it in the prompt, so evicting the head of a cached
    prefix wastes its whole tail. The policy learns the prompt structure from :meth:`link` (the pool calls
    it for consecutive chunk keys of each stored prompt; before or after the chunks are inserted) and keeps
    two LRU lists: leaves, and chunks with at least one cached child. Candidates are all leaves in LRU order,
    then the rest in LRU order; a lazy walk of the two lists, no mutation.

    When a chunk loses its last cached child it joins the leaves at the end its last use is nearer to (by
    use tick), usually the LRU end: its tail was just evicted as the least recently used leaf, and a prefix
    chunk is used whenever its tail is. Likewise when a leaf gains a cached child. A link is forgotten once
    neither end is cached (links made before either end was stored are kept for a while, bounded).
    """

    name = "prefix"

    def __init__(self) -> None:
        self._leaves: OrderedDict[bytes, None] = OrderedDict()
        self._inner: OrderedDict[bytes, None] = OrderedDict()
        self._tick: dict[bytes, int] = {}  # present keys -> last use
        self._nkids: dict[bytes, int] = {}  # present keys -> number of present children
        self._parent: dict[bytes, bytes] = {}
        self._kids: dict[bytes, set[bytes]] = {}
        self._pending: OrderedDict[bytes, None] = OrderedDict()  # children linked while neither end present
        self._clock = 0

    # --- helpers ---------------------------------------------------------------------------------------
    def _place(self, od: OrderedDict[bytes, None], key: bytes) -> None:
        tick = self._tick
        if od:
            lo, hi, t = tick[next(iter(od))], tick[next(reversed(od))], tick[key]
            if t < hi and t - lo < hi - t:
                od[key] = None
                od.move_to_end(key, last=False)
                return
        od[key] = None

    def _gain_kid(self, parent: bytes) -> None:
        n = self._nkids[parent]
        self._nkids[parent] = n + 1
        if n == 0:
            del self._leaves[parent]
            self._place(self._inner, parent)

    def _lose_kid(self, parent: bytes) -> None:
        n = self._nkids[parent] - 1
        self._nkids[parent] = n
        if n == 0:
            del self._inner[parent]
            self._place(self._leaves, parent)

    def _unlink(self, parent: bytes, child: bytes) -> None:
        del self._parent[child]
        kids = self._kids[parent]
        kids.discard(child)
        if not kids:
            del self._kids[parent]
        if parent in self._tick and child in self._tick:
            self._lose_kid(parent)

    # --- the interface ---------------------------------------------------------------------------------
    def link(self, parent: bytes, child: bytes) -> None:
        if parent == child:
            return
        old = self._parent.get(child)
        if old == parent:
            return
        if old is not None:
            self._unlink(old, child)
        self._parent[child] = parent
        self._kids.setdefault(parent, set()).add(child)
        present = self._tick
        if parent in present and child in present:
            self._gain_kid(parent)
        elif parent not in present and child not in present:
            self._pending[child] = None
            limit = max(1024, 2 * len(present))
            while len(self._pending) > limit:
                c, _ = self._pending.popitem(last=False)
                p = self._parent.get(c)
                if p is not None and c not in present and p not in present:
                    self._unlink(p, c)

    def insert(self, key: bytes, nbytes: int) -> None:
        self._clock += 1
        if key in self._tick:
            self._tick[key] = self._clock
            (self._inner if self._nkids[key] else self._leaves).move_to_end(key)
            return
        self._tick[key] = self._clock
        n = sum(1 for c in self._kids.get(key, ()) if c in self._tick)
        self._nkids[key] = n
        (self._inner if n else self._leaves)[key] = None
        p = self._parent.get(key)
        if p is not None and p in self._tick:
            self._gain_kid(p)

    def touch(self, key: bytes) -> None:
        if key in self._tick:
            self._clock += 1
            self._tick[key] = self._clock
            (self._inner if self._nkids[key] else self._leaves).move_to_end(key)

    def remove(self, key: bytes) -> None:
        if self._tick.pop(key, None) is None:
            return
        if self._nkids.pop(key):
            del self._inner[key]
        else:
            del self._leaves[key]
        p = self._parent.get(key)
        if p is not None:
            if p in self._tick:
                self._lose_kid(p)
            else:  # neither end cached any more
                self._unlink(p, key)
        kids = self._kids.get(key)
        if kids:
            for c in [c for c in kids if c not in self._tick]:
                self._unlink(key, c)

    def candidates(self) -> Iterator[bytes]:
        yield from self._leaves
        yield from self._inner

    def __len__(self) -> int:
        return len(self._tick)


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


POLICIES: dict[str, type[EvictionPolicy]] = {
    "lru": LRUPolicy,
    "s3fifo": S3FIFOPolicy,
    "prefix": PrefixAwarePolicy,
    "attention": AttentionAwarePolicy,
}


def make_policy(name: str) -> EvictionPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ConfigError(f"unknown eviction policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None


class PolicyHints:
    """Mixin for a backend whose objects are ordered by an :class:`EvictionPolicy` in ``self.policy``: the
    backend's eviction-hint surface (``hint_prefix``/``hint_attention``/``hint_touch``, see
    :class:`kvpool.storage.backend.Backend`) fed straight to the policy. Put it before ``Backend`` in the
    bases and declare ``eviction_hints=True``."""

    policy: EvictionPolicy

    def hint_prefix(self, parent: bytes, child: bytes) -> None:
        self.policy.link(parent, child)

    def hint_attention(self, key: bytes, mass: float) -> None:
        self.policy.observe(key, mass)

    def hint_touch(self, key: bytes) -> None:
        self.policy.touch(key)  # every policy ignores keys it does not hold
