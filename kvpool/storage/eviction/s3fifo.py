"""``s3fifo``: S3-FIFO (Yang et al., SOSP'23), scan-resistant."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from .base import EvictionPolicy


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
