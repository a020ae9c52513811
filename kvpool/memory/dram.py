"""``dram://`` -- a host-memory tier: one arena, its own extent allocator, a hard capacity, LRU eviction.

The arena is a single uint8 tensor (page-locked when CUDA can pin it, so host<->GPU copies are DMA).
Objects are extents of it: no Python object per byte, and a read is one strided ``copy_`` from the arena
into the caller's tensor. Copies of a few MiB or more run in a worker thread (torch releases the GIL), so
the event loop never blocks on a large memcpy; the extent being copied is pinned against eviction and
against reuse by an overwrite or delete until the copy is done.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..errors import BackendError, ConfigError
from ..storage.eviction import EvictionPolicy, make_policy
from ..storage.allocator import ExtentAllocator
from ..storage.buffers import OFFLOAD_BYTES, HUGE_PAGE, alloc_aligned, buffer_address
from .arena import ArenaTier, viewed_as
from ..storage.backend import Capabilities, ReadRequest, nbytes_of

if TYPE_CHECKING:
    from typing import Self

    from ..config import BackendSpec

__all__ = ["DRAMBackend"]

_SYS_MBIND = {"x86_64": 237, "aarch64": 235}.get(os.uname().machine)
_MPOL_BIND = 2


def _mbind(addr: int, length: int, node: int) -> None:
    """Bind [addr, addr+length) to one NUMA node (mbind(2) through libc's syscall(); no libnuma needed)."""
    if _SYS_MBIND is None:
        raise ConfigError(f"dram://?numa= is not supported on {os.uname().machine}")
    libc = ctypes.CDLL(None, use_errno=True)
    mask = (ctypes.c_ulong * (node // 64 + 1))()
    mask[node // 64] = 1 << (node % 64)
    rc = libc.syscall(_SYS_MBIND, ctypes.c_void_p(addr), ctypes.c_ulong(length), _MPOL_BIND, mask,
                      ctypes.c_ulong(64 * len(mask) + 1), 0)
    if rc != 0:
        err = ctypes.get_errno()
        raise BackendError(err, f"dram://: mbind to NUMA node {node} failed: {os.strerror(err)}")

_ALIGN = 4096


class DRAMBackend(ArenaTier):
    """Host-memory tier.

    Parameters
    ----------
    capacity
        Arena size in bytes (a hard bound).
    pin_memory
        Page-lock the arena; ``None`` (default) pins when CUDA is available.
    policy
        Eviction policy name (``lru``) or an :class:`~kvpool.storage.eviction.EvictionPolicy` object.
    """

    scheme = "dram"
    # host memory: lost on close, nothing to flush, a copy on the caller's core (no queue), policy-ordered
    capabilities = Capabilities(
        persistent=False, durable=False, device_memory=False, partial_reads=True, remote=False, queued_io=False,
        eviction_hints=True, host_memory="none", read_bandwidth=None,
    )

    def __init__(
        self,
        capacity: int,
        *,
        pin_memory: bool | None = None,
        policy: str | EvictionPolicy = "lru",
        numa: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(capacity, int) or capacity < _ALIGN:
            raise ConfigError(f"dram:// capacity must be at least {_ALIGN} bytes, got {capacity!r}")
        self._capacity = capacity
        self._pin = pin_memory
        if numa is not None and not os.path.isdir(f"/sys/devices/system/node/node{numa}"):
            raise ConfigError(f"dram://: NUMA node {numa} does not exist on this host")
        self.numa = numa
        self._mapping: Any = None
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        self._arena: torch.Tensor | None = None
        self._alloc = ExtentAllocator(capacity, _ALIGN)
        self.pinned_memory = False
        self.counters = {"hits": 0, "misses": 0, "evictions": 0, "bytes_read": 0, "bytes_written": 0}

    @classmethod
    def from_spec(cls, spec: BackendSpec) -> Self:
        spec.check_known(("capacity", "pin", "policy", "numa"))
        cap = spec.size("capacity")
        if cap is None:
            raise ConfigError(f"{spec.text}: dram:// needs ?capacity=SIZE (e.g. dram://?capacity=8GiB)")
        pin = spec.flag("pin") if "pin" in spec.params else None
        numa = spec.integer("numa", -1)
        return cls(cap, pin_memory=pin, policy=spec.params.get("policy", "lru"), numa=None if numa < 0 else numa)

    async def _open(self) -> None:
        pin = torch.cuda.is_available() if self._pin is None else self._pin
        if self.numa is not None:
            # One arena per NUMA node: our own mapping, bound to the node before any page is touched, then
            # (for CUDA) registered as page-locked in place.
            self._mapping = alloc_aligned(-(-self._capacity // HUGE_PAGE) * HUGE_PAGE)
            _mbind(buffer_address(self._mapping), len(self._mapping), self.numa)
            self._arena = torch.frombuffer(self._mapping, dtype=torch.uint8, count=self._capacity)
            if pin:
                rc = torch.cuda.cudart().cudaHostRegister(self._arena.data_ptr(), self._capacity, 0)  # type: ignore[no-untyped-call]
                if int(rc) != 0:
                    raise BackendError(f"dram://: cudaHostRegister failed ({rc})")
                self.pinned_memory = True
        elif pin:
            # Raises if pinning is impossible although explicitly asked for: a silent fallback would hide
            # a 2x slower host-to-device path.
            self._arena = torch.empty(self._capacity, dtype=torch.uint8, pin_memory=True)
            self.pinned_memory = True
        else:
            self._arena = torch.empty(self._capacity, dtype=torch.uint8)

    async def _close(self) -> None:
        if self._mapping is not None and self.pinned_memory and self._arena is not None:
            torch.cuda.cudart().cudaHostUnregister(self._arena.data_ptr())  # type: ignore[no-untyped-call]
        self._mapping = None
        self._reset()
        self.policy = type(self.policy)()
        self._arena = None

    # --- the core ----------------------------------------------------------------------------------------
    async def _copy_in(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst = viewed_as(dst, src)
        if nbytes_of(src) >= OFFLOAD_BYTES:
            await asyncio.to_thread(dst.copy_, src)
        else:
            dst.copy_(src)

    async def read_into(self, key: bytes, dest: torch.Tensor, offset: int = 0) -> bool:
        self._check_open()
        ext = self._lookup(key, dest, offset)
        if ext is None:
            return False
        n = nbytes_of(dest)
        src = viewed_as(self._slice(ext.start + offset, n), dest)
        if n >= OFFLOAD_BYTES:
            ext.pins += 1
            try:
                await asyncio.to_thread(dest.copy_, src)
            finally:
                self._unpin(ext)
        else:
            dest.copy_(src)
        self.policy.touch(key)
        self.counters["hits"] += 1
        self.counters["bytes_read"] += n
        return True

    async def write_many(self, items: Sequence[tuple[bytes, torch.Tensor]]) -> None:
        # Small copies are cheaper inline than as tasks; large ones overlap in worker threads.
        if len(items) > 1 and any(nbytes_of(s) >= OFFLOAD_BYTES for _, s in items):
            await super().write_many(items)
        else:
            for k, s in items:
                await self.write(k, s)

    async def read_many(self, requests: Sequence[ReadRequest]) -> list[bool]:
        if len(requests) > 1 and any(nbytes_of(r.dest) >= OFFLOAD_BYTES for r in requests):
            return await super().read_many(requests)
        return [await self.read_into(r.key, r.dest, r.offset) for r in requests]

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "pinned_memory": self.pinned_memory}
