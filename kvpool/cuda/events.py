"""CUDA streams and events for restores: the low-priority restore stream, awaiting an event without blocking
the loop, and :class:`LayerEvents` (per-layer completion; a no-op with the same API without CUDA)."""

from __future__ import annotations

import asyncio
from typing import Any

import torch

__all__ = ["LayerEvents", "await_cuda_event", "restore_stream"]

# torch.cuda's stream/event constructors are untyped; go through Any once instead of at every call
_cuda: Any = torch.cuda

_streams: dict[int, Any] = {}


def restore_stream(device: torch.device | int | str | None = None) -> Any:
    """The dedicated low-priority CUDA stream restores use by default on ``device`` (one per device)."""
    if device is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    elif isinstance(device, int):
        dev = torch.device("cuda", device)
    else:
        dev = torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"restore_stream needs a CUDA device, got {dev}")
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    s = _streams.get(idx)
    if s is None:
        rng = getattr(torch.cuda.Stream, "priority_range", None)
        lowest = int(rng()[0]) if rng is not None else 0  # (least, greatest): a larger number is lower
        s = _cuda.Stream(device=idx, priority=lowest)
        _streams[idx] = s
    return s


async def await_cuda_event(ev: Any, *, spins: int = 8) -> None:
    """Wait for a CUDA event without blocking the event loop: poll it a few loop turns, then wait in a thread."""
    if ev is None:
        return
    for _ in range(spins):
        if ev.query():
            return
        await asyncio.sleep(0)
    await asyncio.to_thread(ev.synchronize)


class LayerEvents:
    """Per-layer completion of a restore.

    On CUDA, layer *l*'s copy records a ``torch.cuda.Event`` on the restore stream; :meth:`wait` makes another
    stream (the model's compute stream) wait for it on the GPU, without blocking the CPU. A layer that was never
    restored (nothing cached) has no event: waiting on it is a no-op. On the CPU the copies are synchronous and
    every method returns at once.

    :meth:`ready` is for a caller that runs :func:`restore_paged` as a task (pass ``events=`` in) and starts the
    forward pass before every layer was issued: it waits until layer *l*'s copy was *issued* (or the restore
    ended without it) -- a CUDA stream cannot wait on an event that has not been recorded yet. One object
    serves one restore.
    """

    def __init__(self, num_layers: int, device: torch.device | str | None = None) -> None:
        if num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {num_layers}")
        self.num_layers = num_layers
        self.device = torch.device(device if device is not None else "cpu")
        self.is_cuda = self.device.type == "cuda"
        self._events: list[Any] = [None] * num_layers
        self._issued = [False] * num_layers
        self._flags: list[asyncio.Event] = [asyncio.Event() for _ in range(num_layers)]

    def __len__(self) -> int:
        return self.num_layers

    def __repr__(self) -> str:
        return f"<LayerEvents {sum(self._issued)}/{self.num_layers} issued on {self.device}>"

    def record(self, layer: int, stream: Any = None) -> None:
        """Mark layer ``layer`` issued; on CUDA record its event on ``stream`` (default: the current stream)."""
        if self.is_cuda:
            s = stream if stream is not None else torch.cuda.current_stream(self.device)
            ev = _cuda.Event()
            ev.record(s)
            self._events[layer] = ev
        self._issued[layer] = True
        self._flags[layer].set()

    def issued(self, layer: int) -> bool:
        """Whether layer ``layer``'s copy was issued."""
        return self._issued[layer]

    def wait(self, layer: int, stream: Any = None) -> None:
        """Make ``stream`` (default: the current stream) wait on the GPU until layer ``layer`` has landed."""
        ev = self._events[layer]
        if ev is not None:
            s = stream if stream is not None else torch.cuda.current_stream(self.device)
            s.wait_event(ev)

    def wait_all(self, stream: Any = None) -> None:
        """:meth:`wait` for every layer."""
        for layer in range(self.num_layers):
            self.wait(layer, stream)

    def query(self, layer: int) -> bool:
        """Whether layer ``layer``'s copy has finished (``True`` for a layer without a copy)."""
        ev = self._events[layer]
        return True if ev is None else bool(ev.query())

    def synchronize(self) -> None:
        """Block the calling thread until every recorded copy finished."""
        for ev in self._events:
            if ev is not None:
                ev.synchronize()

    async def synchronize_async(self) -> None:
        """:meth:`synchronize` without blocking the event loop."""
        for ev in self._events:
            await await_cuda_event(ev)

    async def ready(self, layer: int) -> bool:
        """Wait until layer ``layer`` was issued or the restore ended; return whether it was issued."""
        await self._flags[layer].wait()
        return self._issued[layer]

    def _end(self) -> None:
        """The restore is over: wake every :meth:`ready` waiter."""
        for f in self._flags:
            f.set()


# --- the paged cache -------------------------------------------------------------------------------------
