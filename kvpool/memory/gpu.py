"""``gpu://?device=0&capacity=20GiB`` -- a tier in spare GPU memory: one arena, its own allocator, LRU eviction.

The arena is one preallocated ``torch.uint8`` CUDA tensor; objects are extents of it
(:class:`~kvpool.storage.allocator.ExtentAllocator`, 4 KiB aligned), evicted by the tier's policy
(:func:`~kvpool.storage.eviction.make_policy`, ``lru`` by default). A write or read is one strided ``copy_`` between
the arena and the caller's tensor: device-to-device for CUDA tensors, host-to-device / device-to-host for CPU
ones (at full link speed when they are pinned). Copies are issued ``non_blocking`` on a dedicated stream
that first waits for the caller's current stream (so the caller's pending work on the tensor comes first),
and the coroutine returns only after an event recorded behind the copy has completed -- so the bytes are
valid, on every stream, when it returns. That wait polls the event for a few loop turns and then finishes in
a worker thread: the event loop never blocks on a long copy. The extent under a copy is pinned against
eviction and reuse until the copy is done (as in :mod:`.dram`).

Options: ``device`` (CUDA ordinal, default 0), ``capacity`` (required), ``policy`` (``lru``, ``s3fifo``,
``prefix``, ``attention``). Opening without a CUDA device raises :class:`~kvpool.ConfigError`.

Test hook: ``GPUBackend(capacity, _device="cpu")`` puts the arena in host memory and runs every copy
synchronously, so the allocator, eviction and protocol logic run on machines without a GPU (the conformance
suite does this). Not for production use: that is what ``dram://`` is for.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..storage.allocator import ExtentAllocator
from ..storage.buffers import OFFLOAD_BYTES
from ..errors import BackendError, ConfigError
from ..storage.eviction import EvictionPolicy, make_policy
from ..cuda.events import await_cuda_event
from .arena import ArenaTier, viewed_as
from ..storage.backend import Capabilities, ReadRequest, nbytes_of

if TYPE_CHECKING:
    from typing import Self

    from ..config import BackendSpec

__all__ = ["GPUBackend"]

_ALIGN = 4096
# Host-side copies at least this large (pageable memory: the CUDA driver stages them synchronously; or the
# CPU test hook) are launched from a worker thread.

_cuda: Any = torch.cuda  # torch.cuda's Stream/Event constructors are untyped


class GPUBackend(ArenaTier):
    """GPU-memory tier.

    Parameters
    ----------
    capacity
        Arena size in bytes (a hard bound), allocated on :meth:`open`.
    device
        CUDA device ordinal.
    policy
        Eviction policy name or an :class:`~kvpool.storage.eviction.EvictionPolicy` object.
    _device
        Test hook: a torch device string overriding ``cuda:{device}``. ``"cpu"`` runs the tier's logic with a
        host arena and synchronous copies, so it can be tested without a GPU.
    """

    scheme = "gpu"
    # device memory, policy-ordered; its copies queue on a CUDA stream, so the scheduler stays in front
    capabilities = Capabilities(
        persistent=False, durable=False, device_memory=True, partial_reads=True, remote=False, queued_io=True,
        eviction_hints=True, host_memory="none", read_bandwidth=None,
    )

    def __init__(
        self,
        capacity: int,
        *,
        device: int = 0,
        policy: str | EvictionPolicy = "lru",
        _device: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < _ALIGN:
            raise ConfigError(f"gpu:// capacity must be at least {_ALIGN} bytes, got {capacity!r}")
        if isinstance(device, bool) or not isinstance(device, int) or device < 0:
            raise ConfigError(f"gpu:// device must be a CUDA ordinal >= 0, got {device!r}")
        self._capacity = capacity
        self._ordinal = device
        self._torch_device = torch.device(_device if _device is not None else f"cuda:{device}")
        self._cuda = self._torch_device.type == "cuda"
        self._policy_arg = policy
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        self._arena: torch.Tensor | None = None
        self._stream: Any = None
        self._alloc = ExtentAllocator(capacity, _ALIGN)
        self.counters = {"hits": 0, "misses": 0, "evictions": 0, "bytes_read": 0, "bytes_written": 0}

    @classmethod
    def from_spec(cls, spec: BackendSpec) -> Self:
        spec.check_known(("device", "capacity", "policy"))
        cap = spec.size("capacity")
        if cap is None:
            raise ConfigError(f"{spec.text}: gpu:// needs ?capacity=SIZE (e.g. gpu://?device=0&capacity=20GiB)")
        dev = spec.integer("device", 0)
        if dev < 0:
            raise ConfigError(f"{spec.text}: device must be a CUDA ordinal >= 0, got {dev}")
        policy = spec.params.get("policy", "lru")
        make_policy(policy)  # an unknown name is a ConfigError now, not at open
        return cls(cap, device=dev, policy=policy)

    @property
    def device(self) -> torch.device:
        return self._torch_device

    async def _open(self) -> None:
        if self._cuda:
            try:
                available = torch.cuda.is_available()
            except Exception:
                available = False
            if not available:
                raise ConfigError(
                    "gpu:// needs a CUDA device, but torch.cuda.is_available() is False "
                    f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})"
                )
            idx = self._torch_device.index or 0
            count = torch.cuda.device_count()
            if idx >= count:
                raise ConfigError(f"gpu:// device={idx} does not exist ({count} CUDA device(s))")
            try:
                self._arena = torch.empty(self._capacity, dtype=torch.uint8, device=self._torch_device)
            except torch.OutOfMemoryError as exc:  # a runtime failure of the device, not a bad option
                raise BackendError(
                    errno.ENOMEM, f"gpu:// cannot allocate {self._capacity} bytes on {self._torch_device}: {exc}"
                ) from None
            self._stream = _cuda.Stream(device=self._torch_device)
        else:
            self._arena = torch.empty(self._capacity, dtype=torch.uint8, device=self._torch_device)

    async def _close(self) -> None:
        if self._stream is not None:
            await await_cuda_event(self._record())  # nothing of ours in flight when the arena goes
        self._reset()
        self.policy = make_policy(self._policy_arg) if isinstance(self._policy_arg, str) else type(self.policy)()
        self._arena = None  # returns to torch's caching allocator (torch.cuda.empty_cache() gives it back)
        self._stream = None


    def _record(self) -> Any:
        ev = _cuda.Event()
        ev.record(self._stream)
        return ev

    def _launch(self, dst: torch.Tensor, src: torch.Tensor, after: Any) -> Any:
        """Issue ``dst.copy_(src)`` on our stream once ``after`` (the caller's stream) has passed its pending
        work; return an event recorded behind the copy."""
        s = self._stream
        s.wait_stream(after)
        with torch.cuda.stream(s):
            dst.copy_(src, non_blocking=True)
        return self._record()

    async def _copy(self, dst: torch.Tensor, src: torch.Tensor, other: torch.Tensor, nbytes: int) -> None:
        """Copy and wait until the bytes are there, without blocking the event loop on a long copy.

        ``other`` is the caller's tensor (``src`` of a write, ``dest`` of a read)."""
        if not self._cuda:  # test hook: a host arena
            if nbytes >= OFFLOAD_BYTES:
                await asyncio.to_thread(dst.copy_, src)
            else:
                dst.copy_(src)
            return
        # the caller produced (or last used) its tensor on its current stream -- taken here, on the caller's
        # thread: a worker thread's current stream is the default one
        after = torch.cuda.current_stream(other.device if other.is_cuda else self._torch_device)
        if nbytes >= OFFLOAD_BYTES and not other.is_cuda and not other.is_pinned():
            # from/to pageable host memory the driver stages synchronously: launch from a worker thread
            ev = await asyncio.to_thread(self._launch, dst, src, after)
        else:
            ev = self._launch(dst, src, after)
        await await_cuda_event(ev)

    # --- the core ----------------------------------------------------------------------------------------
    async def _copy_in(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        await self._copy(viewed_as(dst, src), src, src, nbytes_of(src))

    async def read_into(self, key: bytes, dest: torch.Tensor, offset: int = 0) -> bool:
        self._check_open()
        ext = self._lookup(key, dest, offset)
        if ext is None:
            return False
        n = nbytes_of(dest)
        if n == 0:
            return True
        src = viewed_as(self._slice(ext.start + offset, n), dest)
        ext.pins += 1
        try:
            await self._copy(dest, src, dest, n)
        finally:
            self._unpin(ext)
        if key in self._index:
            self.policy.touch(key)
        self.counters["hits"] += 1
        self.counters["bytes_read"] += n
        return True

    async def write_many(self, items: Sequence[tuple[bytes, torch.Tensor]]) -> None:
        if self._cuda and len(items) > 1:
            await super().write_many(items)  # copies overlap on the stream; each waits for its own event
        else:
            for k, s in items:
                await self.write(k, s)

    async def read_many(self, requests: Sequence[ReadRequest]) -> list[bool]:
        if self._cuda and len(requests) > 1:
            return await super().read_many(requests)
        return [await self.read_into(r.key, r.dest, r.offset) for r in requests]

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "device": str(self._torch_device)}
