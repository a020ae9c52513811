"""Write intents: which in-flight calls rely on a chunk in a tier, so that a rollback deletes only its own.

Two puts of prompts with a shared prefix can both find the prefix chunk absent and both write it. If one of
them is then cancelled (or fails), deleting "what it wrote" would delete the chunk the other one already
acknowledged. Every put therefore *claims* each (tier, key) slot it may touch before it looks at the tier; a
put that succeeds marks its slots *kept*; a rollback deletes a slot only when it wrote it, nobody else holds
a claim on it, and nobody kept it. While such a delete is in flight, a new claimant waits for it to finish
before it looks at the tier (otherwise it could see the doomed chunk, skip writing it, and lose it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

__all__ = ["Slot", "WriteIntents"]

Slot = tuple[int, bytes]  # (tier index, chunk key)


class _Claim:
    __slots__ = ("count", "kept", "deleting")

    def __init__(self) -> None:
        self.count = 0
        self.kept = False
        self.deleting: asyncio.Future[None] | None = None


class WriteIntents:
    """Per-slot reference counts of in-flight puts (see the module docstring)."""

    def __init__(self) -> None:
        self._claims: dict[Slot, _Claim] = {}

    def __len__(self) -> int:
        return len(self._claims)

    def claim(self, slots: Iterable[Slot]) -> list[asyncio.Future[None]]:
        """Register a call's interest in ``slots``; return the deletions it must wait for first."""
        waits: list[asyncio.Future[None]] = []
        for s in slots:
            c = self._claims.get(s)
            if c is None:
                c = self._claims[s] = _Claim()
            c.count += 1
            if c.deleting is not None and not c.deleting.done():
                waits.append(c.deleting)
        return waits

    def keep(self, slots: Iterable[Slot]) -> None:
        """The call succeeded relying on ``slots``: no concurrent rollback may delete them."""
        for s in slots:
            c = self._claims.get(s)
            if c is not None:
                c.kept = True

    def doomed(self, wrote: Iterable[Slot]) -> tuple[list[Slot], asyncio.Future[None]]:
        """Of the slots a failing call wrote, those it may delete (only it claims them, nobody kept them).

        The returned future must be resolved once the deletes are done (:meth:`release` does it);
        claimants arriving meanwhile wait for it.
        """
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        out: list[Slot] = []
        for s in dict.fromkeys(wrote):
            c = self._claims.get(s)
            if c is not None and c.count == 1 and not c.kept:
                c.deleting = fut
                out.append(s)
        return out, fut

    def release(self, slots: Iterable[Slot], done: asyncio.Future[None] | None = None) -> None:
        """Drop a call's claims (after its rollback deletes, if any, finished)."""
        if done is not None and not done.done():
            done.set_result(None)
        for s in slots:
            c = self._claims.get(s)
            if c is None:
                continue
            c.count -= 1
            if c.count <= 0:
                del self._claims[s]
