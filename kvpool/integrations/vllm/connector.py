"""KVPoolConnector: a vLLM v1 KV connector (``KVConnectorBase_V1``, vLLM 0.32) over a kvpool pool.

Processes. The pool lives in the worker process (it holds the KV caches), on the pool's own event loop in a
thread (:class:`kvpool.SyncPool`). The scheduler side (EngineCore process) asks that pool how much of a
prompt is cached through the worker's lookup service (:mod:`.lookup`, a Unix socket): the pool file is opened
once. With TP > 1 every rank holds its own pool (``{rank}`` in the backend specs, the rank in the namespace)
and the scheduler takes the minimum hit across ranks.

Per step (the scheduler's metadata drives the worker):

- loads: a request whose prompt has cached full chunks beyond vLLM's own prefix hit gets them restored into
  its blocks. ``start_load_kv`` starts every load of the step at once (one :meth:`kvpool.KVPool.stream` per
  request, on the pool's loop); ``wait_for_layer_load(layer)`` returns when that layer of every load is in the
  paged cache (one ``index_copy_`` per layer and request), while later layers are still being read. Reads
  carry deadlines from the model's measured layer time.
- saves: when a request's prefill completes, its prompt's full chunks are gathered from its blocks (one
  ``index_select`` per layer) and put into the pool, in the background; the request's blocks stay allocated
  until that is done (``request_finished`` -> ``get_finished``).
- failures: a chunk that cannot be restored (evicted, corrupt, a tier down, a timeout) is reported through
  ``get_block_ids_with_load_errors``, and vLLM recomputes from there (the connector sets vLLM's
  ``kv_load_failure_policy`` to ``recompute`` unless told otherwise). Nothing raises into the step.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

from ...config import PoolConfig
from ...errors import ConfigError, RestoreError
from ...sync import SyncPool
from .lookup import LookupClient, serve_lookups, socket_path
from .pages import PageFormat, unit_index, wide_rows

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

__all__ = ["KVPoolConnector", "KVPoolConnectorMetadata", "KVPoolConnectorStats"]

log = logging.getLogger("kvpool.vllm")

_EXTRA_KEYS = {
    "backends", "chunk_tokens", "namespace", "config", "model_id", "prefetch_layers", "load_timeout",
    "load_failure_policy", "backend_modules", "prometheus_port", "socket_dir", "lookup_timeout",
}
_OFFLOAD_BYTES = 4 << 20  # layer copies at least this large run in a worker thread (torch drops the GIL)


# --- metadata (scheduler -> worker, pickled) ----------------------------------------------------------------
@dataclass
class LoadSpec:
    req_id: str
    tokens: list[int]  # the prompt up to the end of the load (a multiple of chunk_tokens)
    block_ids: list[int]  # the request's blocks covering ``tokens``
    start_block: int  # blocks before this one are vLLM's own (prefix cache hit): not written


@dataclass
class SaveSpec:
    req_id: str
    tokens: list[int]  # the prompt's full chunks
    block_ids: list[int]


@dataclass
class KVPoolConnectorMetadata(KVConnectorMetadata):  # type: ignore[misc]
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    preempted: set[str] = field(default_factory=set)


# --- stats ---------------------------------------------------------------------------------------------------
_STAT_KEYS = ("loads", "load_tokens", "load_failed_blocks", "load_seconds", "load_stall_seconds", "saves",
              "save_tokens", "save_failures", "save_skipped")


@dataclass
class KVPoolConnectorStats(KVConnectorStats):  # type: ignore[misc]
    """Counters of one interval (summed over workers): loads, restored tokens, failed blocks, stall..."""

    def reset(self) -> None:
        self.data: dict[str, Any] = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for k, v in other.data.items():
            self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in self.data.items()}

    def is_empty(self) -> bool:
        return not any(self.data.values())


class KVPoolPromMetrics(KVConnectorPromMetrics):  # type: ignore[misc]
    """``vllm:kvpool_*`` counters in vLLM's Prometheus registry, fed from :class:`KVPoolConnectorStats`."""

    def __init__(self, vllm_config: Any, metric_types: Any, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters: dict[str, Any] = {}
        for key in _STAT_KEYS:
            c = self._counter_cls(name=f"vllm:kvpool_{key}", documentation=f"kvpool connector: {key}",
                                  labelnames=labelnames)
            self._counters[key] = {i: c.labels(*v) for i, v in per_engine_labelvalues.items()}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for key, v in transfer_stats_data.items():
            per_engine = self._counters.get(key)
            if per_engine is not None and engine_idx in per_engine and v:
                per_engine[engine_idx].inc(v)


# --- worker-side state ---------------------------------------------------------------------------------------
class _Load:
    """One request's restore in flight: per-layer events, the first failed block, a cancel flag."""

    def __init__(self, spec: LoadSpec, num_layers: int) -> None:
        self.spec = spec
        self.events = [threading.Event() for _ in range(num_layers)]
        self.lock = threading.Lock()  # held while a layer is written into the cache; cancel takes it
        self.cancelled = False
        self.bad_from: int | None = None  # index into spec.block_ids of the first block that is not valid
        self.future: Any = None
        self.hit = 0

    def fail_from(self, block: int) -> None:
        block = max(block, self.spec.start_block)
        if self.bad_from is None or block < self.bad_from:
            self.bad_from = block

    def cancel(self) -> None:
        with self.lock:  # after this no layer is written any more
            self.cancelled = True
        self.fail_from(self.spec.start_block)
        for e in self.events:
            e.set()

    def failed_block_ids(self) -> list[int]:
        if self.bad_from is None:
            return []
        return self.spec.block_ids[self.bad_from:]


@dataclass
class _Track:
    """Scheduler-side view of a request."""

    prompt: list[int] | None
    block_ids: list[int]
    loaded_to: int = 0
    save_done: bool = False


def _layer_index(name: str) -> int:
    from vllm.model_executor.models.utils import extract_layer_index

    return int(extract_layer_index(name))


class KVPoolConnector(KVConnectorBase_V1):  # type: ignore[misc]
    """vLLM KV connector over a kvpool pool (see the module docstring and docs/vllm.md)."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        unknown = sorted(set(extra) - _EXTRA_KEYS)
        if unknown:
            raise ConfigError(f"KVPoolConnector: unknown kv_connector_extra_config key(s) {unknown}; "
                              f"known: {sorted(_EXTRA_KEYS)}")
        if not extra.get("backends"):
            raise ConfigError("KVPoolConnector needs kv_connector_extra_config['backends'] (kvpool backend specs)")
        self._extra = extra
        self._chunk_tokens = int(extra.get("chunk_tokens", 256))
        self._block_size = int(vllm_config.cache_config.block_size)
        self._check_supported(vllm_config, kv_cache_config)
        par = vllm_config.parallel_config
        self._tp = int(par.tensor_parallel_size)
        self._dp_rank = int(getattr(par, "data_parallel_rank", 0) or 0)
        self._engine_id = str(self._kv_transfer_config.engine_id)
        self._socket_dir = extra.get("socket_dir")
        policy = extra.get("load_failure_policy", "recompute")
        if policy not in ("recompute", "fail"):
            raise ConfigError(f"load_failure_policy must be 'recompute' or 'fail', got {policy!r}")
        if self._kv_transfer_config.kv_load_failure_policy != policy:
            # a chunk that fails to load is recomputed, never an error (vLLM's default is 'fail')
            try:
                self._kv_transfer_config.kv_load_failure_policy = policy
            except Exception:  # pragma: no cover - a frozen config in another vLLM version
                log.warning("KVPoolConnector: could not set kv_load_failure_policy=%s", policy)
        self._producer = bool(self._kv_transfer_config.is_kv_producer)
        self._consumer = bool(self._kv_transfer_config.is_kv_consumer)
        if role == KVConnectorRole.SCHEDULER:
            self._init_scheduler()
        else:
            self._init_worker()

    # --- start-up checks ---------------------------------------------------------------------------------
    def _check_supported(self, vllm_config: Any, kv_cache_config: Any) -> None:
        par = vllm_config.parallel_config
        if int(par.pipeline_parallel_size) > 1:
            raise NotImplementedError("KVPoolConnector does not support pipeline parallelism "
                                      f"(pipeline_parallel_size={par.pipeline_parallel_size})")
        if int(getattr(par, "decode_context_parallel_size", 1) or 1) > 1:
            raise NotImplementedError("KVPoolConnector does not support decode context parallelism")
        if self._chunk_tokens <= 0 or self._chunk_tokens % self._block_size:
            raise ConfigError(f"chunk_tokens ({self._chunk_tokens}) must be a positive multiple of vLLM's "
                              f"block_size ({self._block_size})")
        if kv_cache_config is None:
            return
        groups = list(kv_cache_config.kv_cache_groups)
        from vllm.v1.kv_cache_interface import FullAttentionSpec, iter_layer_specs

        specs = [s for g in groups for s in iter_layer_specs(g.kv_cache_spec)]
        bad = [type(s).__name__ for s in specs if type(s) is not FullAttentionSpec]
        if len(groups) != 1 or bad or any(getattr(s, "sliding_window", None) for s in specs):
            raise NotImplementedError(
                "KVPoolConnector supports full-attention models with one KV cache group only; this model has "
                f"{len(groups)} group(s) with specs {sorted({type(s).__name__ for s in specs})} (hybrid, "
                "sliding-window, MLA and Mamba models are not supported)")
        self._attn_spec = specs[0]

    # ==========================================================================================================
    # scheduler side
    # ==========================================================================================================
    def _init_scheduler(self) -> None:
        timeout = float(self._extra.get("lookup_timeout", 10.0))
        self._clients = [
            LookupClient(socket_path(self._engine_id, r, self._dp_rank, self._socket_dir), timeout=timeout)
            for r in range(self._tp)
        ]
        self._pending_loads: dict[str, int] = {}
        self._reqs: dict[str, _Track] = {}
        self._saving: set[str] = set()

    def _cacheable_prompt(self, request: Request) -> list[int] | None:
        if getattr(request, "lora_request", None) is not None or getattr(request, "mm_features", None):
            return None  # the KV depends on more than the token ids
        if getattr(request, "prompt_embeds", None) is not None:
            return None
        prompt = request.prompt_token_ids
        return list(prompt) if prompt is not None else None

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        if not self._consumer:
            return 0, False
        prompt = self._cacheable_prompt(request)
        if not prompt:
            return 0, False
        ct = self._chunk_tokens
        limit = (len(prompt) - 1) // ct * ct  # never the whole prompt: the last token is computed
        if limit <= num_computed_tokens:
            return 0, False
        hit = min(c.lookup(prompt[:limit]) for c in self._clients)
        hit = min(hit, limit) // self._block_size * self._block_size
        if hit <= num_computed_tokens:
            return 0, False
        return hit - num_computed_tokens, False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        if num_external_tokens > 0:
            self._pending_loads[request.request_id] = num_external_tokens

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = KVPoolConnectorMetadata(preempted=set(scheduler_output.preempted_req_ids or ()))
        bs = self._block_size
        sched = scheduler_output.num_scheduled_tokens
        for r in scheduler_output.scheduled_new_reqs:
            track = self._reqs.get(r.req_id)
            prompt = r.prompt_token_ids
            if track is None:
                req_obj = _RequestView(r)
                track = _Track(prompt=self._cacheable_prompt(req_obj) if prompt else None, block_ids=[])
                self._reqs[r.req_id] = track
            track.block_ids = list(r.block_ids[0]) if r.block_ids else []
            self._plan(meta, r.req_id, track, int(r.num_computed_tokens), int(sched.get(r.req_id, 0)), bs)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            track = self._reqs.get(req_id)
            if track is None:
                continue
            nb = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                track.block_ids = list(nb[0]) if nb else []
            elif nb:
                track.block_ids.extend(nb[0])
            self._plan(meta, req_id, track, int(cached.num_computed_tokens[i]), int(sched.get(req_id, 0)), bs)
        self._pending_loads.clear()
        return meta

    def _plan(self, meta: KVPoolConnectorMetadata, req_id: str, track: _Track, computed: int, scheduled: int,
              bs: int) -> None:
        n_ext = self._pending_loads.pop(req_id, 0)
        if n_ext and track.prompt:
            start = computed - n_ext
            meta.loads.append(LoadSpec(req_id, track.prompt[:computed], track.block_ids[: computed // bs],
                                       start // bs))
            track.loaded_to = max(track.loaded_to, computed)
        if not self._producer or track.save_done or not track.prompt:
            return
        if computed + scheduled < len(track.prompt):
            return  # prefill not complete yet (chunked prefill): save once, when it is
        track.save_done = True
        n = len(track.prompt) // self._chunk_tokens * self._chunk_tokens
        if n == 0 or n <= track.loaded_to or n // bs > len(track.block_ids):
            return
        meta.saves.append(SaveSpec(req_id, track.prompt[:n], track.block_ids[: n // bs]))
        self._saving.add(req_id)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        self._reqs.pop(rid, None)
        self._pending_loads.pop(rid, None)
        if rid in self._saving:  # its blocks stay allocated until the worker reports the store done
            self._saving.discard(rid)
            return True, None
        return False, None

    # ==========================================================================================================
    # worker side
    # ==========================================================================================================
    def _init_worker(self) -> None:
        self._rank = 0
        if self._tp > 1:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            self._rank = int(get_tensor_model_parallel_rank())
        for mod in self._extra.get("backend_modules") or ():
            importlib.import_module(mod)  # modules that register_backend() custom tiers
        self._pool: SyncPool | None = None
        self._server: Any = None
        self._path: str | None = None
        self._caches: list[torch.Tensor] = []
        self._rows: list[torch.Tensor] = []
        self._layer_of: dict[str, int] = {}
        self._fmt: PageFormat | None = None
        self._loads: list[_Load] = []
        self._load_errors: set[int] = set()
        self._saves: dict[str, list[Any]] = {}
        self._finish_wait: set[str] = set()
        self._stats: dict[str, float] = {}  # this interval's, for vLLM's stats hook
        self._totals: dict[str, float] = {}  # since start, for the lookup service's stats
        self._stats_lock = threading.Lock()
        self._layer_time: float | None = None
        self._last_layer_end: float | None = None
        self._prefetch_layers = int(self._extra.get("prefetch_layers", 4))
        self._load_timeout = float(self._extra.get("load_timeout", 60.0))

    def _count(self, key: str, v: float = 1) -> None:
        with self._stats_lock:
            self._stats[key] = self._stats.get(key, 0) + v
            self._totals[key] = self._totals.get(key, 0) + v

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        names = sorted(kv_caches, key=_layer_index)
        caches = [kv_caches[n] for n in names]
        if not caches:
            raise NotImplementedError("KVPoolConnector: the model has no KV cache layers")
        first = caches[0]
        spec = getattr(self, "_attn_spec", None)
        H = int(spec.num_kv_heads) if spec is not None else int(first.shape[1])
        D = int(spec.head_size) if spec is not None else int(first.shape[-1]) // 2
        seen = set()
        for n, c in zip(names, caches):
            if c.shape != first.shape or c.dtype != first.dtype or not c.is_contiguous():
                raise NotImplementedError(f"KVPoolConnector: layer {n} has a cache of shape {tuple(c.shape)} "
                                          f"{c.dtype} (contiguous={c.is_contiguous()}), layer 0 {tuple(first.shape)}")
            if c.data_ptr() in seen:
                raise NotImplementedError("KVPoolConnector: layers sharing one KV cache are not supported")
            seen.add(c.data_ptr())
        try:
            fmt = PageFormat(num_layers=len(caches), block_size=self._block_size, num_kv_heads=H, head_dim=D,
                             dtype=first.dtype, page_shape=tuple(int(s) for s in first.shape[1:]))
        except ValueError as exc:
            raise NotImplementedError(
                f"KVPoolConnector needs a block-major KV cache ([num_blocks, ...] per layer, one block contiguous, "
                f"as vLLM's CPU backend has); got {tuple(first.shape)}: {exc}") from None
        self._fmt = fmt
        self._caches = caches
        self._rows = [wide_rows(c, fmt.unit_elems) for c in caches]
        self._layer_of = {n: i for i, n in enumerate(names)}
        layout = fmt.layout(self._chunk_tokens)
        mc = self._vllm_config.model_config
        model = self._extra.get("model_id") or f"{mc.model}@{getattr(mc, 'revision', None) or ''}"
        namespace = str(self._extra.get("namespace", ""))
        if self._tp > 1:
            namespace = f"{namespace}|tp{self._rank}of{self._tp}"
        backends = [self._subst(b) for b in self._extra["backends"]]
        opts = dict(self._extra.get("config") or {})
        if "staging_bytes" not in opts:
            # the layers a restore of the longest prompt keeps in flight (stream's results come from the
            # pool's staging memory, populated at open: the first restore pays no page faults)
            per_layer = layout.chunk_nbytes // layout.num_layers * -(-int(mc.max_model_len) // self._chunk_tokens)
            opts["staging_bytes"] = min(4 << 30, max(64 << 20, (self._prefetch_layers + 2) * per_layer))
        config = PoolConfig.from_dict(opts)
        self._pool = SyncPool.open(layout=layout, model_id=fmt.model_id(model), backends=backends,
                                   namespace=namespace, config=config)
        self._path = socket_path(self._engine_id, self._rank, self._dp_rank, self._socket_dir)
        self._server = self._pool.submit(
            serve_lookups(self._pool.pool, self._path, extra=self._service_stats)).result()
        port = self._extra.get("prometheus_port")
        if port is not None and self._rank == 0:
            from prometheus_client import REGISTRY, start_http_server

            from ...metrics import PoolCollector

            REGISTRY.register(PoolCollector(self._pool.pool, name=f"vllm-{self._engine_id[:8]}"))
            start_http_server(int(port))
        log.info("KVPoolConnector: pool %s (%s), lookups on %s", backends, fmt.describe(), self._path)

    def _subst(self, spec: Any) -> Any:
        if isinstance(spec, str):
            return spec.replace("{rank}", str(self._rank))
        if isinstance(spec, (list, tuple)):
            return [self._subst(s) for s in spec]
        return spec

    def _service_stats(self) -> dict[str, Any]:
        """What the lookup service adds to the pool's stats: the connector's stores still running."""
        pending = sum(1 for futs in list(self._saves.values()) for f in list(futs) if not f.done())
        with self._stats_lock:
            totals = dict(self._totals)
        return {"saves_pending": pending, "page_format": self._fmt.describe() if self._fmt else None,
                "counters": totals}

    @property
    def pool(self) -> SyncPool | None:
        """The worker's pool (``None`` on the scheduler side)."""
        return getattr(self, "_pool", None)

    # --- loads -------------------------------------------------------------------------------------------
    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._connector_metadata
        if not isinstance(meta, KVPoolConnectorMetadata) or not meta.loads or self._pool is None:
            return
        self._last_layer_end = None
        for spec in meta.loads:
            ld = _Load(spec, len(self._caches))
            try:
                ld.future = self._pool.submit(self._restore(ld))
            except Exception as exc:  # the pool is gone: recompute
                log.warning("KVPoolConnector: cannot start a restore: %r", exc)
                ld.cancel()
            self._loads.append(ld)

    async def _restore(self, ld: _Load) -> None:
        assert self._pool is not None and self._fmt is not None
        spec, fmt, ct = ld.spec, self._fmt, self._chunk_tokens
        ppc = ct // fmt.block_size
        t0 = time.perf_counter()
        dst: torch.Tensor | None = None
        src: torch.Tensor | None = None
        hit = 0
        try:
            tokens = np.asarray(spec.tokens, dtype="<u4")
            async for layer, x in self._pool.pool.stream(tokens, prefetch_layers=self._prefetch_layers,
                                                         layer_time=self._layer_time):
                if dst is None:
                    hit = int(x.shape[1])
                    nchunks = hit // ct
                    if hit < len(tokens):  # gone since the lookup: those blocks are recomputed
                        ld.fail_from(nchunks * ppc)
                    ids = torch.as_tensor(spec.block_ids[: nchunks * ppc], dtype=torch.int64)
                    rows = unit_index(ids, ppc)
                    pos = unit_index(torch.arange(nchunks * ppc), ppc) // 2
                    keep = pos >= spec.start_block
                    if bool(keep.all()):
                        dst, src = rows, None
                    else:  # blocks vLLM already had (its own prefix hit) are left alone
                        dst, src = rows[keep], torch.nonzero(keep).flatten()
                if x.numel() * x.element_size() >= _OFFLOAD_BYTES:
                    ok = await asyncio.to_thread(self._scatter, ld, layer, x, dst, src)
                else:
                    ok = self._scatter(ld, layer, x, dst, src)
                if not ok:
                    return
                ld.events[layer].set()
            if dst is None:  # nothing cached any more
                ld.fail_from(spec.start_block)
            ld.hit = hit
        except RestoreError as exc:  # an object lost after its first layers: the whole load is recomputed
            log.warning("KVPoolConnector: restore of %s lost layer %d: recomputing", spec.req_id, exc.layer)
            ld.fail_from(spec.start_block)
        except Exception as exc:
            log.warning("KVPoolConnector: restore of %s failed (%r): recomputing", spec.req_id, exc)
            ld.fail_from(spec.start_block)
        finally:
            for e in ld.events:
                e.set()
            self._count("load_seconds", time.perf_counter() - t0)

    def _scatter(self, ld: _Load, layer: int, x: torch.Tensor, dst: torch.Tensor, src: torch.Tensor | None) -> bool:
        assert self._fmt is not None
        with ld.lock:
            if ld.cancelled:
                return False
            xr = wide_rows(x if x.is_contiguous() else x.contiguous(), self._fmt.unit_elems)
            if src is not None:
                xr = xr.index_select(0, src)
            self._rows[layer].index_copy_(0, dst, xr)
        return True

    def wait_for_layer_load(self, layer_name: str) -> None:
        if not self._loads:
            return
        layer = self._layer_of.get(layer_name)
        if layer is None:
            return
        now = time.perf_counter()
        if self._last_layer_end is not None and layer > 0:  # compute time of the previous layer
            dt = now - self._last_layer_end
            self._layer_time = dt if self._layer_time is None else 0.8 * self._layer_time + 0.2 * dt
        deadline = now + self._load_timeout
        for ld in self._loads:
            if not ld.events[layer].wait(max(0.0, deadline - time.perf_counter())):
                log.warning("KVPoolConnector: restore of %s timed out at layer %d: recomputing", ld.spec.req_id,
                            layer)
                ld.cancel()
        end = time.perf_counter()
        self._count("load_stall_seconds", end - now)
        self._last_layer_end = end

    def _finish_loads(self) -> None:
        if not self._loads:
            return
        deadline = time.perf_counter() + self._load_timeout
        for ld in self._loads:
            if ld.future is not None:
                try:
                    ld.future.result(timeout=max(0.0, deadline - time.perf_counter()))
                except Exception:
                    ld.cancel()
                    if ld.future is not None:
                        ld.future.cancel()
            bad = ld.failed_block_ids()
            self._load_errors.update(bad)
            self._count("loads")
            good = len(ld.spec.block_ids) - ld.spec.start_block - len(bad)
            self._count("load_tokens", good * self._block_size)
            self._count("load_failed_blocks", len(bad))
        self._loads = []

    def get_block_ids_with_load_errors(self) -> set[int]:
        self._finish_loads()
        out, self._load_errors = self._load_errors, set()
        return out

    # --- saves -------------------------------------------------------------------------------------------
    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata,
                      **kwargs: Any) -> None:
        # Stores are whole chunks of all layers, gathered after the forward (wait_for_save): nothing per layer.
        return

    def wait_for_save(self) -> None:
        self._finish_loads()  # a load must be over (or cancelled) before the step's results are reported
        meta = self._connector_metadata
        if not isinstance(meta, KVPoolConnectorMetadata) or self._pool is None:
            return
        for spec in meta.saves:
            try:
                fut = self._pool.submit(self._store(spec))
            except Exception as exc:
                log.warning("KVPoolConnector: cannot start a store: %r", exc)
                self._count("save_failures")
                fut = None
            self._saves.setdefault(spec.req_id, [])
            if fut is not None:
                self._saves[spec.req_id].append(fut)

    async def _store(self, spec: SaveSpec) -> None:
        assert self._pool is not None and self._fmt is not None
        fmt, pool = self._fmt, self._pool.pool
        try:
            tokens = np.asarray(spec.tokens, dtype="<u4")
            if await pool.lookup(tokens) >= len(tokens):
                self._count("save_skipped")
                return
            ppc = self._chunk_tokens // fmt.block_size
            idx = unit_index(torch.as_tensor(spec.block_ids, dtype=torch.int64), ppc)
            host = torch.empty(pool.layout.kv_shape(len(tokens)), dtype=pool.layout.dtype)

            def gather() -> None:
                for layer, rows in enumerate(self._rows):
                    torch.index_select(rows, 0, idx, out=wide_rows(host[layer], fmt.unit_elems))

            await asyncio.to_thread(gather)
            await pool.put(tokens, host)
            self._count("saves")
            self._count("save_tokens", len(tokens))
        except Exception as exc:  # a tier down: the chunks are simply not cached
            log.warning("KVPoolConnector: store of %s failed: %r", spec.req_id, exc)
            self._count("save_failures")

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        # A preempted request's blocks are freed at once and may be overwritten by this step: its store must
        # have gathered them first.
        pre = getattr(kv_connector_metadata, "preempted", None)
        for rid in pre or ():
            for fut in self._saves.get(rid, ()):
                try:
                    fut.result(timeout=self._load_timeout)
                except Exception:
                    pass

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        for rid in finished_req_ids:
            if rid in self._saves:
                self._finish_wait.add(rid)
        done = {rid for rid in self._finish_wait if all(f.done() for f in self._saves.get(rid, ()))}
        for rid in done:
            self._finish_wait.discard(rid)
            self._saves.pop(rid, None)
        return (done or None), None

    # --- stats -------------------------------------------------------------------------------------------
    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        if getattr(self, "_pool", None) is None:
            return None
        with self._stats_lock:
            data, self._stats = self._stats, {}
        return KVPoolConnectorStats(data=data) if any(data.values()) else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return KVPoolConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: Any, metric_types: Any, labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> KVConnectorPromMetrics | None:
        return KVPoolPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def pool_stats(self) -> dict[str, Any] | None:
        """:meth:`kvpool.KVPool.stats` of the pool (from either side: the scheduler asks rank 0's service)."""
        if getattr(self, "_pool", None) is not None:
            return dict(self._pool.stats())  # type: ignore[union-attr]
        clients = getattr(self, "_clients", None)
        return clients[0].stats() if clients else None

    def shutdown(self) -> None:
        if self.role == KVConnectorRole.SCHEDULER:
            for c in getattr(self, "_clients", ()):
                c.close()
            return
        pool = getattr(self, "_pool", None)
        if pool is None:
            return
        self._pool = None
        for futs in self._saves.values():
            for f in futs:
                try:
                    f.result(timeout=self._load_timeout)
                except Exception:
                    pass
        try:
            if self._server is not None:
                server = self._server

                async def stop() -> None:
                    server.close()
                    await server.wait_closed()

                pool.submit(stop()).result(timeout=5)
        except Exception:
            pass
        try:
            pool.flush()
        except Exception as exc:
            log.warning("KVPoolConnector: flush at shutdown failed: %r", exc)
        pool.close()
        if self._path:
            try:
                import os

                os.unlink(self._path)
            except OSError:
                pass


class _RequestView:
    """The few request fields :meth:`KVPoolConnector._cacheable_prompt` reads, from a ``NewRequestData``."""

    def __init__(self, r: Any) -> None:
        self.prompt_token_ids = r.prompt_token_ids
        self.lora_request = getattr(r, "lora_request", None)
        self.mm_features = getattr(r, "mm_features", None)
        self.prompt_embeds = getattr(r, "prompt_embeds", None)
        self.request_id = r.req_id
