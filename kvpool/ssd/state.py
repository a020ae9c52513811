"""The state every part of the SSD object store (``uring://``, ``vhost://``) shares, declared once (the parts are layered classes:
space -> journal -> opening -> write path -> read path -> :class:`~kvpool.ssd.store.UringBackend`; each file
holds one of them and uses only the layers below it)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ..storage.allocator import ExtentAllocator
from ..storage.backend import Backend
from ..storage.eviction import EvictionPolicy
from . import format as fmt
from .transport import BlockTransport

__all__ = ["BLOCK", "JournalItem", "StoreState", "log"]

log = logging.getLogger("kvpool.uring")

BLOCK = fmt.BLOCK

#: records of one put/delete, the future its caller waits on, and what to publish once they are durable
JournalItem = tuple[list[bytes], "asyncio.Future[None]", "Callable[[], None] | None"]


class StoreState(Backend):
    """Attributes of the store (set in :meth:`UringBackend.__init__`), typed for every layer."""

    path: str
    policy: EvictionPolicy
    counters: dict[str, int]
    is_block_device: bool
    _req_capacity: int | None
    _entries: int
    _bounce_bytes: int
    _sqpoll: bool
    _policy_name: str | None
    _direct: bool
    _verify: bool
    _format_ok: bool
    _readonly: bool
    _fd: int
    _transport: BlockTransport | None
    _geo: fmt.Geometry | None
    _alloc: ExtentAllocator | None
    _index: dict[bytes, fmt.Entry]
    _meta_bytes: int
    _epoch: int
    _seq: int
    _jpos: int
    _jpending: list[JournalItem]
    _jtask: asyncio.Task[None] | None
    _mem_align: int
    _max_io: int
