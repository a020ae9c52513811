"""The native engine's operations as typed values (one place builds what :mod:`kvpool._uring` parses).

The ring takes tuples ``(kind, user_data, file_index, file_offset, buffer)`` where buffer is
``("fixed", buf_index, buf_offset, length)``, ``("iov", [(address, length), ...])`` or ``None`` (fsync).
Code above the engine builds :class:`Op` values instead; :meth:`Op.encode` makes the tuple, with the
user_data the engine assigns.
"""

from __future__ import annotations

import enum
from typing import Any

import attrs

import kvpool._uring as _uring  # noqa: PLR0402

__all__ = ["Kind", "Op", "RawOp"]

#: (kind, user_data, file_index, file_offset, buffer-spec): what the native ring parses
RawOp = tuple[int, int, int, int, Any]


class Kind(enum.IntEnum):
    READ = int(_uring.OP_READ)
    WRITE = int(_uring.OP_WRITE)
    FSYNC = int(_uring.OP_FSYNC)


@attrs.frozen(slots=True)
class Op:
    """One I/O: a read or write of ``file_offset`` through a registered buffer slice (``fixed``) or a list
    of ``(address, length)`` segments (``iov``), or an fdatasync. Build with the class methods."""

    kind: Kind
    file_offset: int = 0
    fixed: tuple[int, int, int] | None = None  # (buf_index, buf_offset, length)
    iov: tuple[tuple[int, int], ...] | None = None
    file_index: int = 0

    @classmethod
    def read_fixed(cls, file_offset: int, buf_index: int, buf_offset: int, length: int) -> Op:
        return cls(Kind.READ, file_offset, fixed=(buf_index, buf_offset, length))

    @classmethod
    def write_fixed(cls, file_offset: int, buf_index: int, buf_offset: int, length: int) -> Op:
        return cls(Kind.WRITE, file_offset, fixed=(buf_index, buf_offset, length))

    @classmethod
    def read_iov(cls, file_offset: int, segments: list[tuple[int, int]] | tuple[tuple[int, int], ...]) -> Op:
        return cls(Kind.READ, file_offset, iov=tuple(segments))

    @classmethod
    def write_iov(cls, file_offset: int, segments: list[tuple[int, int]] | tuple[tuple[int, int], ...]) -> Op:
        return cls(Kind.WRITE, file_offset, iov=tuple(segments))

    @classmethod
    def fsync(cls) -> Op:
        return cls(Kind.FSYNC)

    @property
    def nbytes(self) -> int:
        """Bytes the op moves when it completes in full (0 for fsync)."""
        if self.fixed is not None:
            return self.fixed[2]
        if self.iov is not None:
            return sum(n for _, n in self.iov)
        return 0

    def encode(self, user_data: int = 0) -> RawOp:
        if self.fixed is not None:
            spec: Any = ("fixed", *self.fixed)
        elif self.iov is not None:
            spec = ("iov", list(self.iov))
        else:
            spec = None
        return (int(self.kind), user_data, self.file_index, self.file_offset, spec)
