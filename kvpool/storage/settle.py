"""Awaiting work that touches a caller's memory: to its end, whatever happens to the awaiting task.

A call that returns, raises or is cancelled has finished touching the caller's memory (a guarantee of
kvpool). Plain ``await asyncio.gather(...)`` breaks it in two ways: when one awaitable fails, gather raises at
once while the others keep running (still reading into the caller's tensor); and ``asyncio.to_thread`` work
cannot be cancelled at all -- a cancelled await leaves the thread copying. These helpers wait for everything
first and only then raise.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

__all__ = ["gather_settled", "wait_uncancellable"]

T = TypeVar("T")


async def wait_uncancellable(fut: asyncio.Future[T]) -> T:
    """Await ``fut`` to its end even if the awaiting task is cancelled meanwhile; then re-raise the
    cancellation (or return / raise what ``fut`` gave)."""
    cancelled = False
    while not fut.done():
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            if fut.done():
                break
            cancelled = True
    if cancelled:
        if not fut.cancelled():
            fut.exception()  # retrieved: the cancellation wins
        raise asyncio.CancelledError
    return fut.result()


async def gather_settled(*aws: Awaitable[T]) -> list[T]:
    """Like ``asyncio.gather`` (results in order, the first exception raised), but returns or raises only
    once every awaitable has finished. A cancellation of the caller is passed on to the awaitables that can
    be cancelled (tasks) and waited out for those that cannot (threads)."""
    futs = [asyncio.ensure_future(a) for a in aws]
    if not futs:
        return []
    cancelled = False
    while True:
        try:
            await asyncio.wait(futs)
            break
        except asyncio.CancelledError:
            cancelled = True
            for f in futs:
                f.cancel()  # a to_thread future ignores it: its thread runs on, and we wait for it
    errors = [f.exception() for f in futs if not f.cancelled() and f.exception() is not None]
    if cancelled or any(f.cancelled() for f in futs):
        raise asyncio.CancelledError
    if errors:
        raise errors[0]  # type: ignore[misc]
    return [f.result() for f in futs]
