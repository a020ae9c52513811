"""On-disk format of the ``uring://`` tier: superblock, checkpoints, journal, extents. Pure (no I/O).

    [0, 4K)                superblock: magic, version, region offsets, format uuid, crc
    [ckpt_a], [ckpt_b]     two checkpoint slots: a full snapshot of the index, the newer valid one wins
    [journal]              4 KiB blocks of PUT/DEL records (epoch, seq, crc each), appended after data
    [data]                 object extents, 4 KiB aligned, managed by an ExtentAllocator

Commit protocol: an object's data is written (O_DIRECT) *before* the journal block that names it, and a put
returns only after that block is written. A crash mid-write leaves data that no record names: invisible.
Each object carries per-part xxh3-64 checksums seeded with its key, verified on every read, so a torn,
stale or misplaced extent reads as a miss, never as data. Replay applies records in sequence order and a
PUT supersedes any live extent it overlaps (space reused after a delete whose record was lost).

Format binding. Each format draws a random 128-bit uuid, written into the superblock and into every
checkpoint header; a checkpoint of another uuid is ignored. The journal is bound through the checkpoint's
epoch (62 random bits per format). So a crash right after a reformat can never bring back the previous
format's checkpoint or journal, whichever slot it sits in.

Version 2 added the uuid; a version-1 pool is recognised (and refused with a message saying how to
reformat it), never silently reformatted.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import attrs
import xxhash

BLOCK = 4096
MAGIC_SB = b"KVPOOLU1"
MAGIC_CP = b"KVCP"
MAGIC_JB = b"KVJB"
VERSION = 2
MAX_PARTS = 128
MIN_PART = 64 * 1024

_SB_HEAD = struct.Struct("<8sI")  # magic, version: readable in every version
# magic, version, total, ckpt_a, ckpt_b, ckpt_len, j_off, j_len, d_off, d_len, uuid
_SB = struct.Struct("<8sIQQQQQQQQ16s")
_CP = struct.Struct("<4sQQQQ16s")  # magic, epoch, n_entries, payload_len, payload_crc, format uuid
_JB = struct.Struct("<4sQQHQ")  # magic, epoch, seq, used, crc
_ENTRY = struct.Struct("<16sQQIIQ")  # key, offset, length, part_size, nparts, seq
REC_PUT = 1
REC_DEL = 2


def crc(data: bytes | memoryview, seed: int = 0) -> int:
    return xxhash.xxh3_64_intdigest(data, seed)


def key_seed(key: bytes) -> int:
    return int.from_bytes(key[:8], "little")


def align_up(n: int, a: int = BLOCK) -> int:
    return (n + a - 1) // a * a


def part_size_for(length: int) -> int:
    """Checksum granule of an object: <= MAX_PARTS parts, at least MIN_PART, 4 KiB multiples."""
    blocks = -(-length // BLOCK)
    ps = BLOCK * -(-blocks // MAX_PARTS)
    return max(ps, min(MIN_PART, align_up(length)))


@attrs.define(slots=True)
class Entry:
    """One object: its extent in the data region and its per-part checksums."""

    key: bytes
    offset: int  # relative to the data region
    length: int
    part_size: int
    checksums: tuple[int, ...]
    seq: int
    pins: int = 0
    dead: bool = False

    @property
    def nparts(self) -> int:
        return len(self.checksums)

    @property
    def extent(self) -> int:
        return align_up(self.length)

    def pack(self) -> bytes:
        return _ENTRY.pack(self.key, self.offset, self.length, self.part_size, self.nparts, self.seq) + struct.pack(
            f"<{self.nparts}Q", *self.checksums
        )

    @property
    def packed_size(self) -> int:
        return _ENTRY.size + 8 * self.nparts

    @classmethod
    def unpack_from(cls, buf: bytes | memoryview, pos: int) -> tuple[Entry, int]:
        key, off, ln, ps, n, seq = _ENTRY.unpack_from(buf, pos)
        pos += _ENTRY.size
        if n > MAX_PARTS + 1 or ps <= 0:
            raise ValueError("bad entry")
        sums = struct.unpack_from(f"<{n}Q", buf, pos)
        return cls(bytes(key), off, ln, ps, tuple(sums), seq), pos + 8 * n


@attrs.frozen
class Geometry:
    """Where each region of a pool lies, and the uuid of the format that laid it out."""

    total: int
    ckpt_a: int
    ckpt_b: int
    ckpt_len: int
    j_off: int
    j_len: int
    d_off: int
    d_len: int
    uuid: bytes = b"\0" * 16

    @classmethod
    def for_size(cls, total: int, uuid: bytes = b"\0" * 16) -> Geometry:
        total -= total % BLOCK
        ckpt_len = align_up(min(max(total // 128, 64 * 1024), 512 << 20))
        j_len = align_up(min(max(total // 256, 64 * 1024), 128 << 20))
        d_off = BLOCK + 2 * ckpt_len + j_len
        return cls(total, BLOCK, BLOCK + ckpt_len, ckpt_len, BLOCK + 2 * ckpt_len, j_len, d_off, total - d_off,
                   uuid)

    def pack_superblock(self) -> bytes:
        body = _SB.pack(MAGIC_SB, VERSION, self.total, self.ckpt_a, self.ckpt_b, self.ckpt_len, self.j_off,
                        self.j_len, self.d_off, self.d_len, self.uuid)
        blk = body + struct.pack("<Q", crc(body))
        return blk.ljust(BLOCK, b"\0")

    @classmethod
    def unpack_superblock(cls, blk: bytes) -> Geometry | None:
        """The geometry of a valid superblock of this version, else None (see :func:`identify`)."""
        if len(blk) < _SB.size + 8:
            return None
        body = blk[: _SB.size]
        (c,) = struct.unpack_from("<Q", blk, _SB.size)
        if crc(body) != c:
            return None
        magic, ver, *vals = _SB.unpack(body)
        if magic != MAGIC_SB or ver != VERSION:
            return None
        g = cls(*vals)
        if g.d_off + g.d_len != g.total or g.d_len <= 0 or g.ckpt_len <= BLOCK:
            return None
        return g


# Signatures of what else may sit at the start of a disk or file: (offset, bytes, name). Enough to say what
# kvpool refused to overwrite; anything else is "unknown data".
_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (1080, b"\x53\xef", "an ext2/3/4 filesystem"),
    (0, b"XFSB", "an XFS filesystem"),
    (0x10040, b"_BHRfS_M", "a btrfs filesystem"),
    (0, b"LUKS\xba\xbe", "a LUKS encrypted volume"),
    (512, b"EFI PART", "a GPT partition table"),
    (4086, b"SWAPSPACE2", "a swap area"),
    (0, b"hsqs", "a squashfs image"),
    (3, b"NTFS    ", "an NTFS filesystem"),
    (54, b"FAT", "a FAT filesystem"),
    (82, b"FAT32", "a FAT32 filesystem"),
    (0x8001, b"CD001", "an ISO 9660 image"),
    (510, b"\x55\xaa", "an MBR partition table or boot sector"),
)

#: bytes of the start of a device :func:`identify` looks at
SNIFF_BYTES = 0x11000


def identify(head: bytes) -> tuple[str, str]:
    """What the first bytes of a file or device hold: ``(kind, description)``.

    ``kind`` is ``"pool"`` (a valid superblock of this version), ``"old-pool"`` (a valid kvpool superblock of
    another version), ``"damaged-pool"`` (kvpool's magic, but the superblock does not check out),
    ``"zeros"`` or ``"foreign"`` (a known signature, or unknown data).
    """
    if Geometry.unpack_superblock(head) is not None:
        return "pool", "a kvpool pool"
    if head[:8] == MAGIC_SB or head[:7] == MAGIC_SB[:7]:
        magic, ver = _SB_HEAD.unpack_from(head, 0)
        if magic == MAGIC_SB and ver != VERSION and ver in (1,):
            return "old-pool", f"a kvpool pool of format version {ver} (this kvpool reads version {VERSION})"
        return "damaged-pool", "a kvpool pool whose superblock is damaged"
    if not any(head[:BLOCK]) and not any(head):
        return "zeros", "zeros"
    for off, sig, name in _SIGNATURES:
        if head[off : off + len(sig)] == sig:
            return "foreign", name
    return "foreign", "unknown data"


def pack_checkpoint(epoch: int, entries: list[Entry], uuid: bytes = b"\0" * 16) -> bytes:
    payload = b"".join(e.pack() for e in entries)
    head = _CP.pack(MAGIC_CP, epoch, len(entries), len(payload), crc(payload), uuid)
    head += struct.pack("<Q", crc(head))
    return (head.ljust(BLOCK, b"\0") + payload).ljust(align_up(BLOCK + len(payload)), b"\0")


def checkpoint_header(blk: bytes | memoryview, uuid: bytes | None = None) -> tuple[int, int, int, int] | None:
    """(epoch, n_entries, payload_len, payload_crc) of a valid checkpoint header of format ``uuid``, else
    None (a checkpoint another format left behind is not ours). Pass the superblock's uuid; ``None`` accepts
    any format's checkpoint (only for tools that show what is on disk)."""
    head = bytes(blk[: _CP.size])
    (c,) = struct.unpack_from("<Q", blk, _CP.size)
    if crc(head) != c:
        return None
    magic, epoch, n, plen, pcrc, cp_uuid = _CP.unpack(head)
    if magic != MAGIC_CP or (uuid is not None and cp_uuid != uuid):
        return None
    return epoch, n, plen, pcrc


def unpack_checkpoint_entries(payload: bytes | memoryview, n: int) -> list[Entry]:
    out, pos = [], 0
    for _ in range(n):
        e, pos = Entry.unpack_from(payload, pos)
        out.append(e)
    return out


def pack_journal_block(epoch: int, seq: int, records: bytes) -> bytes:
    if len(records) > BLOCK - _JB.size:
        raise ValueError("journal block overflow")
    body = records.ljust(BLOCK - _JB.size, b"\0")
    head0 = _JB.pack(MAGIC_JB, epoch, seq, len(records), 0)
    c = crc(head0 + body)
    return _JB.pack(MAGIC_JB, epoch, seq, len(records), c) + body


JOURNAL_PAYLOAD = BLOCK - _JB.size


def parse_journal_block(blk: bytes | memoryview, epoch: int) -> tuple[int, list[tuple[int, Entry | bytes]]] | None:
    """(seq, records) of a valid block of ``epoch``; records are (REC_PUT, Entry) or (REC_DEL, key)."""
    magic, ep, seq, used, c = _JB.unpack_from(blk, 0)
    if magic != MAGIC_JB or ep != epoch or used > JOURNAL_PAYLOAD:
        return None
    head0 = _JB.pack(MAGIC_JB, ep, seq, used, 0)
    if crc(head0 + bytes(blk[_JB.size :])) != c:
        return None
    recs: list[tuple[int, Entry | bytes]] = []
    pos, end = _JB.size, _JB.size + used
    while pos < end:
        kind = blk[pos]
        pos += 1
        if kind == REC_PUT:
            e, pos = Entry.unpack_from(blk, pos)
            recs.append((REC_PUT, e))
        elif kind == REC_DEL:
            recs.append((REC_DEL, bytes(blk[pos : pos + 16])))
            pos += 16
        else:
            return None
    return seq, recs


def put_record(e: Entry) -> bytes:
    return bytes([REC_PUT]) + e.pack()


def del_record(key: bytes) -> bytes:
    return bytes([REC_DEL]) + key


def parts_covering(e: Entry, start: int, stop: int) -> range:
    return range(start // e.part_size, -(-stop // e.part_size))


def iter_parts(e: Entry) -> Iterator[tuple[int, int, int]]:
    """(index, offset, length) of each part of an object."""
    for i in range(e.nparts):
        off = i * e.part_size
        yield i, off, min(e.part_size, e.length - off)
