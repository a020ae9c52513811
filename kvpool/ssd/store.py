"""``uring://PATH?capacity=SIZE`` -- the SSD tier: io_uring, O_DIRECT, no filesystem on the data path.

PATH is a regular file (created and preallocated; ``capacity`` bounds its size) or a raw block device
(no filesystem at all). kvpool manages the space itself (see :mod:`._uring_format` for the on-disk format
and the commit protocol): extents aligned to 4 KiB, free-space reuse, a journal and two checkpoint slots,
no per-object files and no filesystem metadata call on the data path.

The store reaches its device only through a :class:`~kvpool.ssd.transport.BlockTransport`: here
:class:`~kvpool.ssd.uring_transport.UringTransport`; :class:`~kvpool.ssd.vhost_store.VhostBackend`
(``vhost://``) is this same store over a vhost-user-blk target (same on-disk layout).

Data path. A read of an object range becomes one READV straight into the caller's tensor when its memory is
aligned as the device's DIO rule asks (``statx`` STATX_DIOALIGN, else sysfs ``dma_alignment``;
``stats()['mem_align']``) -- the strided chunk view of a ``[L, 2, T, H, D]`` tensor is 2L runs = 2L iovecs,
one SQE; otherwise it goes through registered bounce buffers (READ_FIXED) and one ``copy_``. Every request of a
batch is queued before a single ``io_uring_enter``; completions arrive on the event loop through an eventfd.
Each object carries per-part xxh3 checksums seeded with its key, verified after every read: a mismatch or an
I/O error is a miss (counted), never data.

What opening does with what is at PATH (kvpool never formats what it cannot recognise as its own):

- nothing there, or an empty file: a new pool is formatted (a new file needs ``capacity``);
- a kvpool pool: it is recovered. ``capacity`` may be left out (the pool's own size is used); a different
  ``capacity`` is refused (ConfigError), since reformatting would lose the pool's objects;
- anything else -- a filesystem, a partition table, zeros, unknown bytes, a pool of an older format -- is
  refused with :class:`~kvpool.ssd.errors.NotAPoolError` naming the path and what its first bytes look like;
  a kvpool superblock that does not check out with :class:`~kvpool.ssd.errors.PoolDamagedError`;
- ``?format=1`` (``UringBackend(..., format=True)``) formats PATH when it does not hold a kvpool pool of
  this version -- whatever it holds, destroying it -- and reformats a pool opened with another ``capacity``.
  A valid pool of the requested capacity is still recovered, so the option may stay in a configuration:
  restarts keep the cache. (To empty a pool, delete its keys, or overwrite its first 4 KiB before opening.)

:meth:`UringBackend.open_readonly` (used by ``kvpool inspect``/``fsck``) never writes, locks or formats, and
works on a pool another process holds open. A block device of size 0 (a detached loop device) is reported as
such.
"""

from __future__ import annotations

import asyncio
import errno as errno_mod
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError
from ..storage.backend import Capabilities, ReadRequest, nbytes_of
from ..storage.membership import IndexedMembership
from ..storage.eviction import EvictionPolicy, PolicyHints, make_policy
from . import format as fmt
from .errors import ssd_errors
from .ops import Op
from .read_path import ReadLayer
from ..storage.settle import gather_settled
from .state import BLOCK

if TYPE_CHECKING:
    from typing import Self

    from ..config import BackendSpec
    from ..storage.staging import StagingArena

__all__ = ["UringBackend"]

_MAX_IO = 8 << 20  # upper bound of one request; lowered to the device's max_sectors_kb at open


