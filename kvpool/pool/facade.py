"""KVPool: the façade a serving engine talks to.

It turns prompts into chunk keys, asks the tiers (fastest first) which chunks they hold, and moves bytes
between the caller's tensors and the tiers with zero packing copies: a chunk of the caller's
``[L, 2, T, H, D]`` tensor is a strided view whose row-major bytes are the stored object.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any, cast

import torch

from ..config import PoolConfig
from ..cuda.host import register_host_memory
from ..cuda.paged_kv import PagedKV
from ..errors import ConfigError, LayoutError, PoolClosedError
from ..keys import PrefixHasher, as_token_array
from ..layout import KVLayout
from ..storage.backend import Backend
from ..storage.buffers import aligned_empty
from ..storage.staging import StagingArena, default_staging_bytes
from .background import Background
from .calls import CallGate, in_flight
from .inputs import check_config, check_device
from .paged import put_paged, restore_paged
from .attention import per_chunk_mass
from .streaming import stream_layers
from .tiers import TierSet, tier_from_spec
from ..types import PoolStats, Tokens
from .observe import describe_tiers, log_delete, log_open, timed, timed_stream
from .opening import Opening

__all__ = ["KVPool"]

_DEFAULT_PREFETCH_LAYERS = 4


class KVPool:
    """An async KV-cache pool over one or more tiers.

    Build one with :meth:`KVPool.open`; use it as an async context manager or call :meth:`close`.

    Parameters
    ----------
    layout
        The model's KV geometry.
    model_id
        Names the model; part of every key.
    tiers
        Open backends, fastest first.
    config
        Pool-wide options.
    """

    def __init__(self, layout: KVLayout, model_id: str, tiers: Sequence[Backend], config: PoolConfig) -> None:
        self.layout = layout
        self.model_id = model_id
        self.config = config
        self.tiers: list[Backend] = list(tiers)
        # the optional surfaces, from each tier's declared capabilities, once (never probed per call)
        self._hinted = [t for t in self.tiers if t.capabilities.eviction_hints]
        self._durable = [t for t in self.tiers if t.capabilities.durable]
        # locate, read with fallback, store across tiers; every data call goes through a tier's scheduler
        self._tiers = TierSet(self.tiers, config)
        self._io = self._tiers.io
        self._gate = CallGate()  # close() waits for the calls in flight
        self._hasher = PrefixHasher(model_id, layout.fingerprint, layout.chunk_tokens, config.namespace)
        self._closed = False
        self._counters: dict[str, int] = {
            "puts": 0,
            "chunks_written": 0,
            "chunks_skipped": 0,
            "lookups": 0,
            "gets": 0,
            "hit_tokens": 0,
            "miss_tokens": 0,
            "promotions": 0,
            "read_failures": 0,
            "prefetches": 0,
            "prefetch_joins": 0,
            "write_backs": 0,
            "write_back_failures": 0,
            "attention_observations": 0,
        }
        self._opened_at = time.time()
        # The pool's own host memory, populated now (in a background thread) rather than on a request's data
        # path; results feed host-to-device copies, so it is page-locked once when CUDA is present.
        # A tier that shares it with another process (a vhost-user target DMAs into it) needs it in a memfd.
        self._staging = StagingArena(
            config.staging_bytes or default_staging_bytes(layout), overflow_bytes=config.staging_overflow_bytes,
            on_ready=register_host_memory if torch.cuda.is_available() else None,
            shared=any(t.capabilities.host_memory == "shared" for t in self.tiers),
        )
        # write-back, promotion and prefetch, each bounded in bytes
        self._bg = Background(self._tiers, layout.chunk_nbytes, config, self._counters, self._chunk_buffer)

    # --- lifecycle ---------------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        *,
        layout: KVLayout,
        model_id: str,
        backends: Sequence[str | Backend | Sequence[str | Backend]],
        namespace: str = "",
        config: PoolConfig | dict[str, Any] | None = None,
    ) -> Opening[KVPool]:
        """Open the backends (fastest tier first): ``pool = await KVPool.open(...)`` or
        ``async with KVPool.open(...) as pool:`` (closed on exit).

        A list inside ``backends`` is one tier striped over its members. ``config`` holds the pool options
        (:class:`~kvpool.PoolConfig` or a mapping of its fields, e.g. ``{"write_policy": "write-back"}``).

        Raises
        ------
        ConfigError
            For a bad spec string, an unknown scheme (the message lists the known ones) or no backends.
        """
        return Opening(lambda: cls._open(layout=layout, model_id=model_id, backends=backends,
                                         namespace=namespace, config=config))

    @classmethod
    def from_config(cls, source: Any = None, **overrides: Any) -> Opening[KVPool]:
        """Open a pool from a TOML/YAML file, a mapping, or ``KVPOOL_*`` environment variables.

        ``pool = await KVPool.from_config("kvpool.toml")`` or ``async with KVPool.from_config(...) as pool:``.
        ``source`` and the schema are described in :func:`kvpool.config.load_settings` and
        docs/configuration.md; ``KVPOOL_*`` variables override the file, ``overrides`` (any key of the schema,
        e.g. ``model_id=``) override both. Errors in the settings raise :class:`~kvpool.ConfigError` before
        any tier opens.
        """
        from ..config import load_settings

        s = load_settings(source, **overrides)
        return cls.open(layout=s.layout, model_id=s.model_id, backends=[list(b) if isinstance(b, tuple) else b
                                                                         for b in s.backends],
                        config=s.config)

    @classmethod
    async def _open(
        cls,
        *,
        layout: KVLayout,
        model_id: str,
        backends: Sequence[str | Backend | Sequence[str | Backend]],
        namespace: str = "",
        config: PoolConfig | dict[str, Any] | None = None,
    ) -> KVPool:
        """Open the backends (fastest tier first) and return a ready pool (see :meth:`open`).

        Raises
        ------
        ConfigError
            For a bad spec string, an unknown scheme (the message lists the known ones) or no backends.
        """
        if not isinstance(layout, KVLayout):
            raise LayoutError(f"layout must be a kvpool.KVLayout, got {type(layout).__name__}")
        if not isinstance(model_id, str) or not model_id:
            raise ConfigError("model_id must be a non-empty str")
        if isinstance(backends, (str, Backend)) or not backends:
            raise ConfigError("backends must be a non-empty list of spec strings or Backend objects")
        if isinstance(config, dict):
            config = PoolConfig.from_dict(config)
        config = config or PoolConfig()
        if namespace:
            import attrs

            config = attrs.evolve(config, namespace=namespace)
        t_open = time.perf_counter()
        check_config(config)  # before any tier holds a lock, a ring or a connection
        tiers = [tier_from_spec(b) for b in backends]
        opened: list[Backend] = []
        try:
            for t in tiers:
                await t.open()
                opened.append(t)
            pool = cls(layout, model_id, tiers, config)
            try:
                # tiers that read into the staging arena with no copy learn of it before the first request
                for t in tiers:
                    if t.capabilities.host_memory != "none":
                        await t.attach_staging(pool._staging)
            except BaseException:
                pool._staging.close()
                raise
            log_open(pool, time.perf_counter() - t_open)
            return pool
        except BaseException:
            # whatever failed after a tier opened: close every tier this call opened, then report
            for t in reversed(opened):
                try:
                    await t.close()
                except Exception:  # noqa: BLE001 - the original error is the one to report
                    pass
            raise

    async def close(self) -> None:
        """Close every tier. Idempotent."""
        if self._closed:
            return
        # refuse new calls, let those in flight finish, then the background work, then the tiers
        self._gate.closing = True
        await self._gate.wait_idle()
        await self._bg.drain()
        self._closed = True
        errors: list[BaseException] = []
        for t in self.tiers:
            try:
                await t.close()
            except Exception as exc:  # close them all, then report
                errors.append(exc)
        self._staging.close()  # after the tiers: a tier that registered or shared the arena is done with it
        if errors:
            raise errors[0]

    aclose = close

    async def __aenter__(self) -> KVPool:
        self._check_open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed or self._gate.closing:
            raise PoolClosedError("the pool is closed")

    # --- keys --------------------------------------------------------------------------------------------
    async def ready(self) -> float:
        """Wait until the pool's staging memory is populated and registered with the tiers' devices (io_uring
        fixed buffers; ``open`` returns before); return the seconds population took. Requests made earlier are
        served, from the part already populated."""
        return await self._staging.wait_ready()

    def empty(self, tokens_or_n: Any) -> torch.Tensor:
        """An uninitialised ``[L, 2, T, H, D]`` tensor in the pool's staging memory, for zero-copy :meth:`get_into`.

        ``tokens_or_n`` is a token count or the tokens themselves (``T = len(tokens)``). The memory is
        populated, aligned for direct I/O and page-locked when CUDA is present; it returns to the pool when the
        tensor (and every view of it) is dropped. When the staging memory is all in use, the tensor is an
        aligned huge-page allocation instead (still direct-readable, counted as a staging fallback).
        """
        n = tokens_or_n if isinstance(tokens_or_n, int) and not isinstance(tokens_or_n, bool) else len(tokens_or_n)
        if n < 0:
            raise ValueError(f"a tensor for {n} tokens?")
        shape = self.layout.kv_shape(n)
        t = self._staging.try_empty(shape, self.layout.dtype)
        if t is None:
            self._staging.fallbacks += 1
            t = aligned_empty(shape, self.layout.dtype)
        return t

    def keys_for(self, tokens: Tokens, max_chunks: int | None = None) -> list[bytes]:
        """The chunk keys of ``tokens`` (one per full chunk)."""
        return self._hasher.keys(tokens, max_chunks)

    async def _locate(self, keys: list[bytes]) -> list[int]:
        """For the longest prefix of ``keys`` held somewhere: the index of the fastest tier holding each
        (see :meth:`TierSet.locate`: a lower tier is asked only about the keys the tiers above lack)."""
        return await self._tiers.locate(keys) if keys else []

    # --- API ---------------------------------------------------------------------------------------------
    @in_flight
    @timed("put")
    async def put(self, tokens: Tokens, kv: torch.Tensor | PagedKV) -> int:
        """Store the KV of every full chunk of ``tokens``; return the number of tokens now stored.

        ``kv`` is ``[num_layers, 2, len(tokens), num_kv_heads, head_dim]``. A trailing partial chunk is
        ignored; chunks already stored are not written again. Each chunk goes to every tier that can take it
        (write-through; write-back: the first tier, and the lower tiers for what it cannot take); a tier that
        fails or is full is skipped and counted (``stats()["tiers"][i]["faults"]``). The return value is the
        prefix that is readable afterwards; it is less than asked only when some chunk fit in no tier.

        Raises
        ------
        CapacityError, BackendError
            Only when no tier could store the first chunk (nothing was stored).
        TypeError, ValueError, LayoutError
            For bad tokens or a tensor that does not match the layout, is on the ``meta`` device or on a
            device kvpool cannot move.
        """
        self._check_open()
        if isinstance(kv, PagedKV):  # a paged (vLLM-style) source: gathered on its device, once per layer
            return await put_paged(self, tokens, kv)
        arr = as_token_array(tokens)
        check_device(kv)
        self.layout.check_kv(kv)
        if kv.shape[2] != len(arr):
            raise LayoutError(f"kv holds {kv.shape[2]} tokens but {len(arr)} tokens were given")
        keys = self._hasher.keys(arr)
        self._counters["puts"] += 1
        if not keys:
            return 0
        write_back = self.config.write_policy == "write-back" and len(self.tiers) > 1
        views = [self.layout.chunk_view(kv, i) for i in range(len(keys))]
        res = await self._tiers.store(keys, views, write_back=write_back)
        self._counters["chunks_written"] += res.written
        self._counters["chunks_skipped"] += res.skipped
        keys = keys[: res.stored]
        for tier in self._hinted:  # prefix-aware eviction learns which chunks others depend on
            for parent, child in zip(keys, keys[1:]):
                tier.hint_prefix(parent, child)
        if write_back:  # waits while the write-back queue is full (back-pressure)
            await self._bg.write_back([keys[i] for i in res.top])
        return len(keys) * self.layout.chunk_tokens

    @in_flight
    async def prefetch(self, tokens: Tokens) -> int:
        """Start moving the cached prefix of ``tokens`` into the fastest tier; return at once.

        Meant for a request still waiting in the server's queue. Returns the cached prefix length in tokens.
        A later :meth:`get`/:meth:`get_into`/:meth:`stream` of the same chunks waits for the move in flight
        instead of issuing its own reads from the slow tier. Moves in flight are bounded by
        ``promotion_queue_bytes``; beyond it a prefetch is dropped and counted (``prefetches_dropped``).
        """
        self._check_open()
        keys = self._hasher.keys(tokens)
        where = await self._locate(keys)
        if self._bg.prefetch(keys, where):
            self._counters["prefetches"] += 1
        return len(where) * self.layout.chunk_tokens

    async def _join_moves(self, keys: list[bytes]) -> None:
        if await self._bg.join_moves(keys):
            self._counters["prefetch_joins"] += 1

    async def _chunk_buffer(self, n: int) -> torch.Tensor:
        """``n`` chunks of staging memory (``[n, chunk_nbytes]`` bytes), for a background copy."""
        return await self._staging.acquire((n, self.layout.chunk_nbytes), torch.uint8,
                                           wait_s=self.config.staging_wait_s)

    @in_flight
    async def observe_attention(self, tokens: Tokens, scores: Any) -> None:
        """Feed the model's attention mass for a prompt to attention-aware eviction.

        ``scores`` is per chunk (``len == number of full chunks``) or per token (``len >= chunks *
        chunk_tokens``; summed per chunk), e.g. the attention each cached token received while decoding.
        Tiers whose policy keeps scores (``policy=attention``) use it; the others ignore it.
        """
        self._check_open()
        keys = self._hasher.keys(tokens)
        if not keys:
            return
        values = per_chunk_mass(scores, len(keys), self.layout.chunk_tokens)
        for tier in self._hinted:
            for k, m in zip(keys, values):
                tier.hint_attention(k, m)
        self._counters["attention_observations"] += 1

    @in_flight
    @timed("lookup")
    async def lookup(self, tokens: Tokens) -> int:
        """Length in tokens of the longest cached prefix of ``tokens`` (a multiple of ``chunk_tokens``)."""
        self._check_open()
        self._counters["lookups"] += 1
        keys = self._hasher.keys(tokens)
        return len(await self._locate(keys)) * self.layout.chunk_tokens

    @in_flight
    @timed("get")
    async def get(self, tokens: Tokens) -> torch.Tensor:
        """The KV of the longest cached prefix: a new tensor ``[L, 2, hit, H, D]`` (``hit`` may be 0)."""
        self._check_open()
        keys = self._hasher.keys(tokens)
        await self._join_moves(keys)
        where = await self._locate(keys)
        out = await self._staging.acquire(self.layout.kv_shape(len(where) * self.layout.chunk_tokens),
                                          self.layout.dtype, wait_s=self.config.staging_wait_s)
        n = await self._read_chunks(keys, where, out)
        self._account(len(keys), n)
        if n < out.shape[2]:
            return out[:, :, :n].contiguous()
        return out

    @in_flight
    @timed("get")
    async def get_into(self, tokens: Tokens, out: torch.Tensor | PagedKV) -> int:
        """Fill ``out[:, :, :n]`` with the cached prefix's KV and return ``n``.

        ``out`` is ``[L, 2, T, H, D]`` of the pool's dtype (CPU or CUDA), or a :class:`~kvpool.PagedKV`
        (vLLM-style per-layer block caches + block table: each layer is scattered into its blocks with one
        launch; use :func:`kvpool.restore_paged` directly to get per-layer CUDA events instead of waiting
        here). At most ``T // chunk_tokens`` chunks are restored. ``out[:, :, n:]`` is left unspecified.
        """
        self._check_open()
        if isinstance(out, PagedKV):  # scatter each layer into the blocks, one launch per layer
            hit, _events = await restore_paged(self, tokens, out)
            _events.synchronize()
            return hit
        check_device(out, "out")
        self.layout.check_kv(out, name="out")
        if out.shape[2] < self.layout.chunk_tokens:
            raise ValueError(
                f"out holds {out.shape[2]} tokens, fewer than one chunk ({self.layout.chunk_tokens}): nothing fits"
            )
        keys = self._hasher.keys(tokens, max_chunks=out.shape[2] // self.layout.chunk_tokens)
        await self._join_moves(keys)
        where = await self._locate(keys)
        n = await self._read_chunks(keys, where, out)
        self._account(len(keys), n)
        return n

    @timed_stream
    async def stream(
        self, tokens: Tokens, *, prefetch_layers: int = _DEFAULT_PREFETCH_LAYERS, layer_time: float | None = None
    ) -> AsyncIterator[tuple[int, torch.Tensor]]:
        """Yield ``(layer, x)`` for each layer in order, ``x`` = ``[2, hit, H, D]`` of the cached prefix.

        Up to ``prefetch_layers`` later layers are read while the caller works on the current one. With
        ``layer_time`` (the model's estimated compute seconds per layer), layer *i*'s reads carry the deadline
        ``start + i * layer_time`` and the scheduler serves the most urgent layer of all concurrent restores
        first; background I/O uses only the slack. Nothing is
        yielded when nothing is cached. If an object vanishes after its first layers were yielded (evicted,
        corrupt), :class:`~kvpool.RestoreError` is raised naming the layer.
        """
        self._check_open()
        if prefetch_layers < 0:
            raise ValueError("prefetch_layers must be >= 0")
        keys = self._hasher.keys(tokens)
        await self._join_moves(keys)
        where = await self._locate(keys)
        self._account(len(keys), len(where) * self.layout.chunk_tokens)
        if not where:
            return
        layers = stream_layers(
            layout=self.layout, keys=keys, where=where, read_views=self._read_views, gate=self._gate,
            acquire=lambda shape: self._staging.acquire(shape, self.layout.dtype, wait_s=self.config.staging_wait_s),
            prefetch_layers=prefetch_layers, layer_time=layer_time,
        )
        try:
            async for item in layers:
                yield item
        finally:
            await layers.aclose()  # the reads still in flight are cancelled and awaited

    @in_flight
    async def delete(self, tokens: Tokens) -> int:
        """Remove every full chunk of ``tokens`` from every tier; return the tokens that were stored."""
        self._check_open()
        keys = self._hasher.keys(tokens)
        removed = await self._tiers.delete_all(keys)  # a down tier is counted (delete_failures), not raised
        log_delete(self, removed)
        return removed * self.layout.chunk_tokens

    @in_flight
    async def flush(self) -> None:
        """Finish background write-backs, then make everything stored so far durable on the persistent
        tiers (power-loss safe)."""
        self._check_open()
        await self._bg.drain()
        for tier in self._durable:
            await tier.flush()

    def __repr__(self) -> str:
        lay = self.layout
        head = (f"<KVPool {self.model_id!r} {'closed' if self._closed else 'open'}: {lay.num_layers} layers x "
                f"{lay.num_kv_heads} kv heads x {lay.head_dim} {str(lay.dtype).removeprefix('torch.')}, "
                f"{lay.chunk_tokens} tokens/chunk")
        try:
            return f"{head}; tiers {describe_tiers(self)}>"
        except Exception:  # noqa: BLE001 - a repr must not raise (a tier half torn down)
            return head + ">"

    def stats(self) -> PoolStats:
        """Counters of the pool and of each tier (a plain dict; :class:`kvpool.types.PoolStats` says its keys)."""
        # a plain dict (JSON-ready); PoolStats names its keys for type checkers
        return cast(PoolStats, {
            "model_id": self.model_id,
            "layout": {
                "num_layers": self.layout.num_layers,
                "num_kv_heads": self.layout.num_kv_heads,
                "head_dim": self.layout.head_dim,
                "dtype": str(self.layout.dtype),
                "chunk_tokens": self.layout.chunk_tokens,
                "chunk_bytes": self.layout.chunk_nbytes,
            },
            **self._counters,
            "staging": self._staging.stats(),
            "background": {"tasks": self._bg.tasks, "queued_bytes": self._bg.queued_bytes()},
            "tiers": [
                {**t.stats(), "io": io.stats(), "faults": dict(f), "last_fault": e}
                for t, io, f, e in zip(self.tiers, self._io, self._tiers.faults, self._tiers.last_error)
            ],
        })

    # --- data movement -----------------------------------------------------------------------------------
    def _account(self, asked_chunks: int, hit_tokens: int) -> None:
        self._counters["gets"] += 1
        self._counters["hit_tokens"] += hit_tokens
        self._counters["miss_tokens"] += asked_chunks * self.layout.chunk_tokens - hit_tokens

    async def _read_chunks(self, keys: list[bytes], where: list[int], out: torch.Tensor) -> int:
        views = [self.layout.chunk_view(out, c) for c in range(len(where))]
        n = await self._read_views(keys, where, views, 0)
        if n and self.config.promote_on_hit and len(self.tiers) > 1:
            # after the caller has its bytes: queued, read again from below in the background (bounded)
            self._bg.promote(keys[:n], where[:n])
        return n * self.layout.chunk_tokens

    async def _read_views(
        self, keys: list[bytes], where: list[int], views: list[torch.Tensor], offset: int
    ) -> int:
        """Read chunk ``c`` into ``views[c]`` from tier ``where[c]`` (falling back to lower tiers that hold
        it); return the number of leading chunks that were read."""
        n = await self._tiers.read_views(keys, where, views, offset)
        self._counters["read_failures"] += len(where) - n  # chunks located but readable in no tier
        return n
