"""Which chunks read from a lower tier are worth copying up (promotion admission)."""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["SecondHit"]


class SecondHit:
    """Second-hit admission: a chunk is promoted only when it was read from a lower tier before, recently.

    A one-off scan of cold prefixes then never floods the fast tier.

    Parameters
    ----------
    size
        How many first hits are remembered (oldest forgotten first).
    """

    def __init__(self, size: int = 65536) -> None:
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._size = size

    def admit(self, key: bytes) -> bool:
        """Whether ``key`` (just read from below) should be promoted now."""
        if key in self._seen:
            del self._seen[key]
            return True
        self._seen[key] = None
        if len(self._seen) > self._size:
            self._seen.popitem(last=False)
        return False
