"""The remote tiers' object header: packing, verification, and refusal of anything damaged or misplaced."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvpool.remote.format import FIXED, RemoteFormat, hdr_len, part_seed

WIRE = RemoteFormat(b"KVRT", 0x1234)


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=16, max_size=16), st.integers(1, 1 << 36), st.integers(0, 2**64 - 1),
       st.booleans(), st.data())
def test_header_round_trip_and_damage(key: bytes, length: int, version: int, inline: bool, data: st.DataObject) -> None:
    inline = inline and length < 4096  # only small objects travel inside their header's value
    ps = length if inline else data.draw(st.integers(max(1, length // 64), min(length, 2**32 - 1)))
    n = -(-length // ps)
    sums = [data.draw(st.integers(0, 2**64 - 1)) for _ in range(min(n, 4))] + [0] * max(0, n - 4)
    hdr = WIRE.pack_header(key, length, ps, version, sums, inline)
    assert len(hdr) == hdr_len(n)
    value = hdr + (b"\0" * length if inline else b"")
    h = WIRE.parse_header(value, key)
    assert h is not None
    assert (h.part_size, h.nparts, h.length, h.version, list(h.sums), h.data_off) == (
        ps, n, length, version, sums, len(hdr))
    assert sum(h.part_len(p) for p in range(n)) == length
    # every single flipped byte of the header, another key, another tier's magic: not an object
    i = data.draw(st.integers(0, len(hdr) - 1))
    assert WIRE.parse_header(value[:i] + bytes([value[i] ^ 0x80]) + value[i + 1 :], key) is None
    assert WIRE.parse_header(value, bytes([key[0] ^ 1]) + key[1:]) is None
    assert RemoteFormat(b"KVMC", 0x1234).parse_header(value, key) is None
    assert RemoteFormat(b"KVRT", 0x9999).parse_header(value, key) is None
    assert WIRE.parse_header(value[: FIXED.size - 1], key) is None
    assert WIRE.parse_header(value + b"x", key) is None  # trailing bytes


def test_part_seeds_differ() -> None:
    k = bytes(range(16))
    assert len({part_seed(k, p) for p in range(100)}) == 100
