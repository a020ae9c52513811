"""SyncPool: the pool for callers on plain threads (serving engines call their KV stores from threads).

The :class:`~kvpool.KVPool` lives on an event loop of its own, in a daemon thread this object starts; every
method hands its coroutine to that loop and blocks the calling thread (never the loop) until it is done.
Many threads may call at once: their calls run concurrently on the loop. :meth:`SyncPool.submit` returns a
:class:`concurrent.futures.Future` instead of blocking, for callers that overlap a restore with their own work.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from types import TracebackType
from typing import Any, TypeVar

import torch

from .errors import PoolClosedError
from .layout import KVLayout
from .pool.facade import KVPool
from .pool.opening import Opening
from .types import PoolStats, Tokens

__all__ = ["SyncPool"]

T = TypeVar("T")


class _LoopThread:
    """An event loop running forever in a daemon thread (uvloop when installed)."""

    def __init__(self, name: str) -> None:
        try:
            import uvloop

            self.loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        except ImportError:  # pragma: no cover - uvloop is an optional extra
            self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        self.loop.close()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            if threading.current_thread() is not self._thread:
                self._thread.join()

    @property
    def thread(self) -> threading.Thread:
        return self._thread


class SyncPool:
    """A :class:`~kvpool.KVPool` for synchronous callers; safe to use from many threads.

    Build one with :meth:`SyncPool.open` (the same arguments as :meth:`KVPool.open`) or
    :meth:`SyncPool.from_config`; use it as a context manager or call :meth:`close`.
    """

    def __init__(self, pool: KVPool, loop_thread: _LoopThread) -> None:
        self._pool = pool
        self._lt = loop_thread

    # --- construction ------------------------------------------------------------------------------------
    @classmethod
    def _start(cls, make: Callable[[], Opening[KVPool] | Awaitable[KVPool]]) -> SyncPool:
        lt = _LoopThread("kvpool-loop")

        async def build() -> KVPool:
            return await make()

        try:
            pool = lt.submit(build()).result()
        except BaseException:
            lt.stop()
            raise
        return cls(pool, lt)

    @classmethod
    def open(
        cls,
        *,
        layout: KVLayout,
        model_id: str,
        backends: Sequence[Any],
        namespace: str = "",
        config: Any = None,
    ) -> SyncPool:
        """Open a pool on its own loop thread; the arguments are those of :meth:`KVPool.open`."""
        return cls._start(
            lambda: KVPool.open(layout=layout, model_id=model_id, backends=backends, namespace=namespace,
                                config=config)
        )

    @classmethod
    def from_config(cls, source: Any, **overrides: Any) -> SyncPool:
        """Open a pool from a config file or mapping; see :meth:`KVPool.from_config`."""
        return cls._start(lambda: KVPool.from_config(source, **overrides))

    # --- plumbing ----------------------------------------------------------------------------------------
    @property
    def pool(self) -> KVPool:
        """The async pool underneath (use it only from :attr:`loop`)."""
        return self._pool

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the pool runs on."""
        return self._lt.loop

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coro`` on the pool's loop; return its future without waiting.

        Cancelling the returned future cancels the coroutine on the loop.
        """
        if self._pool.closed:
            coro.close()
            raise PoolClosedError("the pool is closed")
        return self._lt.submit(coro)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._lt.thread:
            coro.close()
            raise RuntimeError("SyncPool methods block: call them from another thread, not from its own loop")
        fut = self.submit(coro)
        try:
            return fut.result()
        except BaseException:
            fut.cancel()  # a KeyboardInterrupt in the caller cancels the call on the loop too
            raise

    # --- the pool's API as plain calls -----------------------------------------------------------------
    @property
    def layout(self) -> KVLayout:
        return self._pool.layout

    @property
    def closed(self) -> bool:
        return self._pool.closed

    def keys_for(self, tokens: Tokens, max_chunks: int | None = None) -> list[bytes]:
        """The chunk keys of ``tokens`` (pure: no I/O)."""
        return self._pool.keys_for(tokens, max_chunks)

    def put(self, tokens: Tokens, kv: Any) -> int:
        """See :meth:`KVPool.put`."""
        return self._call(self._pool.put(tokens, kv))

    def lookup(self, tokens: Tokens) -> int:
        """See :meth:`KVPool.lookup`."""
        return self._call(self._pool.lookup(tokens))

    def get(self, tokens: Tokens) -> torch.Tensor:
        """See :meth:`KVPool.get`."""
        return self._call(self._pool.get(tokens))

    def get_into(self, tokens: Tokens, out: Any) -> int:
        """See :meth:`KVPool.get_into`."""
        return self._call(self._pool.get_into(tokens, out))

    def prefetch(self, tokens: Tokens) -> int:
        """See :meth:`KVPool.prefetch`."""
        return self._call(self._pool.prefetch(tokens))

    def delete(self, tokens: Tokens) -> int:
        """See :meth:`KVPool.delete`."""
        return self._call(self._pool.delete(tokens))

    def flush(self) -> None:
        """See :meth:`KVPool.flush`."""
        self._call(self._pool.flush())

    def stats(self) -> PoolStats:
        """See :meth:`KVPool.stats` (read on the loop, so counters are consistent)."""

        async def read() -> PoolStats:
            return self._pool.stats()

        return self._call(read())

    def close(self) -> None:
        """Close the pool and stop its loop thread. Idempotent."""
        if self._lt.thread.is_alive():
            try:
                if not self._pool.closed:
                    self._call(self._pool.close())
            finally:
                self._lt.stop()

    def __enter__(self) -> SyncPool:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SyncPool({self._pool!r})"
