"""Sizes and bandwidths as people write them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvpool.errors import ConfigError
from kvpool.units import format_size, parse_bandwidth, parse_size


@pytest.mark.parametrize(
    ("text", "n"),
    [("0", 0), ("4096", 4096), ("64MiB", 64 << 20), ("8 GiB", 8 << 30), ("1.5GB", 1_500_000_000), ("2k", 2000),
     ("3kib", 3072), ("1TiB", 1 << 40), (17, 17)],
)
def test_parse_size(text: str | int, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize("bad", ["", "lots", "-1", "1 XB", "1.2.3MB", True, -5])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ConfigError, match="capacity"):
        parse_size(bad, what="capacity")  # type: ignore[arg-type]


def test_parse_bandwidth() -> None:
    assert parse_bandwidth("3GB/s") == 3e9
    assert parse_bandwidth("600MiB/s") == 600 * 2**20
    assert parse_bandwidth(1.5e9) == 1.5e9
    for bad in ("0GB/s", 0, -1.0, "fast"):
        with pytest.raises(ConfigError):
            parse_bandwidth(bad)  # type: ignore[arg-type]


@given(st.integers(0, 1 << 50))
def test_format_size_round_trips_within_rounding(n: int) -> None:
    text = format_size(n)
    value, unit = text.split()
    back = parse_size(f"{value}{'' if unit == 'B' else unit}")
    if unit == "B":
        assert back == n
    else:  # one decimal of a unit >= 1: within 5 % (half a tenth of the unit, the unit <= n)
        assert abs(back - n) <= 0.05 * n
