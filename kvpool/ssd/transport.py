"""Block transports under the SSD object store: what the store needs from a device, and nothing more.

The object store (:mod:`kvpool.ssd.store`: superblock, journal, checkpoints, extents, checksums, recovery)
addresses the device by byte offset and moves bytes with :class:`~kvpool.ssd.ops.Op` values. It reaches the
device only through a :class:`BlockTransport`; it never imports an engine. Two implementations:

- :class:`~kvpool.ssd.uring_transport.UringTransport`: io_uring with O_DIRECT on a file or raw block device;
  the bounce buffer is registered with the ring (READ_FIXED / WRITE_FIXED).
- :class:`~kvpool.ssd.vhost_store.VhostTransport`: a vhost-user-blk target (SPDK, qemu-storage-daemon) through
  shared-memory virtqueues; every buffer the device touches lies in the region shared with the target.

Contract every transport keeps
------------------------------
- ``submit(ops)`` returns one result per op, in order: bytes moved, or ``-errno``. Transport failures that are
  not per-op results (the target gone, a deadline passed, the ring broken) raise
  :class:`~kvpool.errors.BackendError`; the read path turns those into misses, the write path lets them out.
- Any memory works in an op (the transport stages what its device cannot reach, a bounded copy);
  :meth:`BlockTransport.mem_ok` says whether it goes to the device with no copy, so the store routes only
  that memory there and bounces the rest through :meth:`BlockTransport.alloc` memory.
- Cancellation: a ``submit`` that is cancelled raises only after every op it handed to the device has
  completed (or the device was declared dead and its spans quarantined): the caller's memory is no longer
  touched once the call has left.
- Every request has a deadline where the device can hang (vhost); an io_uring on a local device completes.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs
import torch

from .ops import Op

if TYPE_CHECKING:
    from ..storage.staging import StagingArena

__all__ = ["BlockTransport", "DeviceBuffer"]


@attrs.frozen(slots=True)
class DeviceBuffer:
    """Memory the device can reach directly (bounce buffers, metadata staging).

    Attributes
    ----------
    addr
        Address of the first byte (page-aligned).
    nbytes
        Length in bytes.
    tensor
        ``uint8`` view of the memory.
    handle
        What the transport needs to free it (opaque to the store).
    """

    addr: int
    nbytes: int
    tensor: torch.Tensor = attrs.field(repr=False, eq=False)
    handle: Any = attrs.field(repr=False, eq=False, default=None)


class BlockTransport(abc.ABC):
    """A block device as the SSD object store sees it (see the module docstring for the contract)."""

    #: the device as messages name it (a path or socket)
    name: str

    # --- geometry ------------------------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def capacity_bytes(self) -> int:
        """Bytes the device holds (a file's current size)."""

    @property
    @abc.abstractmethod
    def block_size(self) -> int:
        """Logical block size: offsets and lengths of ops are multiples of it."""

    @property
    @abc.abstractmethod
    def max_request_bytes(self) -> int:
        """Largest request worth issuing (larger ones are split below us, sometimes at a cost)."""

    @property
    @abc.abstractmethod
    def max_segments(self) -> int:
        """Memory segments one request takes before it is split."""

    @property
    @abc.abstractmethod
    def mem_align(self) -> int:
        """Memory alignment for zero-copy I/O (1 where only placement matters, as in a shared region)."""

    @property
    def is_block_device(self) -> bool:
        """True for a device of fixed size (raw block device, vhost target); False for a growable file."""
        return True

    # --- memory --------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def mem_ok(self, addr: int, n: int) -> bool:
        """Whether ``n`` bytes at ``addr`` can go to the device with no copy."""

    @abc.abstractmethod
    def alloc(self, nbytes: int) -> DeviceBuffer:
        """Page-aligned memory the device reaches directly; :class:`MemoryError` when there is none left."""

    @abc.abstractmethod
    def free(self, buf: DeviceBuffer) -> None:
        """Return memory from :meth:`alloc`."""

    @abc.abstractmethod
    def register(self, buf: DeviceBuffer) -> int:
        """Make ``buf`` the target of ``Op.*_fixed`` ops; returns its buffer index."""

    async def attach_memory(self, arena: StagingArena) -> None:  # noqa: B027 (optional: no-copy I/O into it)
        """Let the device reach the pool's staging arena with no copy, from now or once it is populated:
        io_uring registers it as fixed buffers, vhost adds its memfd to the memory table shared with the
        target. Memory in it satisfies :meth:`mem_ok` once the transport can use it; the arena outlives the
        transport (the pool closes its tiers first)."""

    # --- I/O -----------------------------------------------------------------------------------------------
    @abc.abstractmethod
    async def submit(self, ops: Sequence[Op]) -> list[int]:
        """Run ``ops``; per-op results (bytes or ``-errno``) in order. Cancel-safe (module docstring)."""

    async def flush(self) -> int:
        """Make completed writes durable; 0 or ``-errno``."""
        (res,) = await self.submit([Op.fsync()])
        return res

    async def probe(self) -> None:  # noqa: B027  (optional: most transports know their limits at connect)
        """Measure what can only be measured once the device holds readable blocks (memory alignment)."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Wait for in-flight I/O and release everything. Idempotent."""

    def stats(self) -> dict[str, Any]:
        """Transport counters and limits (merged into the store's stats)."""
        return {"mem_align": self.mem_align, "max_request_bytes": self.max_request_bytes}
