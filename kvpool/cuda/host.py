"""Host memory the GPU's copy engines can DMA from: page-locking (cudaHostRegister), pinned staging, GDS probe.

A host-to-device copy runs at the link's speed only from page-locked memory. Memory that already exists --
the io_uring tier's registered bounce buffers, a :func:`kvpool.storage.buffers.aligned_empty` tensor -- is
page-locked in place with :func:`register_host_memory` and released with :func:`unregister_host_memory`; both
are no-ops without CUDA. GPUDirect Storage (kvikio) is only detected (:func:`gds_available`), never required.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ..errors import BackendError
from ..storage.buffers import aligned_empty, buffer_address

__all__ = ["gds_available", "pinned_empty", "register_host_memory", "registered_host_memory",
           "unregister_host_memory", "cuda_ok"]

# torch.cuda's stream/event/cudart constructors are untyped; go through Any once instead of at every call
_cuda: Any = torch.cuda

_registered: dict[int, int] = {}  # address -> nbytes, registered by us
_registered_lock = threading.Lock()


def cuda_ok() -> bool:
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # a broken driver is "no CUDA" here
        return False


def _address_and_size(obj: Any) -> tuple[int, int]:
    if isinstance(obj, torch.Tensor):
        if obj.device.type != "cpu":
            raise ValueError(f"only host memory can be registered, got a tensor on {obj.device}")
        if not obj.is_contiguous():
            raise ValueError("only a contiguous tensor's memory can be registered")
        return obj.data_ptr(), obj.numel() * obj.element_size()
    mv = memoryview(obj)
    return buffer_address(obj), mv.nbytes


def register_host_memory(obj: Any) -> bool:
    """Page-lock existing host memory for DMA by CUDA (``cudaHostRegister``); return whether it was done.

    ``obj`` is a contiguous CPU tensor or a writable buffer (``mmap``, ``bytearray``). A no-op returning
    ``False`` without CUDA, for empty memory, or when that memory is already registered (by us or by someone
    else). Keep ``obj`` alive and call :func:`unregister_host_memory` before it is freed; registration costs
    about as much as touching every page once, so register long-lived buffers (arenas, bounce buffers), not
    per copy.

    Raises
    ------
    BackendError
        If CUDA refuses the registration for another reason.
    """
    if not cuda_ok():
        return False
    ptr, nbytes = _address_and_size(obj)
    if nbytes == 0:
        return False
    with _registered_lock:
        if ptr in _registered:
            return False
        cudart: Any = _cuda.cudart()
        err = int(cudart.cudaHostRegister(ptr, nbytes, 0))  # cudaHostRegisterDefault
        if err == 712:  # cudaErrorHostMemoryAlreadyRegistered: someone else owns the registration
            return False
        if err != 0:
            raise BackendError(f"cudaHostRegister of {nbytes} bytes at {ptr:#x} failed with cudaError {err}")
        _registered[ptr] = nbytes
        return True


def unregister_host_memory(obj: Any) -> bool:
    """Undo :func:`register_host_memory` (``cudaHostUnregister``); return whether anything was unregistered.

    Only memory registered through :func:`register_host_memory` is touched; a no-op without CUDA. Every copy
    from or to the memory must have finished.
    """
    if not cuda_ok():
        return False
    ptr, _ = _address_and_size(obj)
    with _registered_lock:
        if _registered.pop(ptr, None) is None:
            return False
        cudart: Any = _cuda.cudart()
        err = int(cudart.cudaHostUnregister(ptr))
        if err != 0:
            raise BackendError(f"cudaHostUnregister at {ptr:#x} failed with cudaError {err}")
        return True


@contextmanager
def registered_host_memory(obj: Any) -> Iterator[bool]:
    """``with registered_host_memory(buf) as pinned:`` -- register for the block, unregister after."""
    done = register_host_memory(obj)
    try:
        yield done
    finally:
        if done:
            unregister_host_memory(obj)


def pinned_empty(shape: Sequence[int], dtype: torch.dtype, *, page_aligned: bool = False) -> torch.Tensor:
    """A host tensor for staging copies to and from the GPU: page-locked when CUDA is available.

    From torch's caching host allocator (``pin_memory=True``); with ``page_aligned`` the memory is also
    4 KiB-aligned, as O_DIRECT (the ``uring://`` tier) needs to use it without a bounce copy -- if the
    allocator's block is not, an :func:`~kvpool.storage.buffers.aligned_empty` tensor is registered instead (the
    caller unregisters it with :func:`unregister_host_memory` when done). Without CUDA: ``aligned_empty``.
    """
    shape = tuple(int(s) for s in shape)
    if not cuda_ok():
        return aligned_empty(shape, dtype)
    t = torch.empty(shape, dtype=dtype, pin_memory=True)
    if page_aligned and t.data_ptr() % 4096:
        t = aligned_empty(shape, dtype)
        register_host_memory(t)
    return t


def gds_available() -> bool:
    """Whether GPUDirect Storage can be used: kvikio importable (with ``kvikio.CuFile``) and a CUDA device.

    Informational: kvpool's tiers do not use it yet; without it bytes travel through pinned host memory.
    """
    if not cuda_ok():
        return False
    try:
        # optional and untyped: without the ignore a user's strict mypy run reports kvpool's import
        import kvikio  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except Exception:
        return False
    return hasattr(kvikio, "CuFile")


