"""Object format shared by the remote tiers (``redis://``, ``mooncake://``), and their common helpers. Pure.

An object is a header -- magic, format, flags, part size, number of parts, length, a random 64-bit version
id, the 16-byte key, one xxh3-64 checksum per part (seeded with the key and the part's index) and a checksum
of the header itself (seeded with the key and a per-tier salt) -- followed, for an object of one part, by the
data inline. Each tier has its own magic and salt (:class:`RemoteFormat`), so a value written by one is never
taken for the other's.

This module imports neither redis-py nor the Mooncake client.
"""

from __future__ import annotations

import bisect
import ctypes
import math
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs
import torch
import xxhash

from ..errors import ConfigError
from ..storage.backend import nbytes_of
from ..storage.buffers import tensor_runs

if TYPE_CHECKING:
    from ..config import BackendSpec

FORMAT = 1
FLAG_INLINE = 1
# magic, format, flags, reserved, part_size, nparts, length, version, key
FIXED = struct.Struct("<4sBBHIIQQ16s")
_U64 = struct.Struct("<Q")
_MASK = 0xFFFFFFFFFFFFFFFF
_GOLDEN = 0x9E3779B97F4A7C15
# A destination with more contiguous runs than this is filled through one staging buffer and one copy_.
MAX_RUNS = 4096


def key_seed(key: bytes) -> int:
    return int.from_bytes(key[:8], "little")


def part_seed(key: bytes, part: int) -> int:
    """Seed of the checksum of part ``part`` of object ``key``."""
    return (key_seed(key) + part * _GOLDEN) & _MASK


def hdr_len(nparts: int) -> int:
    """Bytes of the header of an object of ``nparts`` parts (without inline data)."""
    return FIXED.size + 8 * nparts + 8


def bytes_address(b: bytes) -> int:
    """Address of a bytes object's data (no copy)."""
    v = ctypes.cast(ctypes.c_char_p(b), ctypes.c_void_p).value
    assert v is not None
    return v


@attrs.frozen(slots=True)
class Header:
    """A verified header: the object's part size, number of parts, length, version, per-part checksums,
    whether the data is inline, and where in the value the data starts."""

    part_size: int
    nparts: int
    length: int
    version: int
    sums: tuple[int, ...]
    inline: bool
    data_off: int

    def part_len(self, p: int) -> int:
        return min(self.part_size, self.length - p * self.part_size)


class RemoteFormat:
    """Header packing and parsing for one tier: its ``magic`` (4 bytes) and its header checksum's salt."""

    __slots__ = ("magic", "hdr_salt")

    def __init__(self, magic: bytes, hdr_salt: int) -> None:
        if len(magic) != 4:
            raise ValueError(f"magic must be 4 bytes, got {magic!r}")
        self.magic = magic
        self.hdr_salt = hdr_salt

    def hdr_seed(self, key: bytes) -> int:
        return key_seed(key) ^ self.hdr_salt

    def pack_header(
        self, key: bytes, length: int, part_size: int, version: int, sums: Sequence[int], inline: bool
    ) -> bytes:
        n = len(sums)
        flags = FLAG_INLINE if inline else 0
        body = FIXED.pack(self.magic, FORMAT, flags, 0, part_size, n, length, version, key)
        body += struct.pack(f"<{n}Q", *sums)
        return body + _U64.pack(xxhash.xxh3_64_intdigest(body, self.hdr_seed(key)))

    def parse_fixed(self, value: bytes | memoryview, key: bytes) -> tuple[int, int, int, int, bool] | None:
        """(part_size, nparts, length, version, inline) of a header's fixed part, or None if it is not one."""
        if len(value) < FIXED.size:
            return None
        magic, fmt, flags, _r, ps, n, length, version, k = FIXED.unpack_from(value)
        if magic != self.magic or fmt != FORMAT or k != key:
            return None
        if ps <= 0 or length <= 0 or n != -(-length // ps):
            return None
        inline = bool(flags & FLAG_INLINE)
        if inline and n != 1:
            return None
        return ps, n, length, version, inline

    def parse_header(self, value: bytes | memoryview, key: bytes) -> Header | None:
        """The verified header of a value, or None if it is damaged, foreign or misplaced."""
        fixed = self.parse_fixed(value, key)
        if fixed is None:
            return None
        ps, n, length, version, inline = fixed
        end = hdr_len(n) - 8
        if len(value) < end + 8:
            return None
        want = xxhash.xxh3_64_intdigest(memoryview(value)[:end], self.hdr_seed(key))
        if _U64.unpack_from(value, end)[0] != want:
            return None
        data_off = end + 8
        if len(value) != data_off + (length if inline else 0):
            return None
        sums = struct.unpack_from(f"<{n}Q", value, FIXED.size)
        return Header(ps, n, length, version, sums, inline, data_off)


class Filler:
    """Copies byte ranges into a caller tensor in place: memmove into its contiguous runs, or through one
    staging buffer (many tiny runs, or device memory) and a final ``copy_``."""

    __slots__ = ("dest", "staging", "starts", "runs")

    def __init__(self, dest: torch.Tensor) -> None:
        self.dest = dest
        self.staging: torch.Tensor | None = None
        runs = tensor_runs(dest, MAX_RUNS) if dest.device.type == "cpu" else None
        if runs is None:
            self.staging = torch.empty(nbytes_of(dest), dtype=torch.uint8)
            runs = [(self.staging.data_ptr(), nbytes_of(dest))] if nbytes_of(dest) else []
        self.runs = runs
        starts = []
        pos = 0
        for _a, n in runs:
            starts.append(pos)
            pos += n
        self.starts = starts

    def put(self, pos: int, src: int, length: int) -> None:
        """Copy ``length`` bytes at address ``src`` to bytes ``[pos, pos+length)`` of the destination."""
        i = bisect.bisect_right(self.starts, pos) - 1
        while length > 0:
            addr, n = self.runs[i]
            skip = pos - self.starts[i]
            k = min(n - skip, length)
            ctypes.memmove(addr + skip, src, k)
            src += k
            pos += k
            length -= k
            i += 1

    def finish(self) -> None:
        if self.staging is not None and self.staging.numel():
            d = self.dest
            d.copy_(self.staging.view(d.dtype).view(d.shape))
        self.staging = None


def seconds(spec: BackendSpec, name: str, default: float | None, *, zero: bool = False) -> float | None:
    """Option ``name`` of ``spec`` in seconds (``2``, ``2s``, ``500ms``); ``default`` when absent. Positive
    (or zero, with ``zero``) and finite, else :class:`~kvpool.ConfigError`."""
    if name not in spec.params:
        return default
    text = spec.params[name]
    raw = text.strip().lower()
    scale = 1.0
    if raw.endswith("ms"):
        raw, scale = raw[:-2], 1e-3
    elif raw.endswith("s"):
        raw = raw[:-1]
    try:
        v = float(raw) * scale
    except ValueError:
        raise ConfigError(f"{spec.text}: {name} must be a number of seconds, got {text!r}") from None
    if not ((v > 0 or (zero and v == 0)) and math.isfinite(v)):
        raise ConfigError(f"{spec.text}: {name} must be a positive number of seconds, got {text!r}")
    return v
