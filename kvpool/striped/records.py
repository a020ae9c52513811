"""The striped tier's on-device records: one 512-byte record per object (which child holds which piece), the
keys of records and pieces, and their packing. Pure: no I/O."""

from __future__ import annotations

import struct

import attrs
import blake3
import xxhash

__all__ = ["MAX_CHILDREN", "META_MAGIC", "META_NBYTES", "StripedObject", "meta_key", "pack_record", "piece_key",
           "unpack_record"]

META_MAGIC = b"KVSTRIP1"  # also the first 8 bytes of every record's key
META_NBYTES = 512
_META_VERSION = 1
_HEAD = struct.Struct("<8sHH16sQQ")  # magic, version, npieces, key, seq, length
_PIECE = struct.Struct("<HQ")  # child index, bytes
_CRC = struct.Struct("<Q")
MAX_CHILDREN = 32


@attrs.define(eq=False)
class StripedObject:
    """One stored object: where its pieces are. ``pieces``: (child, start, size), in byte order."""

    key: bytes
    seq: int
    length: int
    pieces: tuple[tuple[int, int, int], ...]
    readers: int = 0
    dead: bool = False
    freed: bool = False

    @property
    def meta_child(self) -> int:
        return self.pieces[0][0]


def piece_key(key: bytes, seq: int, child: int) -> bytes:
    k = blake3.blake3(b"kvpool-striped-piece\0" + key + seq.to_bytes(8, "little") + child.to_bytes(2, "little"))
    d = k.digest(length=16)
    if d[:8] == META_MAGIC:  # never mistaken for a record
        d = bytes([d[0] ^ 0xFF]) + d[1:]
    return d


def meta_key(key: bytes, seq: int) -> bytes:
    return META_MAGIC + blake3.blake3(b"kvpool-striped-meta\0" + key + seq.to_bytes(8, "little")).digest(length=8)


def pack_record(obj: StripedObject) -> bytes:
    body = _HEAD.pack(META_MAGIC, _META_VERSION, len(obj.pieces), obj.key, obj.seq, obj.length) + b"".join(
        _PIECE.pack(c, n) for c, _s, n in obj.pieces
    )
    body += b"\0" * (META_NBYTES - _CRC.size - len(body))
    return body + _CRC.pack(xxhash.xxh3_64_intdigest(body))


def unpack_record(data: bytes, nchildren: int) -> StripedObject | None:
    if len(data) != META_NBYTES:
        return None
    body, (crc,) = data[: -_CRC.size], _CRC.unpack(data[-_CRC.size :])
    if xxhash.xxh3_64_intdigest(body) != crc:
        return None
    magic, version, npieces, key, seq, length = _HEAD.unpack_from(body)
    if magic != META_MAGIC or version != _META_VERSION or not 0 < npieces <= MAX_CHILDREN:
        return None
    pieces: list[tuple[int, int, int]] = []
    pos, start = _HEAD.size, 0
    for _ in range(npieces):
        c, n = _PIECE.unpack_from(body, pos)
        pos += _PIECE.size
        if c >= nchildren or n <= 0 or any(c == p[0] for p in pieces):
            return None
        pieces.append((c, start, n))
        start += n
    if start != length:
        return None
    return StripedObject(key, seq, length, tuple(pieces))
