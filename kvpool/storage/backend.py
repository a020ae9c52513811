"""The backend protocol: a small abstract async object store every tier implements.

A backend stores opaque objects under 16-byte keys and reads byte ranges of them straight into memory the
caller owns. Buffers are torch tensors of any dtype, shape and strides (CPU, or device memory where the
backend's capabilities say so); an object's bytes are the row-major bytes of the tensor written, so a strided
view of the caller's KV (``kv[:, :, t0:t1]``) is written and read in place, with no packing copy.

The core is six coroutines -- :meth:`write`, :meth:`read_into`, :meth:`delete`, :meth:`contains`,
:meth:`keys`, plus :meth:`open`/:meth:`close` -- and a frozen :class:`Capabilities`. Batch forms
(:meth:`write_many`, :meth:`read_many`, :meth:`contains_many`) default to running the single forms
concurrently; fast backends override them with one submission.

Everything else the pool uses is declared, never probed: the required :class:`Capabilities` fields, and the
optional surfaces -- :meth:`~Backend.flush` (``durable``), the eviction hints (``eviction_hints``),
:meth:`~Backend.attach_staging` (``host_memory``) and :attr:`~Backend.device_path` -- whose no-op defaults live on :class:`Backend` and which :meth:`Backend.open`
checks against the declaration once (:func:`check_contract`).

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
    from .staging import StagingArena

__all__ = ["HOST_MEMORY", "Backend", "Capabilities", "ReadRequest", "byte_view", "check_contract", "nbytes_of"]

# The methods each declared optional surface makes real: a backend declaring the capability overrides them.
_SURFACES: dict[str, tuple[str, ...]] = {
    "durable": ("flush",),
    "eviction_hints": ("hint_prefix", "hint_attention", "hint_touch"),
    "host_memory": ("attach_staging",),  # any value but "none"
}


#: values of :attr:`Capabilities.host_memory`, weakest first
HOST_MEMORY: tuple[str, ...] = ("none", "registered", "shared")


def _bandwidth(_inst: object, attr: attrs.Attribute[float | None], value: float | None) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"Capabilities.{attr.name} must be None (unknown) or > 0, got {value!r}")


@attrs.frozen(kw_only=True)
class Capabilities:
    """What a backend is, declared once and in full: every field is required (no silent defaults), so a
    backend author states each property rather than inheriting a guess.

    Attributes
    ----------
    persistent
        Objects survive :meth:`Backend.close` and a process crash, and are found again on open.
    durable
        :meth:`Backend.flush` is real: after it returns, what was written survives power loss. The pool
        flushes exactly the tiers that declare it.
    device_memory
        Objects live in accelerator memory (reads into CUDA tensors are device copies); the conformance
        suite builds its buffers on that device.
    partial_reads
        ``read_into`` serves any ``offset`` and length, reading only the bytes asked for. A backend that
        says ``False`` is only ever asked for whole objects at offset 0: the pool's scheduler turns a range
        read (a layer of a chunk) into one whole-object read and a copy.
    remote
        Objects live in another process or machine, one network round trip away. The scheduler queues a
        remote tier's membership queries (a round trip each) with its data; a local tier answers them from
        memory, unqueued.
    queued_io
        The backend's operations queue on a device or a network (SSD, remote): the pool puts its I/O
        scheduler in front of it. Memory tiers, whose "I/O" is a memcpy on the caller's core, say ``False``.
    eviction_hints
        :meth:`Backend.hint_prefix`, :meth:`Backend.hint_attention` and :meth:`Backend.hint_touch` feed
        the backend's eviction policy; the pool sends hints only to tiers that declare this.
    host_memory
        How the backend uses the pool's staging arena (:class:`~kvpool.storage.staging.StagingArena`, where
        ``get`` results, ``pool.empty`` tensors and background copies live): ``"none"`` (it does not);
        ``"registered"`` (:meth:`Backend.attach_staging` registers the arena with the device, e.g. as
        io_uring fixed buffers, so I/O into it needs no copy and no per-I/O page pinning); ``"shared"`` (the
        arena is shared with another process, e.g. a vhost-user target that DMAs into it: the pool then backs
        the arena with a memfd). The pool calls :meth:`Backend.attach_staging` on every tier that does not say
        ``"none"``.
    read_bandwidth
        Bytes per second, measured or hinted; ``None`` when unknown. Striped placement weighs by it.
    """

    persistent: bool
    durable: bool
    device_memory: bool
    partial_reads: bool
    remote: bool
    queued_io: bool
    eviction_hints: bool
    host_memory: str = attrs.field(validator=attrs.validators.in_(HOST_MEMORY))
    read_bandwidth: float | None = attrs.field(validator=_bandwidth)


@attrs.frozen(slots=True)
class ReadRequest:
    """One range read: ``dest`` (its nbytes) from ``offset`` of object ``key``."""

    key: bytes
    dest: torch.Tensor
    offset: int = 0


def nbytes_of(t: torch.Tensor) -> int:
    """Bytes a tensor covers in row-major order."""
    return t.numel() * t.element_size()


def check_range(dest: torch.Tensor, offset: int, length: int) -> int:
    """Validate a range read of ``dest``'s size at ``offset`` from an object of ``length`` bytes; return the
    bytes it covers. Raises ``ValueError`` for a range outside the object or an offset not on an element of
    ``dest`` (the documented errors of :meth:`Backend.read_into`)."""
    n = nbytes_of(dest)
    if offset < 0 or offset + n > length:
        raise ValueError(f"range [{offset}, {offset + n}) is outside an object of {length} bytes")
    if n and offset % dest.element_size():
        raise ValueError(f"offset {offset} is not a multiple of the destination's itemsize")
    return n


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor (raises if ``t`` is not contiguous)."""
    return t.reshape(-1).view(torch.uint8)


