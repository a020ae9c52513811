"""What :meth:`KVPool.open` returns: awaitable *and* an async context manager.

``pool = await KVPool.open(...)`` and ``async with KVPool.open(...) as pool:`` both work (the latter closes the
pool on exit); so does the older ``async with await KVPool.open(...)``. The pool is opened only when the object
is awaited or entered, so building one and dropping it costs nothing and warns about nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Generator
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

__all__ = ["Opening"]


class _Closable(Protocol):
    async def close(self) -> None: ...


P = TypeVar("P", bound=_Closable)


class Opening(Generic[P]):
    """A pending open: ``await`` it for the pool, or ``async with`` it to have the pool closed on exit."""

    def __init__(self, make: Callable[[], Coroutine[Any, Any, P]], what: str = "pool") -> None:
        self._make = make
        self._what = what
        self._pool: P | None = None

    def __await__(self) -> Generator[Any, None, P]:
        return self._make().__await__()

    async def __aenter__(self) -> P:
        if self._pool is not None:
            raise RuntimeError(f"this {self._what} opening was already entered; call open() again for another")
        self._pool = await self._make()
        return self._pool

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    def __repr__(self) -> str:
        return f"<pending {self._what} open: await it or use 'async with'>"
