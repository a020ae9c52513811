"""Public type names: what the API accepts as tokens, and the shape of :meth:`KVPool.stats`.

These are for annotations in users' code (``def handle(tokens: kvpool.Tokens) -> None``) and for mypy; they
cost nothing at run time. :meth:`KVPool.stats` returns a plain ``dict`` shaped as :class:`PoolStats`
(a ``TypedDict``), so ``stats["tiers"][0]["hits"]`` type-checks and JSON-serialises as it always did.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeAlias, TypedDict, Union

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = ["BackgroundStats", "LayoutStats", "PoolStats", "SchedulerStats", "StagingStats", "TierStats", "Tokens"]

#: A prompt's token ids: a sequence of ints, a 1-D integer numpy array or a 1-D integer torch tensor
#: (all hash to the same keys). Chunk keys bind the whole prefix, so pass the prompt from its first token.
Tokens: TypeAlias = Union[Sequence[int], "np.ndarray[Any, Any]", "torch.Tensor"]


class LayoutStats(TypedDict):
    """The pool's :class:`~kvpool.KVLayout`, as plain values."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    chunk_tokens: int
    chunk_bytes: int


class SchedulerStats(TypedDict, total=False):
    """One tier's I/O scheduler (:mod:`kvpool.pool.scheduler`)."""

    queued: int
    running: int
    #: operations admitted, per priority class, and membership/delete calls (``ops_meta``)
    ops_foreground: int
    ops_prefetch: int
    ops_promotion: int
    ops_write_back: int
    ops_meta: int
    cancelled: int
    max_queue: int
    #: range reads served by reading a whole object (a tier without partial reads)
    whole_object_reads: int
    bytes_read: int
    bytes_written: int
    recent_read_Bps: int
    #: total seconds requests waited in the queue, per priority class
    wait_s: dict[str, float]


class TierStats(TypedDict, total=False):
    """One tier's counters. Every backend reports ``scheme``, ``capacity`` and ``used_bytes``; the others are
    reported by the backends that keep them (``None`` capacity: unbounded or unknown, e.g. a remote tier)."""

    scheme: str
    capacity: int | None
    used_bytes: int
    objects: int
    policy: str
    hits: int
    misses: int
    evictions: int
    bytes_read: int
    bytes_written: int
    corrupt: int
    read_errors: int
    errors: int
    timeouts: int
    path: str
    block_device: bool
    io: SchedulerStats
    #: failures of this tier the pool contained (skipped and counted), by kind, and the last one's text
    faults: dict[str, int]
    last_fault: str | None


class StagingStats(TypedDict, total=False):
    """The pool's staging arena (:mod:`kvpool.storage.staging`): registered host memory chunks pass through."""

    bytes: int
    #: backed by a memfd shared with another process (a vhost-user target)
    shared: bool
    #: made of reserved 2 MiB huge pages
    hugetlb: bool
    #: bytes faulted in so far (the arena populates in the background after open)
    populated: int
    free: int
    ready: bool
    populate_seconds: float
    acquired: int
    #: acquisitions that waited for space
    waits: int
    #: requests larger than the arena (served from memory of their own)
    oversize: int
    fallbacks: int
    overflowed: int
    overflow_bytes: int


class BackgroundStats(TypedDict):
    """Background work (write-back, promotion, prefetch) queued or running."""

    tasks: int
    #: bytes queued, per kind of background work (each bounded; see :class:`kvpool.PoolConfig`)
    queued_bytes: dict[str, int]


class PoolStats(TypedDict):
    """What :meth:`KVPool.stats` returns: the pool's counters, its layout, and each tier's counters."""

    model_id: str
    layout: LayoutStats
    puts: int
    chunks_written: int
    chunks_skipped: int
    lookups: int
    gets: int
    hit_tokens: int
    miss_tokens: int
    promotions: int
    read_failures: int
    prefetches: int
    prefetch_joins: int
    write_backs: int
    write_back_failures: int
    attention_observations: int
    #: promotions/prefetches not queued because their queue was full (a counted drop, never unbounded memory)
    promotions_dropped: int
    prefetches_dropped: int
    #: puts that waited for write-back queue room (back-pressure)
    write_back_waits: int
    promotion_failures: int
    staging: StagingStats
    background: BackgroundStats
    tiers: list[TierStats]
