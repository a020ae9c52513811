"""A read-only view of a ``uring://`` pool file or device, for ``kvpool inspect`` and ``kvpool fsck``.

It never writes, never locks and never formats: it opens the path ``O_RDONLY`` and parses the on-disk format
(:mod:`kvpool.ssd.format`) the way recovery does -- the newer valid checkpoint, then that epoch's journal in
sequence order, newest object first where extents overlap -- so it sees what a pool opened now would see,
and it works while another process holds the pool open (what it reads is then a consistent-enough snapshot:
an object being written at that moment is either not yet named by the journal, or complete).

Reads use ``O_DIRECT`` where the filesystem allows it, so a pool another process writes with ``O_DIRECT`` is
not seen through stale page-cache pages.
"""

from __future__ import annotations

import mmap
import os
import stat
from collections.abc import Iterator

import attrs
import xxhash

from ..errors import ConfigError
from ..ssd import format as fmt
from ..units import format_size

__all__ = ["BadObject", "PoolReader"]


@attrs.frozen
class BadObject:
    """One object that fails verification: its key, where it lies and what failed."""

    key: bytes
    offset: int  # absolute byte offset of the object in the file or device
    length: int
    problem: str


def _part_seed(key: bytes, part: int) -> int:
    # the seed the store uses for part ``part`` of ``key`` (kvpool/ssd/store.py _part_seed)
    return (fmt.key_seed(key) + part * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF


class PoolReader:
    """Parse a pool without touching it. Use as a context manager.

    Raises
    ------
    ConfigError
        If the path does not exist, is not a file or block device, or holds no kvpool pool (the message says
        what is there).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise ConfigError(f"{path} does not exist") from None
        except PermissionError:
            raise ConfigError(f"{path}: permission denied") from None
        self.is_block_device = stat.S_ISBLK(st.st_mode)
        if not (self.is_block_device or stat.S_ISREG(st.st_mode)):
            raise ConfigError(f"{path} is neither a pool file nor a block device")
        try:
            try:
                self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_DIRECT", 0))
                self.direct = True
            except PermissionError:
                raise
            except OSError:  # EINVAL: no O_DIRECT on this filesystem; buffered reads are still right
                self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                self.direct = False
        except PermissionError:
            raise ConfigError(f"{path}: permission denied (try sudo for a block device)") from None
        self.size = os.lseek(self._fd, 0, os.SEEK_END)
        sb = self._read(0, fmt.BLOCK) if self.size else b""
        geo = fmt.Geometry.unpack_superblock(sb) if len(sb) == fmt.BLOCK else None
        if geo is None:
            self.close()
            if not sb.strip(b"\0"):
                what = "empty" if not self.size else "its first block is all zeros"
            else:
                what = f"starts with {sb[:12]!r}"
            if self.size < fmt.BLOCK:
                what += f", only {self.size} bytes"
            if sb[:8] == fmt.MAGIC_SB:
                what = "a kvpool superblock that is damaged or of another format version"
            raise ConfigError(f"{path} is not a kvpool pool ({what})")
        self.geometry: fmt.Geometry = geo
        self.version = fmt.VERSION
        self.journal_keys: set[bytes] = set()  # objects written since the last checkpoint
        self.epoch, self.entries, self.dropped = self._replay()

    # --- I/O ---------------------------------------------------------------------------------------------
    def _read(self, offset: int, n: int) -> bytes:
        """``n`` bytes at ``offset`` (both rounded out to blocks for O_DIRECT, then trimmed)."""
        start = offset - offset % fmt.BLOCK
        end = fmt.align_up(offset + n)
        buf = mmap.mmap(-1, max(end - start, fmt.BLOCK))  # page-aligned, as O_DIRECT needs
        try:
            got = os.preadv(self._fd, [buf], start)
            return bytes(buf[offset - start : min(offset - start + n, got)])
        finally:
            buf.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> PoolReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- what recovery would see ------------------------------------------------------------------------
    def _replay(self) -> tuple[int | None, list[fmt.Entry], int]:
        geo = self.geometry
        best: tuple[int, list[fmt.Entry]] | None = None
        for slot in (geo.ckpt_a, geo.ckpt_b):
            h = fmt.checkpoint_header(self._read(slot, fmt.BLOCK))
            if h is None:
                continue
            epoch, n, plen, pcrc = h
            if plen > geo.ckpt_len - fmt.BLOCK:
                continue
            payload = self._read(slot + fmt.BLOCK, plen) if plen else b""
            if fmt.crc(payload) != pcrc:
                continue
            try:
                entries = fmt.unpack_checkpoint_entries(payload, n)
            except Exception:  # noqa: BLE001 - a damaged slot is skipped, as recovery does
                continue
            if best is None or epoch > best[0]:
                best = (epoch, entries)
        if best is None:
            return None, [], 0
        epoch, entries = best
        live = {e.key: e for e in entries}
        journal = memoryview(self._read(geo.j_off, geo.j_len))
        blocks = []
        for pos in range(len(journal) // fmt.BLOCK):
            parsed = fmt.parse_journal_block(journal[pos * fmt.BLOCK : (pos + 1) * fmt.BLOCK], epoch)
            if parsed is not None:
                blocks.append(parsed)
        for _seq, recs in sorted(blocks, key=lambda b: b[0]):
            for kind, rec in recs:
                if kind == fmt.REC_PUT and isinstance(rec, fmt.Entry):
                    live[rec.key] = rec
                    self.journal_keys.add(rec.key)
                elif isinstance(rec, bytes):
                    live.pop(rec, None)
                    self.journal_keys.discard(rec)
        kept: list[fmt.Entry] = []
        taken: list[tuple[int, int]] = []  # extents of newer objects, to drop older ones they overlap
        dropped = 0
        for e in sorted(live.values(), key=lambda e: e.seq, reverse=True):
            bad_shape = e.length <= 0 or e.part_size <= 0 or len(e.checksums) != -(-e.length // e.part_size)
            end = e.offset + e.extent
            if bad_shape or end > geo.d_len or any(a < end and e.offset < b for a, b in taken):
                dropped += 1
                continue
            taken.append((e.offset, end))
            kept.append(e)
        kept.sort(key=lambda e: e.seq)
        return epoch, kept, dropped

    # --- summaries ---------------------------------------------------------------------------------------
    @property
    def used_bytes(self) -> int:
        return sum(e.extent for e in self.entries)

    def free_extents(self) -> list[int]:
        """Sizes of the gaps between objects in the data region."""
        gaps, pos = [], 0
        for e in sorted(self.entries, key=lambda e: e.offset):
            if e.offset > pos:
                gaps.append(e.offset - pos)
            pos = max(pos, e.offset + e.extent)
        if pos < self.geometry.d_len:
            gaps.append(self.geometry.d_len - pos)
        return gaps

    def fragmentation(self) -> float:
        """1 - largest free extent / free bytes: 0 when free space is one piece."""
        gaps = self.free_extents()
        free = sum(gaps)
        return 1.0 - max(gaps) / free if free else 0.0

    def verify(self) -> Iterator[tuple[fmt.Entry, BadObject | None]]:
        """Read every object and check each part's checksum; yield ``(entry, None)`` or ``(entry, bad)``."""
        d_off = self.geometry.d_off
        for e in self.entries:
            data = self._read(d_off + e.offset, e.length)
            if len(data) < e.length:
                yield e, BadObject(e.key, d_off + e.offset, e.length,
                                   f"short read: {len(data)} of {e.length} bytes (file truncated?)")
                continue
            bad: BadObject | None = None
            for i, off, n in fmt.iter_parts(e):
                if xxhash.xxh3_64_intdigest(data[off : off + n], _part_seed(e.key, i)) != e.checksums[i]:
                    bad = BadObject(e.key, d_off + e.offset + off, n,
                                    f"checksum mismatch, part {i + 1}/{e.nparts} ({format_size(n)})")
                    break
            yield e, bad
