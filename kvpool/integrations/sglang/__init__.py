"""SGLang HiCache storage backend (L3) on kvpool: one object per SGLang page, zero-copy into the host pool.

Use it through SGLang's dynamic storage-backend route::

    --hicache-storage-backend dynamic --hicache-storage-backend-extra-config '{"backend_name": "kvpool",
      "module_path": "kvpool.integrations.sglang", "class_name": "KVPoolHiCacheStorage", "interface_v1": 1,
      "backends": ["dram://?capacity=8GiB", ["uring:///dev/nvme0n1", "uring:///dev/nvme1n1"]]}'

SGLang builds it as ``KVPoolHiCacheStorage(storage_config, kwargs)`` and attaches its host KV pool with
``register_mem_pool_host``. The backend owns a :class:`kvpool.SyncPool` (the pool on a loop thread of its own);
SGLang's threads hand it coroutines and wait on their futures, so the loop is never blocked by a caller and many
SGLang threads may call at once.

Objects. A page is one object: the bytes of the page's host-pool regions (``get_page_buffer_meta``: K and V
per page -- per layer in ``layer_first`` -- for MHA, one region per page or per layer for MLA) laid end to end
in the order of SGLang's own flat data page (``get_data_page(i, flat=True)``: all K regions, then all V
regions). The object is read and written straight from and into the host pool through one strided tensor view
per page (no staging copy); the plain ``get``/``set`` forms, which SGLang feeds with flat data pages, therefore
store and find the same bytes under the same keys.

Keys. SGLang's page hash strings are the names; the kvpool key is ``blake3("kvpool-sglang-v1" | namespace |
model | rank binding | page layout | hash)`` truncated to 16 bytes. The rank binding holds everything that
changes a page's bytes across ranks (TP rank and size for MHA -- MLA KV is replicated across TP and shared --,
PP rank and size, attention-CP rank and size, DCP shard, head splitting); the page layout holds the host pool's
layout name, page size, dtype and region sizes. Ranks therefore never read each other's pages, and a pool
shared by two layouts or models keeps them apart.

Batches. ``batch_get_v1`` asks each tier, fastest first, which of the pages it holds (one ``contains_many``)
and reads them with one ``read_many``; pages a tier fails to read (evicted, corrupt) fall through to the next
tier. ``batch_set_v1`` writes every tier at once (write-through), one ``contains_many`` + one ``write_many``
per tier, skipping pages a tier already holds. A tier that raises is a miss for the pages it was asked for,
never an exception into SGLang.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import blake3
import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig

import kvpool
from kvpool import Backend, ReadRequest

from ._pages import Dest, HostBuffers, packed, page_key_binding, page_layout_binding, per_rank

__all__ = ["KVPoolHiCacheStorage", "page_key_binding"]

log = logging.getLogger("kvpool.sglang")

# SGLang's own keys in the extra config, and the dynamic route's; accepted and ignored here.
_SGLANG_KEYS = frozenset({"backend_name", "module_path", "class_name", "interface_v1", "tp_lcm_size"})
_OWN_KEYS = frozenset({"backends", "namespace", "model_id", "pool_config", "promote_on_hit"})
_DEFAULT_BACKENDS = ("dram://?capacity=4GiB",)
T = TypeVar("T")


class KVPoolHiCacheStorage(HiCacheStorage):  # type: ignore[misc]  # sglang ships no type information
    """SGLang HiCache L3 storage on a kvpool pool of tiers.

    Parameters
    ----------
    storage_config
        SGLang's :class:`HiCacheStorageConfig`; its ``extra_config`` carries this backend's options:
        ``backends`` (kvpool spec strings fastest first, a nested list is one striped tier), ``namespace``,
        ``model_id`` (default: the config's ``model_name``), ``pool_config`` (a :class:`kvpool.PoolConfig`
        mapping) and ``promote_on_hit`` (copy pages read from a lower tier into the tiers above; default true).
    kwargs
        What SGLang's dynamic route passes as the second argument (unused).
    """

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Any = None) -> None:
        self.storage_config = storage_config
        extra = dict(storage_config.extra_config or {})
        unknown = sorted(set(extra) - _SGLANG_KEYS - _OWN_KEYS)
        if unknown:
            log.warning("kvpool HiCache storage ignores unknown extra_config key(s): %s", ", ".join(unknown))
        backends = extra.get("backends") or list(_DEFAULT_BACKENDS)
        if isinstance(backends, str):
            backends = [backends]
        backends = per_rank(backends, storage_config)
        pool_config = dict(extra.get("pool_config") or {})
        # pages go straight into SGLang's host pool: the pool's own staging memory is barely used
        pool_config.setdefault("staging_bytes", 2 << 20)
        self.namespace = str(extra.get("namespace", ""))
        self.model_id = str(extra.get("model_id") or storage_config.model_name or "sglang")
        self.binding = page_key_binding(storage_config)
        # the pool's own layout only shapes KVPool.put/get's token chunks; pages here are whole objects
        layout = kvpool.KVLayout(num_layers=1, num_kv_heads=1, head_dim=1, dtype=torch.uint8, chunk_tokens=1)
        self._sync = kvpool.SyncPool.open(layout=layout, model_id=self.model_id, backends=list(backends),
                                          namespace=self.namespace, config=pool_config)
        # SGLang does not always close its storage backend: close (and so checkpoint) the pool at exit
        atexit.register(self._close_at_exit)
        self.promote_on_hit = bool(extra.get("promote_on_hit", self._sync.pool.config.promote_on_hit))
        self.mem_pool_host: Any = None
        self._buffers: HostBuffers | None = None
        self._mha = False
        self._lock = threading.Lock()
        self._set_seed("unregistered")
        self.counters: dict[str, int] = {
            "pages_read": 0, "pages_missed": 0, "pages_written": 0, "pages_skipped": 0, "write_failures": 0,
            "tier_errors": 0, "promotions": 0, "calls_failed": 0,
        }

    # --- keys --------------------------------------------------------------------------------------------
    def _set_seed(self, page_layout: str) -> None:
        h = blake3.blake3(b"kvpool-sglang-v1\0")
        for part in (self.namespace, self.model_id, self.binding, page_layout):
            b = part.encode()
            h.update(len(b).to_bytes(4, "little"))
            h.update(b)
        self._seed = h

    def page_key(self, key: str) -> bytes:
        """The kvpool object key of SGLang page hash ``key`` for this rank and page layout."""
        h = self._seed.copy()
        h.update(key.encode())
        return h.digest(length=16)

    # --- host pool ---------------------------------------------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        super().register_mem_pool_host(mem_pool_host)
        self._buffers = HostBuffers(mem_pool_host)
        # MHA regions come as (K, V) pairs; the object holds every K region, then every V region
        name = type(mem_pool_host).__name__
        self._mha = "MHA" in name or ("MLA" not in name and hasattr(mem_pool_host, "head_num"))
        self._set_seed(page_layout_binding(mem_pool_host))

    def _page_dests(self, n: int, host_indices: torch.Tensor) -> list[Dest]:
        if self._buffers is None:
            raise RuntimeError("register_mem_pool_host was not called")
        ptrs, sizes = self.mem_pool_host.get_page_buffer_meta(host_indices)
        if n == 0:
            return []
        if len(ptrs) % n or len(sizes) != len(ptrs):
            raise ValueError(f"{len(ptrs)} buffer regions for {n} pages")
        per = len(ptrs) // n
        out = []
        for i in range(n):
            p = [int(x) for x in ptrs[i * per : (i + 1) * per]]
            z = [int(x) for x in sizes[i * per : (i + 1) * per]]
            if self._mha and per % 2 == 0:
                p, z = p[0::2] + p[1::2], z[0::2] + z[1::2]
            out.append(self._buffers.page(p, z))
        return out

    # --- the loop side -----------------------------------------------------------------------------------
    @property
    def pool(self) -> kvpool.KVPool:
        return self._sync.pool

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._sync.submit(coro).result()

    def _tier_error(self, tier: Backend, what: str, exc: BaseException) -> None:
        self.counters["tier_errors"] += 1
        log.warning("kvpool tier %s failed %s: %s", tier.scheme or type(tier).__name__, what, exc)

    async def _contains(self, tier: Backend, keys: list[bytes]) -> list[bool]:
        try:
            return list(await tier.contains_many(keys))
        except Exception as exc:  # noqa: BLE001 - a tier failure is a miss, never an exception into SGLang
            self._tier_error(tier, "contains_many", exc)
            return [False] * len(keys)

    async def _read(self, keys: list[bytes], dests: list[Dest]) -> list[bool]:
        n = len(keys)
        ok = [False] * n
        found = [-1] * n
        remaining = list(range(n))
        tiers = self.pool.tiers
        for t, tier in enumerate(tiers):
            if not remaining:
                break
            have = await self._contains(tier, [keys[i] for i in remaining])
            hit = [i for i, h in zip(remaining, have) if h]
            if hit:
                reqs: list[ReadRequest] = []
                owner: list[int] = []
                for i in hit:
                    d = dests[i]
                    if isinstance(d, torch.Tensor):
                        reqs.append(ReadRequest(keys[i], d))
                        owner.append(i)
                    else:
                        for v, off in d:
                            reqs.append(ReadRequest(keys[i], v, off))
                            owner.append(i)
                res = await self._read_batch(tier, reqs)
                good = dict.fromkeys(hit, True)
                for i, r in zip(owner, res):
                    good[i] = good[i] and bool(r)
                for i, g in good.items():
                    if g:
                        ok[i] = True
                        found[i] = t
            remaining = [i for i in remaining if not ok[i]]
        if self.promote_on_hit and len(tiers) > 1:
            await self._promote(keys, dests, found)
        return ok

    async def _read_batch(self, tier: Backend, reqs: list[ReadRequest]) -> list[bool]:
        """One tier's reads: one ``read_many``; on a queued (SSD, remote) tier a batch larger than the pool's
        ``io_op_bytes`` is cut into sub-batches of that size, ``io_max_inflight_bytes`` of them in flight, so
        the device queue stays bounded and the first sub-batches are verified while later ones are read."""
        cfg = self.pool.config
        groups: list[list[ReadRequest]] = [[]]
        acc = 0
        for r in reqs:
            n = r.dest.numel() * r.dest.element_size()
            if tier.capabilities.queued_io and groups[-1] and acc + n > cfg.io_op_bytes:
                groups.append([])
                acc = 0
            groups[-1].append(r)
            acc += n
        sem = asyncio.Semaphore(max(1, cfg.io_max_inflight_bytes // max(1, cfg.io_op_bytes)))

        async def run(group: list[ReadRequest]) -> list[bool]:
            async with sem:
                try:
                    return list(await tier.read_many(group))
                except Exception as exc:  # noqa: BLE001 - a tier failure is a miss, never an exception into SGLang
                    self._tier_error(tier, "read_many", exc)
                    return [False] * len(group)

        if len(groups) == 1:
            return await run(groups[0])
        parts = await asyncio.gather(*(run(g) for g in groups))
        return [ok for part in parts for ok in part]

    async def _promote(self, keys: list[bytes], dests: list[Dest], found: list[int]) -> None:
        """Copy pages found below the first tier into the tiers above (before the call returns: the host
        pool's memory is SGLang's again afterwards). Best effort: a full or failing tier is skipped."""
        for upper in range(max(found, default=0)):
            items = [(keys[i], packed(dests[i])) for i in range(len(keys)) if found[i] > upper]
            if not items:
                continue
            try:
                await self.pool.tiers[upper].write_many(items)
                self.counters["promotions"] += len(items)
            except Exception as exc:  # noqa: BLE001 - a tier failure is a miss, never an exception into SGLang
                self._tier_error(self.pool.tiers[upper], "promotion write_many", exc)

    async def _write(self, keys: list[bytes], srcs: list[torch.Tensor]) -> list[bool]:
        n = len(keys)

        async def one(tier: Backend) -> list[bool]:
            have = await self._contains(tier, keys)
            todo = [i for i in range(n) if not have[i]]
            self.counters["pages_skipped"] += n - len(todo)
            if not todo:
                return have
            try:
                await tier.write_many([(keys[i], srcs[i]) for i in todo])
                self.counters["pages_written"] += len(todo)
                return [True] * n
            except Exception as exc:  # noqa: BLE001 - a tier failure is a miss, never an exception into SGLang
                self._tier_error(tier, "write_many", exc)
                return await self._contains(tier, keys)  # what did land

        results = await asyncio.gather(*(one(t) for t in self.pool.tiers))
        return [any(r[i] for r in results) for i in range(n)]

    async def _exists(self, keys: list[bytes]) -> list[bool]:
        present = [False] * len(keys)
        remaining = list(range(len(keys)))
        for tier in self.pool.tiers:
            if not remaining:
                break
            have = await self._contains(tier, [keys[i] for i in remaining])
            for i, h in zip(remaining, have):
                present[i] = present[i] or h
            remaining = [i for i in remaining if not present[i]]
        return present

    async def _object_size(self, key: bytes) -> int | None:
        for tier in self.pool.tiers:
            try:
                size = await tier.object_size(key)
            except Exception as exc:  # noqa: BLE001 - a tier failure is a miss, never an exception into SGLang
                self._tier_error(tier, "object_size", exc)
                continue
            if size is not None:
                return size
        return None

    def _failed(self, what: str, exc: BaseException) -> None:
        self.counters["calls_failed"] += 1
        log.error("kvpool HiCache %s failed: %s", what, exc, exc_info=exc)

    def _count_reads(self, ok: list[bool]) -> None:
        with self._lock:
            hits = sum(ok)
            self.counters["pages_read"] += hits
            self.counters["pages_missed"] += len(ok) - hits

    # --- v1: zero copy into the host pool ------------------------------------------------------------------
    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None) -> list[bool]:
        if not keys:
            return []
        try:
            dests = self._page_dests(len(keys), host_indices)
            ok = self._run(self._read([self.page_key(k) for k in keys], dests))
        except Exception as exc:  # noqa: BLE001 - a tier failure is a miss, never an exception into SGLang
            self._failed("batch_get_v1", exc)
            return [False] * len(keys)
        self._count_reads(ok)
        return ok

    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None) -> list[bool]:
        if not keys:
            return []
        try:
            srcs = [packed(d) for d in self._page_dests(len(keys), host_indices)]
            ok = self._run(self._write([self.page_key(k) for k in keys], srcs))
        except Exception as exc:  # noqa: BLE001 - a tier failure is a miss, never an exception into SGLang
            self._failed("batch_set_v1", exc)
            return [False] * len(keys)
        with self._lock:
            self.counters["write_failures"] += len(ok) - sum(ok)
        return ok

    def batch_exists(self, keys: list[str], extra_info: Any = None) -> int:
        if not keys:
            return 0
        try:
            present = self._run(self._exists([self.page_key(k) for k in keys]))
        except Exception as exc:  # noqa: BLE001 - a tier failure is a miss, never an exception into SGLang
            self._failed("batch_exists", exc)
            return 0
        return present.index(False) if False in present else len(present)

    # --- the plain forms ---------------------------------------------------------------------------------
    def _target(self, target_location: Any, target_sizes: Any) -> torch.Tensor | None:
        if target_location is None or isinstance(target_location, torch.Tensor):
            return target_location
        if isinstance(target_location, int) and isinstance(target_sizes, int) and self._buffers is not None:
            return self._buffers.view(target_location, target_sizes)  # a raw host-pool pointer and size
        raise TypeError(f"target_location must be a tensor or a host-pool pointer, got {type(target_location)}")

    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> torch.Tensor | None:
        res = self.batch_get([key], [target_location], [target_sizes])
        return res[0]

    def batch_get(self, keys: list[str], target_locations: Any = None,
                  target_sizes: Any = None) -> list[torch.Tensor | None]:
        if not keys:
            return []
        try:
            locs = list(target_locations) if target_locations is not None else [None] * len(keys)
            sizes = list(target_sizes) if target_sizes is not None else [None] * len(keys)
            kk = [self.page_key(k) for k in keys]
            dests = [self._target(loc, sz) for loc, sz in zip(locs, sizes)]

            async def run() -> list[torch.Tensor | None]:
                for i, d in enumerate(dests):
                    if d is None:  # no destination: a fresh tensor of the object's size
                        size = await self._object_size(kk[i])
                        if size is not None:
                            dests[i] = torch.empty(size, dtype=torch.uint8)
                have = [i for i, d in enumerate(dests) if d is not None]
                ok = await self._read([kk[i] for i in have], [dests[i] for i in have])  # type: ignore[misc]
                out: list[torch.Tensor | None] = [None] * len(keys)
                for i, g in zip(have, ok):
                    out[i] = dests[i] if g else None
                return out

            out = self._run(run())
        except Exception as exc:  # noqa: BLE001 - a tier failure is a miss, never an exception into SGLang
            self._failed("batch_get", exc)
            return [None] * len(keys)
        self._count_reads([o is not None for o in out])
        return out

    def set(self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None) -> bool:
        return self.batch_set([key], [value] if value is not None else None,
                              [target_location] if target_location is not None else None,
                              [target_sizes] if target_sizes is not None else None)

    def batch_set(self, keys: list[str], values: Any = None, target_locations: Any = None,
                  target_sizes: Any = None) -> bool:
        if not keys:
            return True
        try:
            if values is not None:
                srcs = list(values)
            else:
                locs = list(target_locations or [])
                sizes = list(target_sizes or [None] * len(locs))
                srcs = [self._target(loc, sz) for loc, sz in zip(locs, sizes)]
            if len(srcs) != len(keys) or any(not isinstance(s, torch.Tensor) for s in srcs):
                raise ValueError("batch_set needs one tensor (or host-pool pointer and size) per key")
            ok = self._run(self._write([self.page_key(k) for k in keys], srcs))
        except Exception as exc:  # noqa: BLE001 - a tier failure is a miss, never an exception into SGLang
            self._failed("batch_set", exc)
            return False
        return all(ok)

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    # --- housekeeping ------------------------------------------------------------------------------------
    def clear(self) -> bool:
        """Delete every object in every tier of this pool (like HiCacheFile's clear: all ranks' pages)."""

        async def run() -> None:
            for tier in self.pool.tiers:
                keys = [k async for k in tier.keys()]  # noqa: SIM118 - an async iterator
                for k in keys:
                    await tier.delete(k)

        try:
            self._run(run())
            return True
        except Exception as exc:  # noqa: BLE001 - a tier failure is a miss, never an exception into SGLang
            self._failed("clear", exc)
            return False

    def stats(self) -> dict[str, Any]:
        """This backend's counters and the pool's (per tier)."""
        return {"sglang": dict(self.counters), "binding": self.binding, "pool": self._sync.stats()}

    def flush(self) -> None:
        """Make every page stored so far durable on the persistent tiers."""
        self._sync.flush()

    def close(self) -> None:
        """Close the pool and its loop thread. Idempotent."""
        atexit.unregister(self._close_at_exit)
        self._sync.close()

    def _close_at_exit(self) -> None:
        try:
            self._sync.close()
        except Exception as exc:  # noqa: BLE001  # pragma: no cover - best effort at interpreter exit
            log.warning("kvpool HiCache storage: close at exit failed: %s", exc)
