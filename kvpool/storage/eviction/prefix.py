"""``prefix``: leaves of the cached prefix tree first, so a prefix is peeled from its tail."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from .base import EvictionPolicy


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
