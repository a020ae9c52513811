"""The values the remote tiers pass around: bytes fetched from a server, the plan of one range read, one
object being written, and what names a transport (:class:`Family`). Pure."""

from __future__ import annotations

import os
from typing import Any

import attrs
import torch

from .boundary import ExceptionMap
from .format import Filler, Header

__all__ = ["Value", "Plan", "Family", "Item", "flat_bytes"]


class Value:
    """Bytes fetched from a server: a view, its address, and what keeps them alive."""

    __slots__ = ("mv", "addr", "keep")

    def __init__(self, mv: memoryview, addr: int, keep: Any = None) -> None:
        self.mv = mv
        self.addr = addr
        self.keep = keep


@attrs.define(slots=True, eq=False)
class Plan:
    """One range read whose header was found: the parts that cover the range, what they are copied into, and
    how the read ended (``status``: ``ok`` or the counter a miss goes to)."""

    index: int
    key: bytes
    name: str
    hdr: Header
    offset: int
    nbytes: int
    dest: torch.Tensor
    value: Value  # the header value (an inline object's data follows the header in it)
    status: str = "ok"
    filler: Filler | None = None
    parts: list[int] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        ps, lo, n = self.hdr.part_size, self.offset, self.nbytes
        self.parts = list(range(lo // ps, (lo + n - 1) // ps + 1)) if n else []


@attrs.frozen
class Family:
    """What names one remote transport: its scheme and logger name, its objects' magic and header salt (so a
    value one writes is never taken for the other's), and what its library's exceptions mean."""

    name: str
    magic: bytes
    salt: int
    exceptions: ExceptionMap


class Item:
    """One object being written: its contiguous bytes, a fresh version id and (once computed) its checksums."""

    __slots__ = ("key", "name", "flat", "nbytes", "nparts", "part_size", "version", "sums")

    def __init__(self, key: bytes, name: str, flat: torch.Tensor, part_size: int) -> None:
        self.key = key
        self.name = name
        self.flat = flat  # contiguous uint8 CPU bytes of the source
        self.nbytes = flat.numel()
        self.part_size = part_size
        self.nparts = -(-self.nbytes // part_size)
        self.version = int.from_bytes(os.urandom(8), "little")
        self.sums: list[int] = [0] * self.nparts

    @property
    def inline(self) -> bool:
        return self.nparts == 1

    def part(self, p: int) -> torch.Tensor:
        ps = self.part_size
        return self.flat[p * ps : min(self.nbytes, (p + 1) * ps)]

    def part_len(self, p: int) -> int:
        return min(self.part_size, self.nbytes - p * self.part_size)


def flat_bytes(src: torch.Tensor) -> torch.Tensor:
    """The row-major bytes of ``src`` as one contiguous uint8 CPU tensor (no copy when it already is one)."""
    t = src.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)