class Backend(abc.ABC):
    """Base class of every backend. Subclasses implement the abstract coroutines and ``from_spec``.

    Subclasses set :attr:`scheme` (their registry name) and :attr:`capabilities` (a class attribute, or a
    property computed from the backend's configuration), and implement ``_open``/``_close`` for resource
    set-up; :meth:`open`/:meth:`close` handle state and idempotence.

    The optional surfaces -- :meth:`flush`, the eviction hints (:meth:`hint_prefix`,
    :meth:`hint_attention`, :meth:`hint_touch`) and :attr:`device_path` -- have documented no-op defaults
    here; a backend that makes one real overrides it and declares so in its capabilities (``durable``,
    ``eviction_hints``). :meth:`open` checks the declaration against the class once, so the pool can build
    its lists of durable and hinted tiers at open and never probe a tier per call.
    """

    scheme: ClassVar[str] = ""

    def __init__(self) -> None:
        self._is_open = False

    @property
    @abc.abstractmethod
    def capabilities(self) -> Capabilities:
        """What this backend is (see :class:`Capabilities`). Constant while the backend is open."""

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
        """Acquire resources (memory, files, connections), then check the declared contract. Idempotent.

        Raises
        ------
        TypeError
            If the backend's :attr:`capabilities` is not a :class:`Capabilities`, or declares an optional
            surface (``durable``, ``eviction_hints``) whose methods the class leaves as the no-op defaults.
        """
        if not self._is_open:
            await self._open()
            try:
                check_contract(self)
            except TypeError:
                await self._close()
                raise
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

    # --- optional surfaces (no-op defaults; declared real through the capabilities) -----------------------
    async def flush(self) -> None:
        """Make every completed write durable against power loss.

        The default does nothing: a backend whose capabilities say ``durable=False`` has no stronger state
        to reach (memory tiers, caches over a server's own persistence). Durable backends override it.
        """
        self._check_open()

    def hint_prefix(self, parent: bytes, child: bytes) -> None:
        """``child`` is the chunk after ``parent`` in a stored prompt (useless without it). No-op default;
        backends with ``eviction_hints`` pass it to their policy. Unknown keys are ignored."""

    def hint_attention(self, key: bytes, mass: float) -> None:
        """The model paid ``mass`` (>= 0) attention to chunk ``key``. No-op default; see :meth:`hint_prefix`."""

    def hint_touch(self, key: bytes) -> None:
        """Treat ``key`` as just used (a hit that did not go through :meth:`read_into`, e.g. the record of a
        striped object whose pieces were read). No-op default; see :meth:`hint_prefix`."""

    async def attach_staging(self, arena: StagingArena) -> None:  # noqa: B027 - optional surface
        """Reach the pool's staging arena with no copy (declared by ``capabilities.host_memory``).

        Called once by the pool right after it opens, before any request. ``arena`` may still be populating
        (:meth:`~kvpool.storage.staging.StagingArena.wait_ready`); a backend that registers it does so in the
        background once it is ready, and serves I/O into it the ordinary way until then. The arena outlives
        the backend's use of it: the pool closes its tiers before it drops the arena.
        """

    @property
    def device_path(self) -> str | None:
        """The file or block device the backend's bytes live on, for bandwidth probing and its cache;
        ``None`` (the default) for backends without one."""
        return None

    # --- observability -----------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters of this backend (objects, bytes, hits, misses, corrupt reads...)."""
        return {"scheme": self.scheme, "capacity": self.capacity, "used_bytes": self.used_bytes}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {'open' if self._is_open else 'closed'}>"


def check_contract(backend: Backend) -> None:
    """Check once (at open) that ``backend`` declares its capabilities and implements what they claim.

    Raises
    ------
    TypeError
        If ``capabilities`` is not a :class:`Capabilities`, or a declared surface's methods are the base
        class's no-op defaults.
    """
    caps = backend.capabilities
    if not isinstance(caps, Capabilities):
        raise TypeError(f"{type(backend).__name__}.capabilities must be a kvpool.Capabilities, got {caps!r}")
    for field, methods in _SURFACES.items():
        declared = getattr(caps, field)
        if declared and declared != "none":
            lacking = [m for m in methods if getattr(type(backend), m) is getattr(Backend, m)]
            if lacking:
                raise TypeError(
                    f"{type(backend).__name__} declares {field}={declared!r} but leaves {', '.join(lacking)} as "
                    "the no-op default"
                )
