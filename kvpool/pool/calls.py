"""Calls in flight, so that ``close()`` waits for them instead of tearing their tiers down under them."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from ..errors import PoolClosedError

__all__ = ["CallGate", "in_flight"]

P = ParamSpec("P")
R = TypeVar("R")


class CallGate:
    """Counts calls in flight; once closing, new calls are refused and ``wait_idle`` returns when the last
    call in flight has finished."""

    def __init__(self) -> None:
        self._n = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.closing = False

    @property
    def in_flight(self) -> int:
        return self._n

    def enter(self) -> None:
        """Start a call; raises :class:`PoolClosedError` once the pool is closing or closed."""
        if self.closing:
            raise PoolClosedError("the pool is closed")
        self._n += 1
        self._idle.clear()

    def exit(self) -> None:
        self._n -= 1
        if self._n == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


class _HasGate(Protocol):
    _gate: CallGate


S = TypeVar("S", bound=_HasGate)


def in_flight(fn: Callable[Concatenate[S, P], Awaitable[R]]) -> Callable[Concatenate[S, P], Coroutine[Any, Any, R]]:
    """Decorate a pool coroutine method: it is refused once the pool is closing, and ``close()`` waits
    for it to finish."""

    async def wrapper(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
        gate = self._gate
        gate.enter()
        try:
            return await fn(self, *args, **kwargs)
        finally:
            gate.exit()

    functools.update_wrapper(wrapper, fn)  # name, docstring and signature for help() and the docs
    return wrapper
