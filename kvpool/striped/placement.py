"""Placement across devices: how an object's bytes are split over striped children, and how fast each is.

Two parts, both used by :class:`kvpool.striped.backend.StripedBackend`:

- :func:`split_by_weight` -- a pure function: byte counts per device proportional to weights (bandwidths),
  in multiples of ``align`` (only the last non-empty piece carries the unaligned tail), summing to the
  object's size, never above a device's limit (its free space or capacity); devices of weight 0 or limit 0
  get nothing. :func:`makespan` rates a split (the time the slowest device needs, relative to the ideal).
- :class:`BandwidthProbe` -- measures a backend's read and write bandwidth by writing and reading a few large
  probe objects through the backend's own ``write_many``/``read_many`` (then deleting them), and caches the
  result so that a reopen does not probe again.

Probe cache locations
---------------------
- a ``uring://`` tier on a regular file ``PATH``: ``PATH.bw.json``, next to the pool file;
- any other backend with a ``path`` attribute (a raw block device, ``uring:///dev/nvme1n1``): only when the
  probe is given ``cache_dir``: ``cache_dir/<path with / as _>.bw.json``;
- a backend without a path (``dram://``): not cached (probing memory takes milliseconds).

The cache records the backend's identity (path, capacity, and for a block device its device number and size);
a mismatch re-probes. Delete the file to force a new measurement (after moving a pool file to another disk,
say). The probe measures only an empty backend (one that holds data could evict it: free bytes are not
contiguous room), never writes more than half of its capacity, and skips (returns ``None``) when that is
under ``min_nbytes``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import stat
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import torch

if TYPE_CHECKING:
    from ..storage.backend import Backend

__all__ = ["split_by_weight", "makespan", "BandwidthProbe", "ProbeResult"]

log = logging.getLogger("kvpool.striped.placement")

_CACHE_VERSION = 1
_SPREAD_UNITS = 8  # objects of fewer units per device than this are rounded by the seed (see split_by_weight)


# --- splitting ---------------------------------------------------------------------------------------------
def split_by_weight(
    nbytes: int,
    weights: Sequence[float],
    align: int = 4096,
    limits: Sequence[int | None] | None = None,
    *,
    seed: int | None = None,
) -> list[int]:
    """Split ``nbytes`` over devices in proportion to ``weights``.

    Parameters
    ----------
    nbytes
        Bytes of the object.
    weights
        One non-negative weight per device (bandwidths, in any common unit). A device of weight 0 gets nothing.
    align
        Every piece but the last non-empty one is a multiple of ``align`` (so pieces start on ``align``
        boundaries); the last carries ``nbytes % align``.
    limits
        Optional bytes each device can take at most (free space, capacity); ``None`` is no limit, 0 a full
        device. What a limited device cannot take goes to the others, still in proportion to their weights.
    seed
        Rounding to whole ``align`` units: an object of many units (at least 8 per device) is rounded so that
        the slowest device's time is minimal, each device at most one unit off its exact share. An object of
        few units is rounded by systematic sampling from ``seed`` (pass a hash of the object's key), so that
        across many small objects each device gets its exact share on average instead of every small object
        going to the heaviest device; without a seed these are rounded like large ones.

    Returns
    -------
    list[int]
        Bytes per device, summing to ``nbytes``.

    Raises
    ------
    ValueError
        For bad arguments, or when the devices that can take bytes cannot hold ``nbytes`` together.
    """
    n = len(weights)
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    if align <= 0:
        raise ValueError(f"align must be positive, got {align}")
    if n == 0:
        raise ValueError("no devices to split over")
    w = [float(x) for x in weights]
    if any(not math.isfinite(x) or x < 0 for x in w):
        raise ValueError(f"weights must be finite and >= 0, got {list(weights)}")
    if limits is not None and len(limits) != n:
        raise ValueError(f"{len(limits)} limits for {n} devices")
    if nbytes == 0:
        return [0] * n

    units = -(-nbytes // align)  # the last unit may be partial
    tail = nbytes - (units - 1) * align  # bytes of the last unit, in (0, align]
    # Limits in units. A device holds the partial unit only as its last: it fits k full units, or k units of
    # which the last is the tail. Count conservatively as full units, plus one if the tail alone still fits.
    ulim: list[float] = []
    for i in range(n):
        lim = None if limits is None else limits[i]
        if lim is None:
            ulim.append(math.inf)
        else:
            ulim.append(float(max(0, lim) // align))
    active = [i for i in range(n) if w[i] > 0 and ulim[i] > 0]
    if not active and limits is not None and tail < align:
        # nothing takes a full unit: a device may still hold an object smaller than one unit
        active = [i for i in range(n) if w[i] > 0 and (limits[i] or 0) >= nbytes and units == 1]
        if active:
            best = max(active, key=lambda i: w[i])
            return [nbytes if i == best else 0 for i in range(n)]
    if not active:
        raise ValueError("no device can take any bytes (all have weight 0 or no room)")
    if sum(ulim[i] for i in active) < units:
        raise ValueError(
            f"{nbytes} bytes do not fit: the devices that can take bytes hold {sum(ulim[i] for i in active)} "
            f"units of {align} together"
        )

    # water-filling: share out in proportion to weights; a device whose share exceeds its limit is capped and
    # the rest re-shared among the others
    alloc = [0] * n
    remaining = units
    act = list(active)
    while remaining > 0:
        total_w = sum(w[i] for i in act)
        capped = [i for i in act if remaining * w[i] / total_w >= ulim[i]]
        if capped:
            for i in capped:
                alloc[i] = int(ulim[i])
                remaining -= alloc[i]
                act.remove(i)
            continue
        ideal = {i: remaining * w[i] / total_w for i in act}
        floors = {i: math.floor(ideal[i]) for i in act}
        for i in act:
            alloc[i] = floors[i]
        extra = remaining - sum(floors.values())
        if extra > 0:
            frac = [(i, ideal[i] - floors[i]) for i in act]
            if seed is not None and remaining < _SPREAD_UNITS * len(act):
                # few units: systematic sampling, points u, u+1, ... over the cumulated fractions; each
                # device's interval is shorter than 1, so it gets at most one point, with probability = its
                # fraction: across many small objects every device receives its exact share on average
                u = (seed * 0x9E3779B97F4A7C15 % (1 << 64)) / float(1 << 64)
                cum = 0.0
                given = 0
                for i, f in frac:
                    lo, hi = cum, cum + f
                    k = math.ceil(lo - u)  # the first point k + u at or after lo
                    if k + u < hi and given < extra:
                        alloc[i] += 1
                        given += 1
                    cum = hi
                for i, _f in sorted(frac, key=lambda t: (-t[1], t[0])):  # float round-off
                    if given >= extra:
                        break
                    if alloc[i] == floors[i]:
                        alloc[i] += 1
                        given += 1
            else:
                # many units: the extra ones go where they finish first (the slowest device's time is
                # minimal; a device is at most one unit off its exact share)
                fr = dict(frac)
                order = sorted(act, key=lambda i: ((floors[i] + 1) / w[i], -fr[i], i))
                for i in order[:extra]:
                    alloc[i] += 1
        remaining = 0

    last = max(i for i in range(n) if alloc[i] > 0)
    out = [a * align for a in alloc]
    out[last] -= align - tail
    assert sum(out) == nbytes
    return out


def makespan(pieces: Sequence[int], weights: Sequence[float]) -> float:
    """Time the slowest device needs for its piece, relative to a perfect proportional split (>= 1.0)."""
    total = sum(pieces)
    wsum = sum(w for w in weights if w > 0)
    if total == 0 or wsum <= 0:
        return 1.0
    ideal = total / wsum
    worst = 0.0
    for p, w in zip(pieces, weights):
        if p:
            worst = max(worst, p / w if w > 0 else math.inf)
    return worst / ideal


# --- bandwidth probe ---------------------------------------------------------------------------------------
@attrs.frozen
class ProbeResult:
    """Bandwidths measured by :class:`BandwidthProbe`, in bytes per second."""

    read_bandwidth: float
    write_bandwidth: float
    nbytes: int
    cached: bool = False


def _io_bytes(n: int) -> torch.Tensor:
    """Page-aligned I/O memory (huge-page advised when large): what restores read into."""
    from ..storage.buffers import aligned_empty

    return aligned_empty((n,), torch.uint8)


class BandwidthProbe:
    """Measure a backend's read and write bandwidth with a short probe, and cache the result.

    Parameters
    ----------
    nbytes
        Bytes written and read (at most; see ``free_fraction``). 128 MiB by default: long enough to see past
        a device's write cache bursts and a throttle's first slice, short enough for an open.
    object_nbytes
        Size of each probe object (large, so the figure is streaming bandwidth, not IOPS).
    cache_dir
        Where results of backends other than a pool file are cached (see the module's docstring).
    use_cache
        Read and write cache files at all.
    free_fraction
        The probe uses at most this share of the backend's free space; it never probes a backend that holds
        data (see :meth:`probe_size`).
    min_nbytes
        Below this much room, skip the probe (:meth:`get` returns ``None``).
    """

    def __init__(
        self,
        nbytes: int = 128 << 20,
        object_nbytes: int = 8 << 20,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        use_cache: bool = True,
        free_fraction: float = 0.5,
        min_nbytes: int = 1 << 20,
    ) -> None:
        if nbytes <= 0 or object_nbytes <= 0:
            raise ValueError("probe sizes must be positive")
        self.nbytes = nbytes
        self.object_nbytes = object_nbytes
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.use_cache = use_cache
        self.free_fraction = free_fraction
        self.min_nbytes = min_nbytes

    # --- cache -------------------------------------------------------------------------------------------
    @staticmethod
    def _identity(backend: Backend) -> dict[str, Any] | None:
        path = backend.device_path
        if not path:
            return None
        ident: dict[str, Any] = {"scheme": backend.scheme, "path": os.path.abspath(path), "capacity": backend.capacity}
        try:
            st = os.stat(path)
        except OSError:
            return ident
        if stat.S_ISBLK(st.st_mode):
            ident["rdev"] = st.st_rdev
            try:
                with open(path, "rb") as f:
                    ident["size"] = f.seek(0, os.SEEK_END)
            except OSError:
                pass
        return ident

    def cache_path(self, backend: Backend) -> Path | None:
        """Where the result for ``backend`` is cached, ``None`` if it is not."""
        if not self.use_cache:
            return None
        path = backend.device_path
        if not path:
            return None
        try:
            device = not stat.S_ISREG(os.stat(path).st_mode)
        except FileNotFoundError:
            device = False  # a pool file not created yet
        except OSError:
            device = True
        if not device:
            return Path(path + ".bw.json")
        if self.cache_dir is not None:
            name = os.path.abspath(path).strip("/").replace("/", "_") or "root"
            return self.cache_dir / f"{name}.bw.json"
        return None

    def load(self, backend: Backend) -> ProbeResult | None:
        """The cached result for ``backend``, if any and still matching its identity."""
        p = self.cache_path(backend)
        if p is None:
            return None
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(d, dict) or d.get("version") != _CACHE_VERSION or d.get("identity") != self._identity(backend):
            return None
        try:
            return ProbeResult(float(d["read_bandwidth"]), float(d["write_bandwidth"]), int(d["nbytes"]), cached=True)
        except (KeyError, TypeError, ValueError):
            return None

    def save(self, backend: Backend, result: ProbeResult) -> Path | None:
        p = self.cache_path(backend)
        if p is None:
            return None
        data = {
            "version": _CACHE_VERSION,
            "identity": self._identity(backend),
            "read_bandwidth": result.read_bandwidth,
            "write_bandwidth": result.write_bandwidth,
            "nbytes": result.nbytes,
            "probed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(p.name + ".tmp")
            tmp.write_text(json.dumps(data, indent=2))
            os.replace(tmp, p)
        except OSError as exc:
            log.warning("cannot cache the bandwidth probe of %s in %s: %s", backend, p, exc)
            return None
        return p

    # --- measuring ---------------------------------------------------------------------------------------
    def probe_size(self, backend: Backend) -> int:
        """Bytes the probe would write to ``backend`` now (0: too little room to probe, or it holds data).

        A backend that already holds objects is never probed: its free bytes do not say that a write fits
        without evicting (a fragmented free space has no room for the large probe objects; an index can be
        full while bytes are free), and a probe that evicts drops cached objects -- on a striped tier, objects
        whose put was acknowledged (issue 15: a probe at reopen evicted hundreds of a killed run's objects).
        Such a backend is weighed by its cached result, its hints, or the mean of the others.
        """
        if backend.used_bytes > 0:
            return 0
        n = self.nbytes
        cap = backend.capacity
        if cap is not None:
            room = int(max(0, cap - backend.used_bytes) * self.free_fraction)
            n = min(n, room)
        n = n // 4096 * 4096
        return n if n >= self.min_nbytes else 0

    async def measure(self, backend: Backend) -> ProbeResult | None:
        """Probe an open backend now (no cache): write, read back, delete. ``None`` if there is no room."""
        from ..storage.backend import ReadRequest

        total = self.probe_size(backend)
        if total == 0:
            return None
        obj = min(self.object_nbytes, total)
        count = max(1, total // obj)
        total = count * obj
        src = _io_bytes(obj)
        src.copy_(torch.randint(0, 256, (obj,), dtype=torch.uint8))
        keys = [os.urandom(16) for _ in range(count)]
        dests = [_io_bytes(obj) for _ in range(count)]
        try:
            t0 = time.perf_counter()
            await backend.write_many([(k, src) for k in keys])
            t_write = time.perf_counter() - t0
            t0 = time.perf_counter()
            ok = await backend.read_many([ReadRequest(k, d) for k, d in zip(keys, dests)])
            t_read = time.perf_counter() - t0
        finally:
            await asyncio.gather(*(backend.delete(k) for k in keys), return_exceptions=True)
        if not all(ok):
            log.warning("bandwidth probe of %s: %d of %d probe objects did not read back", backend,
                        ok.count(False), count)
            return None
        return ProbeResult(total / max(t_read, 1e-9), total / max(t_write, 1e-9), total)

    async def get(self, backend: Backend) -> ProbeResult | None:
        """The cached result for ``backend``, else a new measurement (cached when it has a cache path)."""
        cached = self.load(backend)
        if cached is not None:
            return cached
        res = await self.measure(backend)
        if res is not None:
            self.save(backend, res)
            log.info("probed %s: read %.0f MB/s, write %.0f MB/s", backend, res.read_bandwidth / 1e6,
                     res.write_bandwidth / 1e6)
        return res
