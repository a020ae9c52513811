"""Byte sizes and bandwidths written the way people write them ("8GiB", "3GB/s")."""

from __future__ import annotations

import re

from .errors import ConfigError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: str | int, *, what: str = "size") -> int:
    """Parse ``"64MiB"``, ``"8GiB"``, ``"1.5GB"`` or a plain byte count into bytes.

    Raises
    ------
    ConfigError
        If the text is not a non-negative size.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{what}: must not be negative, got {value}")
        return value
    m = _SIZE_RE.match(str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(
            f"{what}: cannot parse {value!r}; write bytes or a number with KiB/MiB/GiB/TiB (or KB/MB/GB/TB)"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_bandwidth(value: str | float, *, what: str = "bandwidth") -> float:
    """Parse ``"3GB/s"`` or ``"600MiB/s"`` (or a number of bytes per second)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ConfigError(f"{what}: must be positive, got {value}")
        return float(value)
    text = str(value).strip()
    if text.lower().endswith("/s"):
        text = text[:-2]
    bw = float(parse_size(text, what=what))
    if bw <= 0:
        raise ConfigError(f"{what}: must be positive, got {value!r}")
    return bw


def format_size(nbytes: float) -> str:
    """Format a byte count with a binary unit, e.g. ``32.0 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024:
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"
