"""The SSD tier's on-disk format: superblock, checkpoints, journal blocks, entries; corrupt input is None."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpool.ssd import format as fmt

entries = st.builds(
    lambda key, off, ln, seq, sums: fmt.Entry(key, off * fmt.BLOCK, ln, fmt.part_size_for(ln), tuple(sums), seq),
    st.binary(min_size=16, max_size=16),
    st.integers(0, 1 << 30),
    st.integers(1, 1 << 34),
    st.integers(0, 1 << 60),
    st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=8),
)


def _flip(b: bytes, i: int) -> bytes:
    return b[:i] + bytes([b[i] ^ 0x01]) + b[i + 1 :]


@settings(max_examples=100, deadline=None)
@given(entries)
def test_entry_round_trip(e: fmt.Entry) -> None:
    packed = e.pack()
    assert len(packed) == e.packed_size
    back, pos = fmt.Entry.unpack_from(b"xx" + packed, 2)
    assert pos == 2 + len(packed)
    assert (back.key, back.offset, back.length, back.part_size, back.checksums, back.seq) == (
        e.key, e.offset, e.length, e.part_size, e.checksums, e.seq)


def test_entry_with_absurd_part_count_is_refused() -> None:
    e = fmt.Entry(b"k" * 16, 0, 10, 4096, (1,), 1)
    bad = bytearray(e.pack())
    bad[16 + 8 + 8 + 4 : 16 + 8 + 8 + 8] = (fmt.MAX_PARTS + 5).to_bytes(4, "little")
    with pytest.raises(ValueError):
        fmt.Entry.unpack_from(bytes(bad) + b"\0" * 8 * 200, 0)


@settings(max_examples=40, deadline=None)
@given(st.lists(entries, max_size=20), st.integers(0, 1 << 40), st.binary(min_size=16, max_size=16))
def test_checkpoint_round_trip_and_corruption(es: list[fmt.Entry], epoch: int, uuid: bytes) -> None:
    blob = fmt.pack_checkpoint(epoch, es, uuid)
    assert len(blob) % fmt.BLOCK == 0
    head = fmt.checkpoint_header(blob[: fmt.BLOCK], uuid)
    assert head is not None
    ep, n, plen, pcrc = head
    assert (ep, n) == (epoch, len(es))
    payload = blob[fmt.BLOCK : fmt.BLOCK + plen]
    assert fmt.crc(payload) == pcrc
    assert [x.pack() for x in fmt.unpack_checkpoint_entries(payload, n)] == [x.pack() for x in es]
    assert fmt.checkpoint_header(_flip(blob, 9), uuid) is None  # a flipped header byte
    other = bytes([uuid[0] ^ 1]) + uuid[1:]
    assert fmt.checkpoint_header(blob, other) is None  # another format's checkpoint is not ours
    assert fmt.checkpoint_header(blob, None) is not None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(entries.map(fmt.put_record), st.binary(min_size=16, max_size=16).map(fmt.del_record)),
                max_size=12),
       st.integers(0, 1 << 40), st.integers(0, 1 << 40), st.data())
def test_journal_block_round_trip_and_corruption(recs: list[bytes], epoch: int, seq: int, data: st.DataObject) -> None:
    body = b"".join(recs)
    if len(body) > fmt.JOURNAL_PAYLOAD:
        with pytest.raises(ValueError):
            fmt.pack_journal_block(epoch, seq, body)
        return
    blk = fmt.pack_journal_block(epoch, seq, body)
    assert len(blk) == fmt.BLOCK
    parsed = fmt.parse_journal_block(blk, epoch)
    assert parsed is not None and parsed[0] == seq and len(parsed[1]) == len(recs)
    for rec, (kind, what) in zip(recs, parsed[1]):
        assert kind == rec[0]
        assert (what.pack() if isinstance(what, fmt.Entry) else what) == rec[1:]
    assert fmt.parse_journal_block(blk, epoch + 1) is None  # a stale epoch's block
    i = data.draw(st.integers(0, fmt.BLOCK - 1))
    assert fmt.parse_journal_block(_flip(blk, i), epoch) is None  # any flipped bit


@given(st.integers(1 << 20, 1 << 44), st.binary(min_size=16, max_size=16))
def test_superblock_round_trip(total: int, uuid: bytes) -> None:
    g = fmt.Geometry.for_size(total, uuid)
    assert g.d_off % fmt.BLOCK == 0 and g.d_off + g.d_len == g.total <= total
    assert g.ckpt_a < g.ckpt_b < g.j_off < g.d_off
    blk = g.pack_superblock()
    assert fmt.Geometry.unpack_superblock(blk) == g
    assert fmt.identify(blk)[0] == "pool"
    assert fmt.Geometry.unpack_superblock(_flip(blk, 20)) is None
    assert fmt.identify(_flip(blk, 20))[0] == "damaged-pool"


def test_identify_refuses_what_is_not_ours() -> None:
    assert fmt.identify(b"\0" * fmt.SNIFF_BYTES)[0] == "zeros"
    assert fmt.identify(os.urandom(fmt.SNIFF_BYTES)) == ("foreign", "unknown data")


@given(st.integers(1, 1 << 36))
def test_part_size_and_parts(length: int) -> None:
    ps = fmt.part_size_for(length)
    assert ps % fmt.BLOCK == 0
    nparts = -(-length // ps)
    assert nparts <= fmt.MAX_PARTS
    e = fmt.Entry(b"k" * 16, 0, length, ps, (0,) * nparts, 0)
    parts = list(fmt.iter_parts(e))
    assert sum(n for _, _, n in parts) == length
    assert all(off == i * ps for i, off, _ in parts)
    assert fmt.parts_covering(e, 0, length) == range(nparts)
    assert fmt.parts_covering(e, length - 1, length) == range(nparts - 1, nparts)
