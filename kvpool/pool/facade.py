"""KVPool: the façade a serving engine talks to.

It turns prompts into chunk keys, asks the tiers (fastest first) which chunks they hold, and moves bytes
between the caller's tensors and the tiers with zero packing copies: a chunk of the caller's
``[L, 2, T, H, D]`` tensor is a strided view whose row-major bytes are the stored object.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any

import torch

from ..config import PoolConfig
from ..cuda.host import register_host_memory
from ..cuda.paged_kv import PagedKV
from ..errors import ConfigError, KVPoolError, LayoutError, PoolClosedError, RestoreError
from ..keys import PrefixHasher, as_token_array
from ..layout import KVLayout
from ..storage.backend import Backend, ReadRequest
from ..storage.buffers import aligned_empty
from ..storage.staging import StagingArena, default_staging_bytes
from ..storage.registry import backend_from_spec
from ..striped.backend import StripedBackend
from .paged import put_paged, restore_paged
from .scheduler import Priority, TierScheduler, io_class

__all__ = ["KVPool"]

_DEFAULT_PREFETCH_LAYERS = 4


def _tier_from_spec(spec: Any) -> Backend:
    """A spec string or backend object is one tier; a list of them is one tier striped across them."""
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ConfigError("a striped tier needs at least one backend")
        striped: Backend = StripedBackend.from_specs(list(spec))
        return striped
    return backend_from_spec(spec)


class _Admission:
    """Second-hit admission for promotions: a chunk is copied up only when it was read from a lower tier
    before, recently. A one-off scan of cold prefixes then never floods the fast tier."""

    def __init__(self, size: int = 65536) -> None:
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._size = size

    def admit(self, key: bytes) -> bool:
        if key in self._seen:
            del self._seen[key]
            return True
        self._seen[key] = None
        if len(self._seen) > self._size:
            self._seen.popitem(last=False)
        return False


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
        # every data call to a tier goes through its scheduler (priorities, deadlines, queue depth)
        self._io = [
            TierScheduler(t, max_inflight=config.io_max_inflight, max_inflight_bytes=config.io_max_inflight_bytes,
                          background_inflight=config.io_background_inflight,
                          op_bytes=config.io_op_bytes)
            for t in self.tiers
        ]
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
        self._admission = _Admission()
        # The pool's own host memory, populated now (in a background thread) rather than on a request's data
        # path; results feed host-to-device copies, so it is page-locked once when CUDA is present.
        self._staging = StagingArena(
            config.staging_bytes or default_staging_bytes(layout),
            on_ready=register_host_memory if torch.cuda.is_available() else None,
        )
        # chunk key -> background move (prefetch) in flight; a restore of that key waits for it
        self._moving: dict[bytes, asyncio.Future[None]] = {}
        self._background: set[asyncio.Task[None]] = set()

    # --- lifecycle ---------------------------------------------------------------------------------------
    @classmethod
    async def open(
        cls,
        *,
        layout: KVLayout,
        model_id: str,
        backends: Sequence[str | Backend],
        namespace: str = "",
        config: PoolConfig | dict[str, Any] | None = None,
    ) -> KVPool:
        """Open the backends (fastest tier first) and return a ready pool.

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
        tiers = [_tier_from_spec(b) for b in backends]
        opened: list[Backend] = []
        try:
            for t in tiers:
                await t.open()
                opened.append(t)
        except BaseException:
            for t in reversed(opened):
                await t.close()
            raise
        return cls(layout, model_id, tiers, config)

    async def close(self) -> None:
        """Close every tier. Idempotent."""
        if self._closed:
            return
        await self._drain_background()
        self._closed = True
        self._staging.close()
        errors: list[BaseException] = []
        for t in self.tiers:
            try:
                await t.close()
            except Exception as exc:  # close them all, then report
                errors.append(exc)
        if errors:
            raise errors[0]

    aclose = close

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _drain_background(self) -> None:
        """Wait for prefetches and write-backs (they are part of what flush/close promise)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

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
        if self._closed:
            raise PoolClosedError("the pool is closed")

    # --- keys --------------------------------------------------------------------------------------------
    async def ready(self) -> float:
        """Wait until the pool's staging memory is populated (``open`` returns before); return the seconds that
        took. Requests made earlier are served, from the part already populated."""
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

    def keys_for(self, tokens: Any, max_chunks: int | None = None) -> list[bytes]:
        """The chunk keys of ``tokens`` (one per full chunk)."""
        return self._hasher.keys(tokens, max_chunks)

    async def _locate(self, keys: list[bytes]) -> list[int]:
        """For the longest prefix of ``keys`` held somewhere: the index of the fastest tier holding each."""
        if not keys:
            return []
        where: list[int] = []
        remaining = keys
        # Ask the fastest tier first; only the keys it lacks go further down.
        found: list[list[bool]] = []
        for tier in self.tiers:
            found.append(await tier.contains_many(remaining) if remaining else [])
        for i in range(len(keys)):
            for t, f in enumerate(found):
                if f[i]:
                    where.append(t)
                    break
            else:
                break
        return where

    # --- API ---------------------------------------------------------------------------------------------
    async def put(self, tokens: Any, kv: torch.Tensor | PagedKV) -> int:
        """Store the KV of every full chunk of ``tokens``; return the number of tokens now stored.

        ``kv`` is ``[num_layers, 2, len(tokens), num_kv_heads, head_dim]``. A trailing partial chunk is
        ignored; chunks already stored are not written again. If a write fails, the chunks this call wrote
        are removed again and the error propagates: the pool is as it was.
        """
        self._check_open()
        if isinstance(kv, PagedKV):  # a paged (vLLM-style) source: gathered on its device, once per layer
            return await put_paged(self, tokens, kv)
        arr = as_token_array(tokens)
        self.layout.check_kv(kv)
        if kv.shape[2] != len(arr):
            raise LayoutError(f"kv holds {kv.shape[2]} tokens but {len(arr)} tokens were given")
        keys = self._hasher.keys(arr)
        self._counters["puts"] += 1
        if not keys:
            return 0
        written: list[tuple[Backend, bytes]] = []
        write_back = self.config.write_policy == "write-back" and len(self.tiers) > 1
        targets = self.tiers[:1] if write_back else self.tiers

        async def write_tier(tier: Backend) -> None:
            io = self._io[self.tiers.index(tier)]
            have = await tier.contains_many(keys)
            items = [(k, self.layout.chunk_view(kv, i)) for i, k in enumerate(keys) if not have[i]]
            self._counters["chunks_skipped"] += len(keys) - len(items)
            if items:
                try:
                    await io.write_many(items)
                finally:
                    # what did land must be undone if any tier fails
                    written.extend((tier, k) for k, _ in items)
                self._counters["chunks_written"] += len(items)

        try:
            if len(targets) == 1:
                await write_tier(targets[0])
            else:  # write-through: every tier at once; the put takes as long as the slowest
                results = await asyncio.gather(*(write_tier(t) for t in targets), return_exceptions=True)
                errors = [r for r in results if isinstance(r, BaseException)]
                if errors:
                    raise errors[0]
        except BaseException:
            for tier, k in written:
                try:
                    await tier.delete(k)
                except Exception:
                    pass
            raise
        for tier in self.tiers:
            link = getattr(getattr(tier, "policy", None), "link", None)
            if link is not None:  # prefix-aware eviction learns which chunks others depend on
                for parent, child in zip(keys, keys[1:]):
                    link(parent, child)
        if write_back:
            self._spawn(self._write_back(keys))
        return len(keys) * self.layout.chunk_tokens

    async def prefetch(self, tokens: Any) -> int:
        """Start moving the cached prefix of ``tokens`` into the fastest tier; return at once.

        Meant for a request still waiting in the server's queue. Returns the cached prefix length in tokens.
        A later :meth:`get`/:meth:`get_into`/:meth:`stream` of the same chunks waits for the move in flight
        instead of issuing its own reads from the slow tier.
        """
        self._check_open()
        keys = self._hasher.keys(tokens)
        where = await self._locate(keys)
        todo = [(k, t) for k, t in zip(keys, where) if t > 0 and k not in self._moving]
        if todo:
            loop = asyncio.get_running_loop()
            futs = {k: loop.create_future() for k, _ in todo}
            self._moving.update(futs)
            self._counters["prefetches"] += 1
            self._spawn(self._move_up(todo, futs))
        return len(where) * self.layout.chunk_tokens

    async def _move_up(self, todo: list[tuple[bytes, int]], futs: dict[bytes, asyncio.Future[None]]) -> None:
        buf = await self._staging.acquire((self.layout.chunk_nbytes,), torch.uint8, wait_s=self.config.staging_wait_s)
        prio = io_class(Priority.PREFETCH)
        prio.__enter__()
        try:
            for k, t in todo:
                try:
                    if await self._io[t].read_into(k, buf):
                        await self._io[0].write(k, buf)
                        self._counters["promotions"] += 1
                except Exception:
                    pass  # best effort: the restore reads from the lower tier instead
                finally:
                    self._moving.pop(k, None)
                    if not futs[k].done():
                        futs[k].set_result(None)
        finally:
            prio.__exit__()
            for k, f in futs.items():
                self._moving.pop(k, None)
                if not f.done():
                    f.set_result(None)

    async def _join_moves(self, keys: list[bytes]) -> None:
        if self._moving:
            pending = [self._moving[k] for k in keys if k in self._moving]
            if pending:
                self._counters["prefetch_joins"] += 1
                await asyncio.gather(*(asyncio.shield(f) for f in pending))

    async def observe_attention(self, tokens: Any, scores: Any) -> None:
        """Feed the model's attention mass for a prompt to attention-aware eviction.

        ``scores`` is per chunk (``len == number of full chunks``) or per token (``len >= chunks *
        chunk_tokens``; summed per chunk), e.g. the attention each cached token received while decoding.
        Tiers whose policy keeps scores (``policy=attention``) use it; the others ignore it.
        """
        self._check_open()
        keys = self._hasher.keys(tokens)
        if not keys:
            return
        mass = torch.as_tensor(scores, dtype=torch.float64).flatten()
        n, ct = len(keys), self.layout.chunk_tokens
        if mass.numel() == n:
            per_chunk = mass
        elif mass.numel() >= n * ct:
            per_chunk = mass[: n * ct].view(n, ct).sum(dim=1)
        else:
            raise ValueError(
                f"scores must have one value per chunk ({n}) or per token (>= {n * ct}), got {mass.numel()}"
            )
        if not torch.isfinite(per_chunk).all() or (per_chunk < 0).any():
            raise ValueError("attention scores must be finite and non-negative")
        values = per_chunk.tolist()
        for tier in self.tiers:
            observe = getattr(getattr(tier, "policy", None), "observe", None)
            if observe is not None:
                for k, m in zip(keys, values):
                    observe(k, m)
        self._counters["attention_observations"] += 1

    async def lookup(self, tokens: Any) -> int:
        """Length in tokens of the longest cached prefix of ``tokens`` (a multiple of ``chunk_tokens``)."""
        self._check_open()
        self._counters["lookups"] += 1
        keys = self._hasher.keys(tokens)
        return len(await self._locate(keys)) * self.layout.chunk_tokens

    async def get(self, tokens: Any) -> torch.Tensor:
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

    async def get_into(self, tokens: Any, out: torch.Tensor | PagedKV) -> int:
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
        self.layout.check_kv(out, name="out")
        keys = self._hasher.keys(tokens, max_chunks=out.shape[2] // self.layout.chunk_tokens)
        await self._join_moves(keys)
        where = await self._locate(keys)
        n = await self._read_chunks(keys, where, out)
        self._account(len(keys), n)
        return n

    async def stream(
        self, tokens: Any, *, prefetch_layers: int = _DEFAULT_PREFETCH_LAYERS, layer_time: float | None = None
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
        hit = len(where) * self.layout.chunk_tokens
        L = self.layout.num_layers
        shape = (2, hit, self.layout.num_kv_heads, self.layout.head_dim)

        start = time.monotonic()
        step = layer_time if layer_time is not None else 1e-6  # without an estimate: layer order

        async def read_layer(layer: int) -> torch.Tensor:
            x = await self._staging.acquire(shape, self.layout.dtype, wait_s=self.config.staging_wait_s)
            off = self.layout.layer_offset(layer)
            with io_class(Priority.FOREGROUND, start + layer * step):
                ok = await self._read_views(
                    keys, where, [self.layout.layer_chunk_view(x, c) for c in range(len(where))], off
                )
            if ok < len(where):
                raise RestoreError(f"chunk {ok} of the prefix could not be read at layer {layer}", layer)
            return x

        pending: dict[int, asyncio.Task[torch.Tensor]] = {}
        try:
            for layer in range(L):
                for nxt in range(layer, min(L, layer + 1 + prefetch_layers)):
                    if nxt not in pending:
                        pending[nxt] = asyncio.ensure_future(read_layer(nxt))
                x = await pending.pop(layer)
                yield layer, x
        finally:
            for t in pending.values():
                t.cancel()
            if pending:
                await asyncio.gather(*pending.values(), return_exceptions=True)

    async def delete(self, tokens: Any) -> int:
        """Remove every full chunk of ``tokens`` from every tier; return the tokens that were stored."""
        self._check_open()
        keys = self._hasher.keys(tokens)
        removed = set()
        for tier in self.tiers:
            for i, k in enumerate(keys):
                if await tier.delete(k):
                    removed.add(i)
        return len(removed) * self.layout.chunk_tokens

    async def flush(self) -> None:
        """Finish background write-backs, then make everything stored so far durable on the persistent
        tiers (power-loss safe)."""
        self._check_open()
        await self._drain_background()
        for tier in self.tiers:
            fl = getattr(tier, "flush", None)
            if fl is not None:
                await fl()

    def stats(self) -> dict[str, Any]:
        """Counters of the pool and of each tier."""
        return {
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
            "tiers": [{**t.stats(), "io": io.stats()} for t, io in zip(self.tiers, self._io)],
        }

    # --- data movement -----------------------------------------------------------------------------------
    def _account(self, asked_chunks: int, hit_tokens: int) -> None:
        self._counters["gets"] += 1
        self._counters["hit_tokens"] += hit_tokens
        self._counters["miss_tokens"] += asked_chunks * self.layout.chunk_tokens - hit_tokens

    async def _read_chunks(self, keys: list[bytes], where: list[int], out: torch.Tensor) -> int:
        views = [self.layout.chunk_view(out, c) for c in range(len(where))]
        n = await self._read_views(keys, where, views, 0)
        if n and self.config.promote_on_hit and len(self.tiers) > 1:
            await self._promote(keys[:n], where[:n], views[:n])
        return n * self.layout.chunk_tokens

    async def _read_views(
        self, keys: list[bytes], where: list[int], views: list[torch.Tensor], offset: int
    ) -> int:
        """Read chunk ``c`` into ``views[c]`` from tier ``where[c]`` (falling back to lower tiers that hold
        it); return the number of leading chunks that were read."""
        nch = len(where)
        ok = [False] * nch
        by_tier: dict[int, list[int]] = {}
        for c, t in enumerate(where):
            by_tier.setdefault(t, []).append(c)

        async def run(t: int, cs: list[int]) -> None:
            res = await self._io[t].read_many([ReadRequest(keys[c], views[c], offset) for c in cs])
            for c, r in zip(cs, res):
                ok[c] = r

        if len(by_tier) == 1:  # the common case: no task per tier
            await run(*next(iter(by_tier.items())))
        else:
            await asyncio.gather(*(run(t, cs) for t, cs in by_tier.items()))
        # A tier that failed a read (evicted meanwhile, corrupt) is not the last word: lower tiers may hold it.
        for c in range(nch):
            if ok[c]:
                continue
            self._counters["read_failures"] += 1
            for t in range(where[c] + 1, len(self.tiers)):
                try:
                    if await self._io[t].read_into(keys[c], views[c], offset):
                        where[c] = t
                        ok[c] = True
                        break
                except KVPoolError:
                    continue
            if not ok[c]:
                return c
        return nch

    async def _write_back(self, keys: list[bytes]) -> None:
        """Copy chunks from the first tier to the lower ones, in the background (write-back mode)."""
        top = self._io[0]
        buf = await self._staging.acquire((self.layout.chunk_nbytes,), torch.uint8, wait_s=self.config.staging_wait_s)
        with io_class(Priority.WRITE_BACK):
            await self._write_back_keys(keys, top, buf)

    async def _write_back_keys(self, keys: list[bytes], top: TierScheduler, buf: torch.Tensor) -> None:
        for k in keys:
            for lower in self.tiers[1:]:
                try:
                    if await lower.contains(k):
                        continue
                    if not await top.read_into(k, buf):
                        break  # evicted before it was written back: a cache may lose it
                    await self._io[self.tiers.index(lower)].write(k, buf)
                    self._counters["write_backs"] += 1
                except Exception:
                    self._counters["write_back_failures"] += 1

    async def _promote(self, keys: list[bytes], where: list[int], views: list[torch.Tensor]) -> None:
        """Copy chunks found in a lower tier into the tiers above it (best effort: a full tier skips)."""
        always = self.config.promotion == "always"
        for c, t in enumerate(where):
            if t == 0 or not (always or self._admission.admit(keys[c])):
                continue
            for upper in range(t):
                try:
                    with io_class(Priority.PROMOTION):
                        await self._io[upper].write(keys[c], views[c])
                    self._counters["promotions"] += 1
                except KVPoolError:
                    pass
