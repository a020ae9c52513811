"""SGLang's host KV pools for tests and benchmarks on machines where SGLang's own cannot be imported.

``sglang.srt.mem_cache.pool_host`` pulls in SGLang's model-config registry, which imports ``torchvision`` at
module load, and PyPI's torchvision wheel is a CUDA build that does not load on the CPU torch. So these classes
carry only the pools' geometry; their methods -- ``init_kv_buffer``, ``get_page_buffer_meta``,
``get_data_page``, ``get_dummy_flat_data_page``, ``set_from_flat_data_page`` (and MLA's
``_storage_page_index``) -- are compiled from the installed ``pool_host/mha.py`` and ``pool_host/mla.py`` source
(not copied), so buffer shapes and pointer/size lists are exactly what a server hands a HiCache backend.
Importing this module needs SGLang installed (``bash .ci/install_sglang.sh``).
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..storage.buffers import aligned_empty

__all__ = ["MHATokenToKVPoolHost", "MLATokenToKVPoolHost", "host_indices"]

_METHODS = ("init_kv_buffer", "get_page_buffer_meta", "get_data_page", "get_dummy_flat_data_page",
            "set_from_flat_data_page")


def _alloc(dims: tuple[int, ...], dtype: torch.dtype, device: Any, pin_memory: bool, allocator: Any,
           registration_granularity_bytes: int | None = None) -> torch.Tensor:
    return aligned_empty(tuple(dims), dtype)  # page-aligned, like SGLang's registered host memory


def _sglang_methods(relpath: str, cls_name: str, names: Sequence[str]) -> dict[str, Any]:
    spec = importlib.util.find_spec("sglang")
    if spec is None or spec.origin is None:
        raise ImportError("sglang is not installed (bash .ci/install_sglang.sh)")
    path = Path(spec.origin).parent / relpath
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls_name)
    out: dict[str, Any] = {}
    for fn in cls.body:
        if isinstance(fn, ast.FunctionDef) and fn.name in names:
            ns: dict[str, Any] = {"torch": torch, "ALLOC_MEMORY_FUNCS": {"cpu": _alloc}, "_is_npu": False}
            exec(compile(ast.Module(body=[fn], type_ignores=[]), str(path), "exec"), ns)  # noqa: S102 - SGLang source
            out[fn.name] = ns[fn.name]
    missing = set(names) - set(out)
    if missing:
        raise ImportError(f"{cls_name} in {path} lacks {sorted(missing)}")
    return out


class MHATokenToKVPoolHost:
    """SGLang's MHA host pool geometry; methods compiled from sglang/srt/mem_cache/pool_host/mha.py."""

    def __init__(self, layout: str, pages: int, layer_num: int = 4, head_num: int = 2, head_dim: int = 16, *,
                 page_size: int = 64, dtype: torch.dtype = torch.bfloat16) -> None:
        self.layout, self.layer_num, self.head_num, self.head_dim, self.v_head_dim = (
            layout, layer_num, head_num, head_dim, head_dim)
        self.page_size, self.page_num, self.size = page_size, pages, pages * page_size
        self.dtype, self.device, self.pin_memory, self.allocator = dtype, "cpu", False, None
        self._transfer_device = torch.device("cpu")
        self.kv_buffer = self.init_kv_buffer()  # type: ignore[attr-defined]

    @property
    def k_buffer(self) -> torch.Tensor:
        return self.kv_buffer[0]  # type: ignore[no-any-return]

    @property
    def v_buffer(self) -> torch.Tensor:
        return self.kv_buffer[1]  # type: ignore[no-any-return]


class MLATokenToKVPoolHost:
    """SGLang's MLA host pool geometry; methods compiled from sglang/srt/mem_cache/pool_host/mla.py."""

    def __init__(self, layout: str, pages: int, layer_num: int = 4, kv_cache_dim: int = 64, *,
                 page_size: int = 64, dtype: torch.dtype = torch.bfloat16) -> None:
        self.layout, self.layer_num, self.kv_cache_dim = layout, layer_num, kv_cache_dim
        self.page_size, self.logical_page_size, self.dcp_size = page_size, page_size, 1
        self.page_num, self.size = pages, pages * page_size
        self.dtype, self.device, self.pin_memory, self.allocator = dtype, "cpu", False, None
        self._transfer_device = torch.device("cpu")
        self.kv_buffer = self.init_kv_buffer()  # type: ignore[attr-defined]

    def _storage_page_index(self, index: int) -> int:
        return index


for _name, _fn in _sglang_methods("srt/mem_cache/pool_host/mha.py", "MHATokenToKVPoolHost", _METHODS).items():
    setattr(MHATokenToKVPoolHost, _name, _fn)
for _name, _fn in _sglang_methods("srt/mem_cache/pool_host/mla.py", "MLATokenToKVPoolHost",
                                  (*_METHODS, "_storage_page_index")).items():
    setattr(MLATokenToKVPoolHost, _name, _fn)


def host_indices(pages: Sequence[int], page_size: int = 64) -> torch.Tensor:
    """Token indices of host pages, as SGLang's controller passes them."""
    return torch.cat([torch.arange(p * page_size, (p + 1) * page_size, dtype=torch.int64) for p in pages])
