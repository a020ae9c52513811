"""Configuration values: backend spec strings and pool options.

A backend spec is a URL whose scheme names the backend and whose query holds its options::

    dram://?capacity=8GiB
    uring:///mnt/nvme/kv.pool?capacity=100GiB
    uring:///dev/nvme1n1
    redis://127.0.0.1:6379/0
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import attrs

from .errors import ConfigError
from .units import parse_bandwidth, parse_size

__all__ = ["BackendSpec", "PoolConfig"]


@attrs.frozen
class BackendSpec:
    """A parsed backend spec string.

    Attributes
    ----------
    scheme
        The backend's registered name (``dram``, ``uring``...).
    location
        Everything between ``scheme://`` and ``?``: a path for local backends, ``host:port/db`` for remote ones.
    params
        The query options, as strings.
    text
        The original spec, for messages.
    """

    scheme: str
    location: str
    params: Mapping[str, str] = attrs.field(factory=dict)
    text: str = ""

    @classmethod
    def parse(cls, text: str) -> BackendSpec:
        if not isinstance(text, str) or "://" not in text:
            raise ConfigError(f"backend spec {text!r} is not of the form 'scheme://location?option=value'")
        parts = urlsplit(text)
        scheme = parts.scheme.lower()
        if not scheme:
            raise ConfigError(f"backend spec {text!r} has no scheme")
        location = parts.netloc + parts.path
        try:
            pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
        except ValueError as exc:
            raise ConfigError(f"backend spec {text!r}: bad query string: {exc}") from None
        params: dict[str, str] = {}
        for k, v in pairs:
            if k in params:
                raise ConfigError(f"backend spec {text!r}: option {k!r} given twice")
            params[k] = v
        return cls(scheme=scheme, location=location, params=params, text=text)

    # typed accessors that say which spec was wrong
    def size(self, name: str, default: int | None = None) -> int | None:
        if name not in self.params:
            return default
        return parse_size(self.params[name], what=f"{self.text}: {name}")

    def bandwidth(self, name: str) -> float | None:
        if name not in self.params:
            return None
        return parse_bandwidth(self.params[name], what=f"{self.text}: {name}")

    def integer(self, name: str, default: int) -> int:
        if name not in self.params:
            return default
        try:
            return int(self.params[name])
        except ValueError:
            raise ConfigError(f"{self.text}: {name} must be an integer, got {self.params[name]!r}") from None

    def flag(self, name: str, default: bool = False) -> bool:
        if name not in self.params:
            return default
        v = self.params[name].lower()
        if v in ("1", "true", "yes", "on", ""):
            return True
        if v in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{self.text}: {name} must be a boolean, got {self.params[name]!r}")

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        v = self.params.get(name, default)
        if v not in choices:
            raise ConfigError(f"{self.text}: {name} must be one of {', '.join(choices)}, got {v!r}")
        return v

    def check_known(self, known: tuple[str, ...]) -> None:
        """Reject options the backend does not understand (a typo must not be silently ignored)."""
        unknown = sorted(set(self.params) - set(known))
        if unknown:
            raise ConfigError(
                f"{self.text}: unknown option(s) {', '.join(unknown)}; {self.scheme}:// takes {', '.join(known)}"
            )


def _write_policy(_i: Any, _a: Any, v: str) -> None:
    if v not in ("write-through", "write-back"):
        raise ConfigError(f"write_policy must be 'write-through' or 'write-back', got {v!r}")


def _positive(_i: Any, a: Any, v: int) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ConfigError(f"{a.name} must be a positive number of bytes, got {v!r}")


@attrs.frozen
class PoolConfig:
    """Pool-wide options (everything but the layout and the backends).

    Attributes
    ----------
    namespace
        Salt mixed into every key (tenant, LoRA adapter...).
    write_policy
        ``write-through``: a put writes every tier before it returns (durable on the persistent ones);
        ``write-back``: a put returns once the first tier has it, lower tiers are written in the background.
    promote_on_hit
        Copy what a restore found in a lower tier into the tiers above it.
    io_max_inflight, io_max_inflight_bytes, io_background_inflight, io_op_bytes
        Per-tier I/O scheduler: operations and bytes in flight, how many of them may be background work (prefetch,
        promotion, write-back), and the size batches are cut into (see :mod:`kvpool.pool.scheduler`).
    staging_bytes
        The pool's own host memory (:class:`~kvpool.storage.staging.StagingArena`): allocated and populated
        (huge pages where the kernel gives them) right after open, page-locked once when CUDA is present, and
        reused for the tensors :meth:`KVPool.get`/:meth:`KVPool.stream` return, :meth:`KVPool.empty`, and
        promotion/write-back copies, so no request pays first-touch page faults. ``None`` (default): 16 chunks
        of the layout, at least 64 MiB and at most 1 GiB. Size it to the bytes of results callers hold at once.
    staging_wait_s
        How long a request waits for staging memory that other callers still hold before it is served from
        fresh memory instead (counted as ``staging_fallbacks``; a deadlock guard for callers that hold results
        while they ask for more).
    promotion
        Admission for those copies: ``second-hit`` (default) promotes a chunk the second time it is read
        from below within a recent window, so a one-off scan does not flood the fast tier; ``always``.
    """

    namespace: str = ""
    write_policy: str = attrs.field(default="write-through", validator=_write_policy)
    promote_on_hit: bool = True
    staging_bytes: int | None = attrs.field(default=None, validator=attrs.validators.optional(_positive))
    staging_wait_s: float = 1.0
    io_max_inflight: int = 32
    io_max_inflight_bytes: int = 256 << 20
    io_background_inflight: int = 1
    io_op_bytes: int = 64 << 20
    promotion: str = attrs.field(default="second-hit", validator=attrs.validators.in_(("second-hit", "always")))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PoolConfig:
        known = {f.name for f in attrs.fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ConfigError(f"unknown pool option(s): {', '.join(bad)}; known: {', '.join(sorted(known))}")
        return cls(**d)
