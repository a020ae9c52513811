"""The backend registry: spec-string schemes -> backend classes.

Modelled on fsspec's registry: built-in backends are known by dotted path and imported only when used (so
``redis://`` costs nothing unless redis-py is wanted), third-party packages register through the
``kvpool.backends`` entry-point group, and code can call :func:`register_backend` at run time.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from importlib.metadata import entry_points
from types import MappingProxyType
from typing import TYPE_CHECKING

from ..config import BackendSpec
from ..errors import ConfigError, UnknownBackendError

if TYPE_CHECKING:
    from .backend import Backend

__all__ = ["register_backend", "get_backend_class", "known_backends", "registry", "backend_from_spec"]

# Built-ins, by dotted path (imported lazily), with the extra to install when the import fails.
_BUILTIN: dict[str, tuple[str, str | None]] = {
    "dram": ("kvpool.memory.dram:DRAMBackend", None),
    "uring": ("kvpool.ssd.store:UringBackend", None),
    "vhost": ("kvpool.ssd.vhost_store:VhostBackend", None),
    "gpu": ("kvpool.memory.gpu:GPUBackend", None),
    "redis": ("kvpool.remote.redis:RedisBackend", "redis"),
    "rediss": ("kvpool.remote.redis:RedisBackend", "redis"),
    "valkey": ("kvpool.remote.redis:RedisBackend", "redis"),
    "redis+cluster": ("kvpool.remote.redis:RedisBackend", "redis"),
    "mooncake": ("kvpool.remote.mooncake:MooncakeBackend", "mooncake"),
}

_registry: dict[str, type[Backend] | str] = {}
_entry_points_loaded = False


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group="kvpool.backends"):
        _registry.setdefault(ep.name, ep.value)


def register_backend(name: str, cls: type[Backend] | str, *, clobber: bool = False) -> None:
    """Register a backend class (or a ``"module:Class"`` / ``"module.Class"`` path) under a scheme name.

    Raises
    ------
    ConfigError
        If ``name`` is taken (by a built-in or an earlier registration) and ``clobber`` is false.
    """
    if not isinstance(name, str) or not name or "://" in name:
        raise ConfigError(f"backend name must be a bare scheme like 'mystore', got {name!r}")
    name = name.lower()
    _load_entry_points()
    if not clobber and (name in _registry or name in _BUILTIN):
        raise ConfigError(f"a backend named {name!r} is already registered; pass clobber=True to replace it")
    if not isinstance(cls, str):
        from .backend import Backend

        if not (isinstance(cls, type) and issubclass(cls, Backend)):
            raise ConfigError(f"{cls!r} is not a kvpool.storage.backend.Backend subclass")
    _registry[name] = cls


def known_backends() -> list[str]:
    """Every scheme that can be used in a spec string."""
    _load_entry_points()
    return sorted(set(_BUILTIN) | set(_registry))


def _import(path: str, name: str, extra: str | None) -> type[Backend]:
    mod_name, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        hint = f"; install it with `pip install kvpool[{extra}]`" if extra else ""
        raise UnknownBackendError(f"backend {name!r} ({path}) cannot be imported: {exc}{hint}") from exc
    try:
        cls: type[Backend] = getattr(mod, attr)
    except AttributeError:
        raise UnknownBackendError(f"backend {name!r}: {mod_name} has no attribute {attr!r}") from None
    return cls


def get_backend_class(name: str) -> type[Backend]:
    """The class registered under ``name``, importing it if needed."""
    _load_entry_points()
    key = name.lower()
    target = _registry.get(key)
    if target is None and key in _BUILTIN:
        path, extra = _BUILTIN[key]
        cls = _import(path, key, extra)
        return cls
    if target is None:
        raise UnknownBackendError(f"unknown backend scheme {name!r}; known: {', '.join(known_backends())}")
    if isinstance(target, str):
        cls = _import(target, key, None)
        _registry[key] = cls
        return cls
    return target


def registry() -> Mapping[str, type[Backend] | str]:
    """A read-only view of what is registered (built-ins appear as their dotted paths until imported)."""
    _load_entry_points()
    merged: dict[str, type[Backend] | str] = {k: v[0] for k, v in _BUILTIN.items()}
    merged.update(_registry)
    return MappingProxyType(merged)


def backend_from_spec(spec: str | Backend) -> Backend:
    """Turn a spec string (or a ready backend object) into a backend object."""
    from .backend import Backend

    if isinstance(spec, Backend):
        return spec
    if not isinstance(spec, str):
        raise ConfigError(f"a backend must be a spec string or a Backend object, got {type(spec).__name__}")
    parsed = BackendSpec.parse(spec)
    cls = get_backend_class(parsed.scheme)
    return cls.from_spec(parsed)