class UringBackend(IndexedMembership, PolicyHints, ReadLayer):
    """SSD tier on a file or raw block device through io_uring.

    Parameters
    ----------
    path
        A regular file (created if missing) or a block device.
    capacity
        Bytes of the file (required to create one); for a device, defaults to the device's size.
    entries
        io_uring submission queue depth.
    bounce
        Bytes of registered staging memory for unaligned caller buffers.
    sqpoll
        Use a kernel submission-polling thread (IORING_SETUP_SQPOLL).
    policy
        Eviction policy name or object.
    direct
        Read straight into caller memory when it is aligned (default); ``False`` forces bounce buffers.
    verify
        Check every read against its xxh3 checksums (default). ``?verify=0`` trusts the device instead (what
        LMCache and vLLM's offloading do: ~0.03 CPU-s/GB less); checksums are still written, so a pool can be
        verified again later (``kvpool fsck``), but a corrupt or misdirected read is then returned as data.
    format
        ``?format=1``: format ``path`` if it does not hold a kvpool pool (destroying what it holds) or holds one
        of another ``capacity``; a valid pool is recovered. Without it, only a missing or empty file is
        formatted; anything else that is not a kvpool pool is refused (:class:`NotAPoolError`).
    readonly
        Open without writing, locking or formatting (see :meth:`open_readonly`).
    """

    scheme = "uring"
    # survives restarts and crashes; flush() is an fdatasync; policy-ordered; reads any range
    capabilities = Capabilities(
        persistent=True, durable=True, device_memory=False, partial_reads=True, remote=False, queued_io=True,
        eviction_hints=True, host_memory="registered", read_bandwidth=None,
    )

    def __init__(
        self,
        path: str | os.PathLike[str],
        capacity: int | None = None,
        *,
        entries: int = 256,
        bounce: int = 256 << 20,
        sqpoll: bool = False,
        policy: str | EvictionPolicy = "lru",
        direct: bool = True,
        format: bool = False,  # noqa: A002  (the spec option's name)
        readonly: bool = False,
        verify: bool = True,
    ) -> None:
        super().__init__()
        self.path = os.fspath(path)
        if not self.path:
            raise ConfigError("uring:// needs a path, e.g. uring:///var/cache/kv.pool?capacity=100GiB")
        self._req_capacity = capacity
        self._entries = entries
        self._bounce_bytes = max(bounce, 4 << 20) // (2 << 20) * (2 << 20)
        self._sqpoll = sqpoll
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        self._policy_name = policy if isinstance(policy, str) else None
        self._direct = direct
        self._verify = verify
        self._format_ok = format
        self._readonly = readonly
        if format and readonly:
            raise ConfigError(f"uring://{self.path}: format and readonly exclude each other")
        self._fd = -1
        self._transport = None
        self._staging: StagingArena | None = None  # the pool's, once attached
        self._arena_inflight = 0
        self._arena_freed = asyncio.Event()
        self._bounce = None
        self._geo = None
        self._alloc = None
        self._index = {}
        self._meta_bytes = 0
        self._epoch = 0
        self._seq = 0
        self._jpos = 0  # next journal block
        self._jpending = []
        self._jtask = None
        self._mem_align = BLOCK
        self._max_io = _MAX_IO
        self.is_block_device = False
        self.counters = {
            "hits": 0,
            "misses": 0,
            "corrupt": 0,
            "read_errors": 0,
            "evictions": 0,
            "bytes_read": 0,
            "bytes_written": 0,
            "direct_reads": 0,
            "bounce_reads": 0,
            "arena_staging": 0,  # groups staged in the pool's arena
            "bounce_staging": 0,  # groups staged in the store's own bounce buffer (the arena had no room)
            "arena_waits": 0,  # times a group waited for arena staging this store's other groups held
            "checkpoints": 0,
            "recovered_objects": 0,
            "dropped_on_recovery": 0,
        }

    @classmethod
    def from_spec(cls, spec: BackendSpec) -> Self:
        spec.check_known(("capacity", "entries", "bounce", "sqpoll", "policy", "direct", "format", "verify"))
        return cls(
            spec.location,
            spec.size("capacity"),
            entries=spec.integer("entries", 256),
            bounce=spec.size("bounce", 256 << 20) or (256 << 20),
            sqpoll=spec.flag("sqpoll"),
            policy=spec.params.get("policy", "lru"),
            direct=spec.flag("direct", True),
            format=spec.flag("format"),
            verify=spec.flag("verify", True),
        )

    @classmethod
    def open_readonly(cls, path: str | os.PathLike[str], **kwargs: Any) -> Self:
        """A view of the pool at ``path`` that never writes, locks or formats: ``async with`` it to read.

        It recovers the index the way an open does (checkpoint, then the journal) but writes no checkpoint,
        takes no lock and does not open a device exclusively, so it works on a pool another process holds
        open (and sees that pool as of its last journal block). Writes and deletes raise BackendError.
        """
        return cls(path, readonly=True, **kwargs)

    # --- sizes -------------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int | None:
        return self._geo.d_len if self._geo else self._req_capacity

    @property
    def geometry(self) -> fmt.Geometry | None:
        """Where the open pool's regions lie (superblock, checkpoints, journal, data), its size and format
        uuid; ``None`` while closed. Read-only: tools (``kvpool bench``, ``inspect``) read it, never set it."""
        return self._geo

    @property
    def used_bytes(self) -> int:
        return self._alloc.used if self._alloc else 0

    def __len__(self) -> int:
        return len(self._index)

    async def object_size(self, key: bytes) -> int | None:
        e = self._index.get(key)
        return e.length if e else None

    # --- open / close ------------------------------------------------------------------------------------
    async def _open(self) -> None:
        try:
            with ssd_errors(self.path, f"cannot open {self.path}"):
                await self._open_inner()
        except BaseException:
            await self._teardown()  # a failed open holds nothing: no ring, no descriptor, no lock
            self._geo = None
            self._alloc = None
            self._index.clear()
            raise

    async def _close(self) -> None:
        try:
            if not self._readonly:
                await self._drain_journal()
                await self._checkpoint()  # next open replays nothing
        finally:
            await self._teardown()
            self._index.clear()
            self._alloc = None
            self._geo = None
            self.policy = make_policy(self._policy_name) if self._policy_name else self.policy

    async def attach_staging(self, arena: StagingArena) -> None:
        """The pool's staging arena: the transport reaches it with no copy (fixed buffers for io_uring, the
        shared memory table for vhost), so reads into ``get`` results and ``pool.empty`` tensors go direct."""
        self._check_open()
        assert self._transport is not None
        self._staging = arena
        self._arena_inflight = 0
        self._arena_freed = asyncio.Event()
        await self._transport.attach_memory(arena)

    @property
    def device_path(self) -> str | None:
        """The pool file or block device (what a bandwidth probe measures and its cache is keyed by)."""
        return self.path

    async def flush(self) -> None:
        """Make every completed put durable against power loss (fdatasync of the file or device)."""
        self._check_open()
        if self._readonly:
            return
        await self._drain_journal()
        assert self._transport is not None
        (res,) = await self._submit([Op.fsync()], "fdatasync")
        if res < 0:
            raise self._oserror(-res, "fdatasync failed")

    # --- writes ------------------------------------------------------------------------------------------

    async def write(self, key: bytes, src: torch.Tensor) -> None:
        await self.write_many([(key, src)])

    def _check_writable(self) -> None:
        self._check_open()
        if self._readonly:
            raise self._oserror(errno_mod.EROFS, f"{self.path} is open read-only")

    async def write_many(self, items: Sequence[tuple[bytes, torch.Tensor]]) -> None:
        self._check_writable()
        for _, src in items:
            if nbytes_of(src) == 0:
                raise ValueError("cannot store an empty object")
        if not items:
            return
        groups = self._groups([fmt.align_up(nbytes_of(s)) for _, s in items])
        if len(groups) == 1:
            await self._write_group(items)
        else:
            await gather_settled(*(self._write_group([items[i] for i in g]) for g in groups))

    # --- reads -------------------------------------------------------------------------------------------
    async def read_into(self, key: bytes, dest: torch.Tensor, offset: int = 0) -> bool:
        return (await self.read_many([ReadRequest(key, dest, offset)]))[0]

    async def read_many(self, requests: Sequence[ReadRequest]) -> list[bool]:
        self._check_open()
        if not requests:
            return []
        shapes = [self._shape(r) for r in requests]
        groups = self._groups([sh.need for sh in shapes])
        if len(groups) == 1:
            return await self._read_group(requests, shapes)
        parts = await gather_settled(*(self._read_group([requests[i] for i in g], [shapes[i] for i in g])
                                       for g in groups))
        return [ok for part in parts for ok in part]

    # --- the rest of the core ----------------------------------------------------------------------------
    async def delete(self, key: bytes) -> bool:
        self._check_writable()
        e = self._index.pop(key, None)
        if e is None:
            return False
        self.policy.remove(key)
        self._release(e)
        await self._log([fmt.del_record(key)])
        return True

    def stats(self) -> dict[str, Any]:
        return {
            **super().stats(),
            "path": self.path,
            "block_device": self.is_block_device,
            "objects": len(self._index),
            "mem_align": self._mem_align,
            "max_io": self._max_io,
            **(self._transport.stats() if self._transport is not None else {}),
            "mem_align": self._mem_align,
            "policy": self.policy.name,
            **self.counters,
        }
