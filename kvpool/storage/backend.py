"""The backend protocol: a small abstract async object store every tier implements.

A backend stores opaque objects under 16-byte keys and reads byte ranges of them straight into memory the
caller owns. Buffers are torch tensors of any dtype, shape and strides (CPU, or device memory where the
backend's capabilities say so); an object's bytes are the row-major bytes of the tensor written, so a strided
view of the caller's KV (``kv[:, :, t0:t1]``) is written and read in place, with no packing copy.

The core is six coroutines -- :meth:`write`, :meth:`read_into`, :meth:`delete`, :meth:`contains`,
:meth:`keys`, plus :meth:`open`/:meth:`close` -- and a frozen :class:`Capabilities`. Batch forms
(:meth:`write_many`, :meth:`read_many`, :meth:`contains_many`) default to running the single forms
concurrently; fast backends override them with one submission.

Rules every backend keeps (``kvpool.testing.BackendTests`` checks them):

- ``read_into`` returns ``False`` for a missing, evicted, torn or corrupt object and never fills ``dest`` with
  wrong data that it reports as good; a read fault is a miss, counted, not an exception.
- ``write`` replaces an existing object atomically: a concurrent reader sees the old bytes or the new ones.
- A backend never holds more than its capacity; when full it evicts by its policy, and an object that
  cannot fit raises :class:`~kvpool.CapacityError`.
- The caller owns ``dest``; a backend never keeps a reference to it after the call returns.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
import torch

from ..errors import PoolClosedError

if TYPE_CHECKING:
    from typing import Self

    from ..config import BackendSpec

__all__ = ["Backend", "Capabilities", "ReadRequest", "nbytes_of", "byte_view"]


@attrs.frozen
class Capabilities:
    """What a backend is, declared once.

    Attributes
    ----------
    persistent
        Objects survive :meth:`Backend.close` and a process crash, and are found again on open.
    device_memory
        Objects live in accelerator memory (reads into CUDA tensors are device copies).
    partial_reads
        ``read_into`` with an offset reads only the bytes asked for (not the whole object).
    remote
        Objects live in another process or machine (shared between pools).
    read_bandwidth, write_bandwidth
        Bytes per second, measured or hinted; ``None`` when unknown. Placement stripes by these.
    queued_io
        The backend's operations queue on a device or a network (SSD, remote): the pool puts its I/O
        scheduler in front of it. Memory tiers, whose "I/O" is a memcpy on the caller's core, say ``False``.
    """

    persistent: bool = False
    device_memory: bool = False
    partial_reads: bool = True
    remote: bool = False
    read_bandwidth: float | None = None
    write_bandwidth: float | None = None
    queued_io: bool = True


@attrs.frozen(slots=True)
class ReadRequest:
    """One range read: ``dest`` (its nbytes) from ``offset`` of object ``key``."""

    key: bytes
    dest: torch.Tensor
    offset: int = 0


def nbytes_of(t: torch.Tensor) -> int:
    """Bytes a tensor covers in row-major order."""
    return t.numel() * t.element_size()


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor (raises if ``t`` is not contiguous)."""
    return t.reshape(-1).view(torch.uint8)


class Backend(abc.ABC):
    """Base class of every backend. Subclasses implement the abstract coroutines and ``from_spec``.

    Subclasses set :attr:`scheme` (their registry name) and :attr:`capabilities`, and implement
    ``_open``/``_close`` for resource set-up; :meth:`open`/:meth:`close` handle state and idempotence.
    """

    scheme: ClassVar[str] = ""
    capabilities: Capabilities = Capabilities()

    def __init__(self) -> None:
        self._is_open = False

    # --- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: BackendSpec) -> Self:
        """Build an (unopened) backend from a parsed spec string."""
        raise NotImplementedError(f"{cls.__name__} cannot be built from a spec string")

    # --- lifecycle ---------------------------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        return self._is_open

    async def open(self) -> None:
        """Acquire resources (memory, files, connections). Idempotent."""
        if not self._is_open:
            await self._open()
            self._is_open = True

    async def close(self) -> None:
        """Release resources; persistent data stays. Idempotent."""
        if self._is_open:
            self._is_open = False
            await self._close()

    aclose = close

    async def _open(self) -> None:  # noqa: B027 - optional hook
        pass

    async def _close(self) -> None:  # noqa: B027 - optional hook
        pass

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _check_open(self) -> None:
        if not self._is_open:
            raise PoolClosedError(f"{type(self).__name__} is not open")

    # --- the core ----------------------------------------------------------------------------------------
    @abc.abstractmethod
    async def write(self, key: bytes, src: torch.Tensor) -> None:
        """Store the row-major bytes of ``src`` under ``key``, replacing any object there."""

    @abc.abstractmethod
    async def read_into(self, key: bytes, dest: torch.Tensor, offset: int = 0) -> bool:
        """Fill ``dest`` with the object's bytes ``[offset, offset + nbytes(dest))``.

        Returns ``False`` (and leaves ``dest`` unspecified) if the object is missing or fails verification.
        Raises ``ValueError`` if the range lies outside an object that exists.
        """

    @abc.abstractmethod
    async def delete(self, key: bytes) -> bool:
        """Remove an object; returns whether it was there."""

    @abc.abstractmethod
    async def contains(self, key: bytes) -> bool:
        """Whether an object is stored under ``key``."""

    @abc.abstractmethod
    def keys(self) -> AsyncIterator[bytes]:
        """Every stored key (used to rebuild indexes after a restart)."""

    # --- sizes -------------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int | None:
        """Byte bound of this backend, ``None`` if it has none of its own (a server's memory limit)."""
        return None

    @property
    def used_bytes(self) -> int:
        """Bytes currently allocated to objects."""
        return 0

    async def object_size(self, key: bytes) -> int | None:
        """Size of a stored object in bytes, ``None`` if absent. Backends override with a cheap lookup."""
        return None

    # --- batch forms with concurrent defaults ------------------------------------------------------------
    async def write_many(self, items: Sequence[tuple[bytes, torch.Tensor]]) -> None:
        """Write several objects; the default runs :meth:`write` concurrently."""
        if items:
            await asyncio.gather(*(self.write(k, s) for k, s in items))

    async def read_many(self, requests: Sequence[ReadRequest]) -> list[bool]:
        """Serve several range reads; the default runs :meth:`read_into` concurrently."""
        if not requests:
            return []
        return list(await asyncio.gather(*(self.read_into(r.key, r.dest, r.offset) for r in requests)))

    async def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        """Membership of several keys; the default runs :meth:`contains` concurrently."""
        if not keys:
            return []
        return list(await asyncio.gather(*(self.contains(k) for k in keys)))

    # --- observability -----------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters of this backend (objects, bytes, hits, misses, corrupt reads...)."""
        return {"scheme": self.scheme, "capacity": self.capacity, "used_bytes": self.used_bytes}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {'open' if self._is_open else 'closed'}>"
