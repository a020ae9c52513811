"""Configuration values: backend spec strings, pool options, and the one schema config files follow.

A backend spec is a URL whose scheme names the backend and whose query holds its options::

    dram://?capacity=8GiB
    uring:///mnt/nvme/kv.pool?capacity=100GiB
    uring:///dev/nvme1n1
    redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import attrs

from .errors import ConfigError, LayoutError
from .layout import KVLayout
from .units import parse_bandwidth, parse_size

__all__ = ["LAYOUT_PRESETS", "BackendSpec", "PoolConfig", "PoolSettings", "environment_overrides", "load_settings"]


@attrs.frozen
class BackendSpec:
    """A parsed backend spec string.

    Attributes
    ----------
    scheme
        The backend's registered name (``dram``, ``uring``...).
    location
        Everything between ``scheme://`` and ``?``: a path for local backends, ``host:port/db`` for remote ones.
    params
        The query options, as strings.
    text
        The original spec, for messages.
    """

    scheme: str
    location: str
    params: Mapping[str, str] = attrs.field(factory=dict)
    text: str = ""

    @classmethod
    def parse(cls, text: str) -> BackendSpec:
        if not isinstance(text, str) or "://" not in text:
            raise ConfigError(f"backend spec {text!r} is not of the form 'scheme://location?option=value'")
        # no fragments: '#' is an ordinary character of a file name (uring:///data/kv#1.pool), never a cut
        parts = urlsplit(text, allow_fragments=False)
        scheme = parts.scheme.lower()
        if not scheme:
            raise ConfigError(f"backend spec {text!r} has no scheme")
        location = parts.netloc + parts.path
        try:
            pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
        except ValueError as exc:
            raise ConfigError(f"backend spec {text!r}: bad query string: {exc}") from None
        params: dict[str, str] = {}
        for k, v in pairs:
            if k in params:
                raise ConfigError(f"backend spec {text!r}: option {k!r} given twice")
            params[k] = v
        return cls(scheme=scheme, location=location, params=params, text=text)

    # typed accessors that say which spec was wrong
    def size(self, name: str, default: int | None = None) -> int | None:
        if name not in self.params:
            return default
        return parse_size(self.params[name], what=f"{self.text}: {name}")

    def bandwidth(self, name: str) -> float | None:
        if name not in self.params:
            return None
        return parse_bandwidth(self.params[name], what=f"{self.text}: {name}")

    def integer(self, name: str, default: int) -> int:
        if name not in self.params:
            return default
        try:
            return int(self.params[name])
        except ValueError:
            raise ConfigError(f"{self.text}: {name} must be an integer, got {self.params[name]!r}") from None

    def flag(self, name: str, default: bool = False) -> bool:
        if name not in self.params:
            return default
        v = self.params[name].lower()
        if v in ("1", "true", "yes", "on", ""):
            return True
        if v in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{self.text}: {name} must be a boolean, got {self.params[name]!r}")

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        v = self.params.get(name, default)
        if v not in choices:
            raise ConfigError(f"{self.text}: {name} must be one of {', '.join(choices)}, got {v!r}")
        return v

    def check_known(self, known: tuple[str, ...]) -> None:
        """Reject options the backend does not understand (a typo must not be silently ignored)."""
        unknown = sorted(set(self.params) - set(known))
        if unknown:
            raise ConfigError(
                f"{self.text}: unknown option(s) {', '.join(unknown)}; {self.scheme}:// takes {', '.join(known)}"
            )


def _write_policy(_i: Any, _a: Any, v: str) -> None:
    if v not in ("write-through", "write-back"):
        raise ConfigError(f"write_policy must be 'write-through' or 'write-back', got {v!r}")


def _positive(_i: Any, a: Any, v: int) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ConfigError(f"{a.name} must be a positive number of bytes, got {v!r}")


@attrs.frozen
class PoolConfig:
    """Pool-wide options (everything but the layout and the backends).

    Attributes
    ----------
    namespace
        Salt mixed into every key (tenant, LoRA adapter...).
    write_policy
        ``write-through``: a put writes every tier before it returns (durable on the persistent ones);
        ``write-back``: a put returns once the first tier has it, lower tiers are written in the background.
    promote_on_hit
        Copy what a restore found in a lower tier into the tiers above it.
    io_max_inflight, io_max_inflight_bytes, io_background_inflight, io_op_bytes
        Per-tier I/O scheduler: operations and bytes in flight, how many of them may be background work (prefetch,
        promotion, write-back), and the size batches are cut into (see :mod:`kvpool.pool.scheduler`).
    staging_bytes
        The pool's own host memory (:class:`~kvpool.storage.staging.StagingArena`): allocated and populated
        (huge pages where the kernel gives them) right after open, page-locked once when CUDA is present, and
        reused for the tensors :meth:`KVPool.get`/:meth:`KVPool.stream` return, :meth:`KVPool.empty`, and
        promotion/write-back copies, so no request pays first-touch page faults. ``None`` (default):
        ``KVPOOL_STAGING_BYTES`` if set, else an eighth of the machine's memory, at most 4 GiB, at least 16 chunks
        (:func:`~kvpool.storage.staging.default_staging_bytes`), per pool and resident once populated (a process
        opening several pools should size them). Size it to the bytes of results callers hold
        at once: a restore beyond it lands in memory faulted on its data path (a third of the device's speed).
    staging_overflow_bytes
        Result memory beyond the staging arena, for restores larger than it was sized for: faulted in on first
        use (so an undersized arena costs first-touch faults once), then reused; bounded; 0 disables.
    staging_wait_s
        How long a request waits for staging memory that other callers still hold before it is served from
        fresh memory instead (counted as ``staging_fallbacks``; a deadlock guard for callers that hold results
        while they ask for more).
    promotion
        Admission for those copies: ``second-hit`` (default) promotes a chunk the second time it is read
        from below within a recent window, so a one-off scan does not flood the fast tier; ``always``.
    write_back_queue_bytes
        Chunks a write-back pool may hold queued for the lower tiers; a put that would exceed it waits
        (back-pressure) until the background writer has made room. Keep it well below the first tier's
        capacity, or chunks are evicted before they reach the tiers below.
    promotion_queue_bytes
        Chunks queued for promotion (and, separately, prefetch moves in flight); beyond it a promotion or
        prefetch is dropped and counted (``promotions_dropped``, ``prefetches_dropped``).
    """

    namespace: str = ""
    write_policy: str = attrs.field(default="write-through", validator=_write_policy)
    promote_on_hit: bool = True
    staging_bytes: int | None = attrs.field(default=None, validator=attrs.validators.optional(_positive))
    staging_overflow_bytes: int = 2 << 30
    staging_wait_s: float = 1.0
    io_max_inflight: int = 32
    io_max_inflight_bytes: int = 1 << 30
    io_background_inflight: int = 1
    io_op_bytes: int = 64 << 20
    promotion: str = attrs.field(default="second-hit", validator=attrs.validators.in_(("second-hit", "always")))
    write_back_queue_bytes: int = 256 << 20
    promotion_queue_bytes: int = 256 << 20

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PoolConfig:
        known = {f.name for f in attrs.fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ConfigError(f"unknown pool option(s): {', '.join(bad)}; known: {', '.join(sorted(known))}")
        return cls(**d)


# --- config files and the one schema -------------------------------------------------------------------------
# Model presets: the KV geometry of common checkpoints (KV heads, not query heads).
LAYOUT_PRESETS: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": {"num_layers": 32, "num_kv_heads": 8, "head_dim": 128, "dtype": "bfloat16"},
    "llama-3.1-70b": {"num_layers": 80, "num_kv_heads": 8, "head_dim": 128, "dtype": "bfloat16"},
    "llama-3.2-1b": {"num_layers": 16, "num_kv_heads": 8, "head_dim": 64, "dtype": "bfloat16"},
    "llama-3.2-3b": {"num_layers": 28, "num_kv_heads": 8, "head_dim": 128, "dtype": "bfloat16"},
    "mistral-7b": {"num_layers": 32, "num_kv_heads": 8, "head_dim": 128, "dtype": "bfloat16"},
    "qwen2.5-7b": {"num_layers": 28, "num_kv_heads": 4, "head_dim": 128, "dtype": "bfloat16"},
    "qwen3-8b": {"num_layers": 36, "num_kv_heads": 8, "head_dim": 128, "dtype": "bfloat16"},
}
_LAYOUT_FIELDS = ("num_layers", "num_kv_heads", "head_dim", "dtype", "chunk_tokens")
_TOP_KEYS = ("layout", "model_id", "backends", "namespace")
_DTYPES = ("float16", "bfloat16", "float32", "float8_e4m3fn", "float8_e5m2", "int8", "uint8")
ENV_PREFIX = "KVPOOL_"


def _pool_fields() -> dict[str, Any]:
    return {f.name: f.default for f in attrs.fields(PoolConfig)}


def _schema_keys() -> list[str]:
    return sorted(set(_TOP_KEYS) | set(_pool_fields()))


@attrs.frozen
class PoolSettings:
    """Everything :meth:`KVPool.open` takes, read from one config file, mapping and environment.

    Attributes
    ----------
    layout
        The model's KV geometry (:class:`~kvpool.KVLayout`).
    model_id
        Names the model; part of every key.
    backends
        Tier specs, fastest first; a tuple inside is one tier striped over its members.
    config
        The pool-wide options (:class:`PoolConfig`, ``namespace`` included).
    source
        Where the settings came from (a path, ``"<mapping>"``), for messages.
    """

    layout: KVLayout
    model_id: str
    backends: tuple[str | tuple[str, ...], ...]
    config: PoolConfig
    source: str = "<mapping>"


def _read_file(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} does not exist")
    suffix = os.path.splitext(path)[1].lower()
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path!r}: {exc.strerror}") from None
    if suffix == ".toml":
        import tomllib

        try:
            data: Any = tomllib.loads(raw.decode())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(
                f"{path}: reading YAML needs PyYAML (pip install 'kvpool[yaml]'), or write the file as TOML"
            ) from None
        try:
            data = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    else:
        raise ConfigError(f"{path}: config files are .toml, .yaml or .yml, not {suffix or 'no suffix'!r}")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a table of options, got {type(data).__name__}")
    return data


def _bool(v: Any, what: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(v, str) and v.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{what} must be true or false, got {v!r}")


def _int(v: Any, what: str) -> int:
    if isinstance(v, bool):
        raise ConfigError(f"{what} must be an integer, got {v!r}")
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        try:
            return int(v)
        except ValueError:
            pass
    raise ConfigError(f"{what} must be an integer, got {v!r}")


def _float(v: Any, what: str) -> float:
    if isinstance(v, bool):
        raise ConfigError(f"{what} must be a number, got {v!r}")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number, got {v!r}") from None


def _coerce_pool_option(name: str, v: Any, where: str) -> Any:
    """A PoolConfig value from a file (typed) or the environment (text): sizes may be written "64MiB"."""
    what = f"{where}: {name}"
    default = _pool_fields()[name]
    if name.endswith("_bytes"):
        if v is None or (isinstance(v, str) and v.lower() in ("", "none", "auto")):
            if default is None:
                return None
            raise ConfigError(f"{what} must be a size such as '256MiB', got {v!r}")
        return parse_size(v, what=what)
    if isinstance(default, bool):
        return _bool(v, what)
    if isinstance(default, int):
        return _int(v, what)
    if isinstance(default, float):
        return _float(v, what)
    if not isinstance(v, str):
        raise ConfigError(f"{what} must be a string, got {v!r}")
    return v


def _layout_dict(v: Any, where: str) -> dict[str, Any]:
    if isinstance(v, str):
        v = {"preset": v}
    if not isinstance(v, Mapping):
        raise ConfigError(f"{where}: layout must be a preset name or a table of {', '.join(_LAYOUT_FIELDS)}")
    out: dict[str, Any] = {}
    if "preset" in v:
        name = str(v["preset"]).lower()
        if name not in LAYOUT_PRESETS:
            raise ConfigError(
                f"{where}: unknown layout preset {v['preset']!r}; presets: {', '.join(sorted(LAYOUT_PRESETS))}"
                " (or give num_layers, num_kv_heads, head_dim, dtype)"
            )
        out.update(LAYOUT_PRESETS[name])
    bad = sorted(set(v) - set(_LAYOUT_FIELDS) - {"preset"})
    if bad:
        raise ConfigError(
            f"{where}: unknown layout option(s) {', '.join(bad)}; known: preset, {', '.join(_LAYOUT_FIELDS)}"
        )
    out.update({k: val for k, val in v.items() if k != "preset"})
    return out


def _build_layout(d: dict[str, Any], where: str) -> KVLayout:
    import torch

    missing = [k for k in ("num_layers", "num_kv_heads", "head_dim", "dtype") if k not in d]
    if missing:
        raise ConfigError(
            f"{where}: layout lacks {', '.join(missing)}; give them or a preset "
            f"({', '.join(sorted(LAYOUT_PRESETS))})"
        )
    dt = d["dtype"]
    if isinstance(dt, str):
        name = dt.removeprefix("torch.")
        if name not in _DTYPES:
            raise ConfigError(f"{where}: layout dtype {dt!r} is not one of {', '.join(_DTYPES)}")
        dt = getattr(torch, name)
    ints = {k: _int(d[k], f"{where}: layout.{k}") for k in ("num_layers", "num_kv_heads", "head_dim") }
    if "chunk_tokens" in d:
        ints["chunk_tokens"] = _int(d["chunk_tokens"], f"{where}: layout.chunk_tokens")
    try:
        return KVLayout(dtype=dt, **ints)
    except LayoutError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _backends(v: Any, where: str) -> tuple[str | tuple[str, ...], ...]:
    if isinstance(v, str):  # the environment's form: comma-separated; "a+b" stripes one tier over a and b
        v = [[p.strip() for p in part.split("+")] if "+" in part else part.strip()
             for part in v.split(",") if part.strip()]
    if not isinstance(v, (list, tuple)) or not v:
        raise ConfigError(f"{where}: backends must be a non-empty list of spec strings such as 'dram://?capacity=8GiB'")
    out: list[str | tuple[str, ...]] = []

    def check(spec: str) -> None:  # a malformed spec is reported here, with the file that holds it
        try:
            BackendSpec.parse(spec)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    for i, b in enumerate(v):
        if isinstance(b, str):
            check(b)
            out.append(b)
        elif isinstance(b, (list, tuple)) and b and all(isinstance(x, str) for x in b):
            for x in b:
                check(x)
            out.append(tuple(b))
        else:
            raise ConfigError(
                f"{where}: backends[{i}] must be a spec string or a list of them (one striped tier), got {b!r}"
            )
    return tuple(out)


def environment_overrides(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The ``KVPOOL_*`` variables as a settings mapping (text values; coerced by :func:`load_settings`).

    ``KVPOOL_MODEL_ID``, ``KVPOOL_BACKENDS`` (comma-separated specs; ``a+b`` is one tier striped over a and b),
    ``KVPOOL_NAMESPACE``, ``KVPOOL_LAYOUT`` (a preset), ``KVPOOL_LAYOUT_<FIELD>`` (``KVPOOL_LAYOUT_DTYPE``...),
    ``KVPOOL_<POOL OPTION>`` (``KVPOOL_WRITE_POLICY``, ``KVPOOL_STAGING_BYTES``...). ``KVPOOL_CONFIG`` names the
    file :func:`load_settings` reads when given no source. Other ``KVPOOL_*`` names raise
    :class:`~kvpool.ConfigError` when they are close to a valid name (a typo must not be ignored) and are
    logged as ignored otherwise, except those in ``KVPOOL_ENV_IGNORE`` (comma-separated), which applications may
    use for their own settings.
    """
    env = os.environ if environ is None else environ
    ignore = {n.strip().upper() for n in env.get("KVPOOL_ENV_IGNORE", "").split(",") if n.strip()}
    known_top = {f"{ENV_PREFIX}{k.upper()}": k for k in _schema_keys() if k != "layout"}
    out: dict[str, Any] = {}
    layout: dict[str, Any] = {}
    bad: list[str] = []
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name in ignore or name in ("KVPOOL_CONFIG", "KVPOOL_ENV_IGNORE"):
            continue
        if name in known_top:
            out[known_top[name]] = value
        elif name == "KVPOOL_LAYOUT":
            layout["preset"] = value
        elif name.startswith("KVPOOL_LAYOUT_") and name[len("KVPOOL_LAYOUT_"):].lower() in _LAYOUT_FIELDS:
            layout[name[len("KVPOOL_LAYOUT_"):].lower()] = value
        else:
            bad.append(name)
    if bad:
        import difflib
        import logging

        valid = sorted([*known_top, "KVPOOL_CONFIG", "KVPOOL_ENV_IGNORE", "KVPOOL_LAYOUT",
                        *(f"KVPOOL_LAYOUT_{f.upper()}" for f in _LAYOUT_FIELDS)])
        # A name close to one of ours is a typo (KVPOOL_WRITEPOLICY): an error, or the setting is lost. Others
        # (a test harness's KVPOOL_TEST, an application's own) are only logged.
        typos = {b: m[0] for b in bad if (m := difflib.get_close_matches(b, valid, n=1, cutoff=0.85))}
        if typos:
            raise ConfigError(
                "unknown environment variable(s) "
                + ", ".join(f"{b} (did you mean {m}?)" for b, m in sorted(typos.items()))
                + f"; kvpool reads {', '.join(valid)} (list your own in KVPOOL_ENV_IGNORE)"
            )
        logging.getLogger("kvpool").warning(
            "ignoring environment variable(s) %s: not kvpool options (list them in KVPOOL_ENV_IGNORE to silence this)",
            ", ".join(sorted(bad)),
        )
    if layout:
        out["layout"] = layout
    return out


def load_settings(
    source: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    defaults: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> PoolSettings:
    """Read and validate pool settings: a TOML/YAML file or a mapping, then ``KVPOOL_*``, then ``overrides``.

    Parameters
    ----------
    source
        A path to a ``.toml``/``.yaml``/``.yml`` file, a mapping with the same keys, or ``None`` (the file named
        by ``KVPOOL_CONFIG``, else the environment alone).
    environ
        The environment to read ``KVPOOL_*`` from (default :data:`os.environ`).
    defaults
        Keys of the schema an application supplies, weaker than all of the above (e.g. the model's layout
        and ``model_id`` in a server whose users configure only the tiers).
    overrides
        Keys of the schema that win over both (``model_id=``, ``backends=``, ``write_policy=``...).

    Raises
    ------
    ConfigError
        Naming the source and the key for every problem; unknown keys list the valid ones.
    """
    env = os.environ if environ is None else environ
    if source is None and env.get("KVPOOL_CONFIG"):
        source = env["KVPOOL_CONFIG"]
    if source is None:
        data: dict[str, Any] = {}
        where = "environment"
    elif isinstance(source, Mapping):
        data = dict(source)
        where = "<mapping>"
    elif isinstance(source, (str, os.PathLike)):
        where = os.fspath(source)
        data = _read_file(where)
    else:
        raise TypeError(f"source must be a path or a mapping, got {type(source).__name__}")
    # A [pool] table is accepted as a grouping of the pool options.
    if isinstance(data.get("pool"), Mapping):
        nested = dict(data.pop("pool"))
        clash = sorted(set(nested) & set(data))
        if clash:
            raise ConfigError(f"{where}: {', '.join(clash)} given both at the top level and in [pool]")
        data.update(nested)
    layers = [("defaults", dict(defaults or {})), (where, data), ("environment", environment_overrides(env)),
              ("overrides", dict(overrides))]
    merged: dict[str, Any] = {}
    layout: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for name, layer in layers:
        bad = sorted(set(layer) - set(_schema_keys()))
        if bad:
            raise ConfigError(f"{name}: unknown option(s) {', '.join(bad)}; valid: {', '.join(_schema_keys())}")
        for k, v in layer.items():
            if k == "layout":
                d = _layout_dict(v, name)
                if "preset" in (v if isinstance(v, Mapping) else {"preset": v}):
                    layout = {}  # a preset replaces what came before, its explicit fields then refine it
                layout.update(d)
                origin["layout"] = name
            else:
                merged[k] = v
                origin[k] = name
    if "model_id" not in merged or not merged["model_id"]:
        raise ConfigError(f"{where}: model_id is required (a name for the model; part of every key)")
    if not isinstance(merged["model_id"], str):
        raise ConfigError(f"{origin['model_id']}: model_id must be a string, got {merged['model_id']!r}")
    if not layout:
        raise ConfigError(
            f"{where}: layout is required: a preset ({', '.join(sorted(LAYOUT_PRESETS))}) or a table of "
            f"{', '.join(_LAYOUT_FIELDS)}"
        )
    if "backends" not in merged:
        raise ConfigError(f"{where}: backends is required, e.g. backends = ['dram://?capacity=8GiB']")
    backends = _backends(merged.pop("backends"), origin["backends"])
    lay = _build_layout(layout, origin["layout"])
    model_id = merged.pop("model_id")
    options = {k: _coerce_pool_option(k, v, origin[k]) for k, v in merged.items()}
    try:
        config = PoolConfig(**options)
    except (TypeError, ValueError) as exc:  # attrs validators (ConfigError is a ValueError too)
        raise ConfigError(f"{where}: {exc}") from None
    return PoolSettings(layout=lay, model_id=model_id, backends=backends, config=config, source=where)
