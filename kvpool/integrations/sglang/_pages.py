"""Page geometry and keys for the SGLang HiCache backend: host-pool regions -> tensor views, rank bindings."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

__all__ = ["Dest", "HostBuffers", "packed", "page_key_binding", "page_layout_binding", "per_rank"]

# host-pool tensors a region pointer may lie in (MHA: kv_buffer; MLA split layouts: the component buffers)
_BUFFER_ATTRS = ("kv_buffer", "k_buffer", "v_buffer", "index_k_buffer", "index_k_scale_buffer")

# a page's object: either one view (regular regions) or (view, byte offset in the object) parts
Dest = torch.Tensor | list[tuple[torch.Tensor, int]]


def page_key_binding(config: HiCacheStorageConfig) -> str:
    """The part of every key that says whose page it is: what changes a page's bytes across ranks."""
    parts = [f"mla={int(bool(config.is_mla_model))}"]
    if not config.is_mla_model:  # MHA heads are sharded over TP; MLA's latent KV is the same on every TP rank
        parts.append(f"tp={config.tp_rank}/{config.tp_size}")
        if config.should_split_heads:
            parts.append(f"split={config.tp_lcm_size}")
    parts.append(f"pp={config.pp_rank}/{config.pp_size}")
    if config.attn_cp_size > 1:
        parts.append(f"cp={config.attn_cp_rank}/{config.attn_cp_size}")
    if config.dcp_size > 1:
        parts.append(f"dcp={config.dcp_rank}/{config.dcp_size}/tp{config.tp_size}/page{config.logical_page_size}")
    return "|".join(parts)


_RANK_FIELDS = ("tp_rank", "tp_size", "pp_rank", "pp_size", "dp_rank", "attn_cp_rank", "dcp_rank")
_PLACEHOLDER = re.compile(r"\{(" + "|".join(_RANK_FIELDS) + r")\}")


def per_rank(specs: Any, config: HiCacheStorageConfig) -> Any:
    """``{tp_rank}``, ``{pp_rank}``, ``{dp_rank}``... in spec strings become this rank's numbers: every rank
    process of a node opens its own pool, and a local file or device belongs to one pool at a time."""
    if isinstance(specs, str):
        return _PLACEHOLDER.sub(lambda m: str(getattr(config, m.group(1))), specs)
    if isinstance(specs, (list, tuple)):
        return [per_rank(s, config) for s in specs]
    return specs  # a Backend object


def page_layout_binding(host: Any) -> str:
    """Layout name, page size, dtype and the region sizes of one page of a host pool."""
    page = int(getattr(host, "page_size", 1))
    _ptrs, sizes = host.get_page_buffer_meta(torch.arange(page, dtype=torch.int64))
    geo = [str(getattr(host, "layout", "?")), f"page={page}", str(getattr(host, "dtype", "?")),
           f"layers={getattr(host, 'layer_num', '?')}", "regions=" + ",".join(str(int(s)) for s in sizes)]
    return "|".join(geo)


class HostBuffers:
    """Maps raw pointers from ``get_page_buffer_meta`` back to tensor views of the host pool's memory."""

    def __init__(self, host: Any) -> None:
        spans: dict[int, tuple[int, int, torch.Tensor]] = {}
        for name in _BUFFER_ATTRS:
            t = getattr(host, name, None)
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.numel() == 0:
                continue
            st = t.untyped_storage()
            base = st.data_ptr()
            if base not in spans:
                u8 = torch.empty(0, dtype=torch.uint8).set_(st)  # the whole storage, as bytes
                spans[base] = (base, base + st.nbytes(), u8)
        if not spans:
            raise ValueError(
                f"{type(host).__name__} exposes no CPU buffer ({', '.join(_BUFFER_ATTRS)}) to read pages into"
            )
        self._spans = sorted(spans.values(), key=lambda s: s[0])

    def _span(self, ptr: int, size: int) -> tuple[int, torch.Tensor]:
        for base, end, u8 in self._spans:
            if base <= ptr and ptr + size <= end:
                return base, u8
        raise ValueError(f"region [{ptr:#x}, +{size}) lies outside the registered host pool buffers")

    def view(self, ptr: int, size: int) -> torch.Tensor:
        base, u8 = self._span(ptr, size)
        return u8[ptr - base : ptr - base + size]

    def page(self, ptrs: Sequence[int], sizes: Sequence[int]) -> Dest:
        """One page's object over its regions (already in object order): a single strided view when the
        regions form a regular grid (every layout SGLang's MHA/MLA host pools produce), else parts."""
        n = len(ptrs)
        s = int(sizes[0])
        if n == 1:
            return self.view(ptrs[0], s)
        if all(int(x) == s for x in sizes):
            base, u8 = self._span(min(ptrs), 0)
            for outer in (1, 2):  # [n] with one stride, or [2, n/2] (K regions, V regions)
                if n % outer:
                    continue
                inner = n // outer
                s_in = ptrs[1] - ptrs[0] if inner > 1 else s
                s_out = ptrs[inner] - ptrs[0] if outer > 1 else 0
                if s_in < s or s_out < 0 or (outer > 1 and s_out < s):  # regions never overlap
                    continue
                if all(ptrs[a * inner + b] == ptrs[0] + a * s_out + b * s_in
                       for a in range(outer) for b in range(inner)):
                    try:
                        if self._span(max(ptrs), s)[0] != base:
                            break
                        shape = (outer, inner, s) if outer > 1 else (inner, s)
                        stride = (s_out, s_in, 1) if outer > 1 else (s_in, 1)
                        return torch.as_strided(u8, shape, stride, ptrs[0] - base)
                    except ValueError:
                        break
        parts, off = [], 0
        for p, z in zip(ptrs, sizes):
            parts.append((self.view(p, int(z)), off))
            off += int(z)
        return parts


def packed(dest: Dest) -> torch.Tensor:
    """The object bytes of a page given as parts (an irregular layout): one contiguous copy."""
    if isinstance(dest, torch.Tensor):
        return dest
    return torch.cat([v for v, _ in dest])


