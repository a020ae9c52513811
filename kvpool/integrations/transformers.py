"""kvpool for Hugging Face ``transformers`` causal LMs.

Three pieces:

- :func:`layout_for` -- the :class:`~kvpool.KVLayout` of a model (or its config).
- :func:`cache_to_kv` / :func:`kv_to_cache` -- convert between a ``DynamicCache`` (batch 1; transformers keeps
  ``[batch, kv_heads, T, head_dim]`` per layer) and kvpool's ``[num_layers, 2, T, kv_heads, head_dim]``.
- :func:`prefill_with_pool` -- a prefill that restores the longest cached prefix of the prompt from the pool,
  runs the model only on the rest, and stores the prompt's new full chunks back::

      logits, cache, hit = await prefill_with_pool(model, pool, input_ids)            # restore, then forward
      logits, cache, hit = await prefill_with_pool(model, pool, input_ids, layerwise=True)

  With ``layerwise=True`` the forward pass starts as soon as layer 0 of the prefix is read: a forward
  pre-hook on every decoder layer waits (``threading.Event``) until that layer's KV has arrived, while the
  pool streams the later layers on the event loop. The forward runs in a worker thread either way, so the
  event loop is never blocked by the model. Pass a :class:`PrefillStats` to see where the time went
  (restore, compute, and the time the hooks stalled waiting for I/O).

transformers is imported lazily (only when a cache is built), so importing this module is cheap. Works with
the ``DynamicCache`` of transformers 5 (``cache.layers[i].keys/.values``); the older ``key_cache``/``value_cache``
lists are handled on a best-effort basis. Models whose cache is not a plain full-attention ``DynamicLayer``
per layer (sliding-window, hybrid, linear-attention layers) are rejected with :class:`NotImplementedError`.
Do not run the same model object from two threads at once (a serving loop should hold a lock around it).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from ..errors import LayoutError, RestoreError
from ..layout import KVLayout
from ..pool.facade import KVPool

_T = TypeVar("_T")
_LAYERWISE_PREFETCH = 2

__all__ = [
    "PrefillStats",
    "cache_argument",
    "cache_to_kv",
    "kv_to_cache",
    "layout_for",
    "output_cache",
    "prefill_with_pool",
]


# --- geometry ------------------------------------------------------------------------------------------------
def _text_config(model_or_config: Any) -> Any:
    config = getattr(model_or_config, "config", model_or_config)
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        try:
            config = get_text(decoder=True)
        except TypeError:
            config = get_text()
    return config


def _geometry(config: Any) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a decoder config."""
    try:
        num_layers = int(config.num_hidden_layers)
        num_heads = int(config.num_attention_heads)
    except AttributeError as exc:
        raise LayoutError(f"config {type(config).__name__} lacks {exc.name}: not a decoder-only LM config") from exc
    num_kv_heads = int(getattr(config, "num_key_value_heads", None) or num_heads)
    head_dim = getattr(config, "head_dim", None)
    if not head_dim:
        head_dim = int(config.hidden_size) // num_heads
    return num_layers, num_kv_heads, int(head_dim)


def _as_dtype(value: Any) -> torch.dtype | None:
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value not in ("", "auto"):
        dt = getattr(torch, value.removeprefix("torch."), None)
        if isinstance(dt, torch.dtype):
            return dt
    return None


def _model_dtype(model_or_config: Any) -> torch.dtype | None:
    params = getattr(model_or_config, "parameters", None)
    if callable(params):
        for p in params():
            if isinstance(p, torch.Tensor) and p.is_floating_point():
                return p.dtype
    config = getattr(model_or_config, "config", model_or_config)
    for name in ("dtype", "torch_dtype"):
        dt = _as_dtype(getattr(config, name, None))
        if dt is not None:
            return dt
    return None


def layout_for(model_or_config: Any, dtype: torch.dtype | None = None, chunk_tokens: int = 256) -> KVLayout:
    """The :class:`~kvpool.KVLayout` of a transformers model or config.

    ``num_layers`` is ``num_hidden_layers``, ``num_kv_heads`` is ``num_key_value_heads`` (falling back to
    ``num_attention_heads``), ``head_dim`` is ``head_dim`` (falling back to ``hidden_size //
    num_attention_heads``). ``dtype`` defaults to the model's parameter dtype, then the config's ``dtype`` /
    ``torch_dtype``, then ``float32``.
    """
    num_layers, num_kv_heads, head_dim = _geometry(_text_config(model_or_config))
    dt = dtype if dtype is not None else (_model_dtype(model_or_config) or torch.float32)
    return KVLayout(
        num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dt, chunk_tokens=chunk_tokens
    )


# --- DynamicCache <-> [L, 2, T, H, D] -----------------------------------------------------------------------
def _new_cache(config: Any) -> Any:
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=config)
    except TypeError:  # transformers < 4.56: no config argument
        cache = DynamicCache()
    layers = getattr(cache, "layers", None)
    if layers:
        plain = [type(layer).__name__ == "DynamicLayer" for layer in layers]
        if not all(plain):
            kinds = sorted({type(layer).__name__ for layer in layers})
            raise NotImplementedError(
                f"only full-attention DynamicLayer caches are supported, this model's cache has {kinds}"
            )
    return cache


def _cache_len(cache: Any) -> int:
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return len(layers)
    return len(cache.key_cache)


def _get_layer(cache: Any, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    layers = getattr(cache, "layers", None)
    if layers is not None:
        layer = layers[i]
        k, v = layer.keys, layer.values
    else:
        k, v = cache.key_cache[i], cache.value_cache[i]
    if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor) or k.dim() != 4:
        raise ValueError(f"layer {i} of the cache holds no KV")
    return k, v


def _set_layer(cache: Any, i: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """Make layer ``i`` of ``cache`` hold exactly ``k``/``v`` (``[1, H, T, D]``), without copying when the
    cache API allows it."""
    layers = getattr(cache, "layers", None)
    if layers is not None and i < len(layers):
        layer = layers[i]
        if not getattr(layer, "is_initialized", True):
            # Lazy-initialise (dtype, device) through the public path with zero tokens, then install the views.
            layer.update(k[:, :, :0], v[:, :, :0])
        layer.keys, layer.values = k, v
        return
    if layers is None and hasattr(cache, "key_cache") and i < len(cache.key_cache):
        cache.key_cache[i], cache.value_cache[i] = k, v
        return
    # A cache whose layers are created on first update (or an old API): the public path (one copy).
    if i != _cache_len(cache):
        raise ValueError(f"layers of a lazily built cache must be set in order (layer {i})")
    cache.update(k, v, i)


def cache_to_kv(
    cache: Any, *, end: int | None = None, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """A new contiguous ``[L, 2, T, H, D]`` tensor holding tokens ``[0, end)`` of a batch-1 ``DynamicCache``."""
    n_layers = _cache_len(cache)
    if n_layers == 0:
        raise ValueError("the cache is empty")
    k0, _ = _get_layer(cache, 0)
    if k0.shape[0] != 1:
        raise ValueError(f"only batch size 1 is supported, the cache has batch {k0.shape[0]}")
    _, H, T, D = k0.shape
    end = T if end is None else end
    if not 0 <= end <= T:
        raise ValueError(f"end={end} outside the cache's {T} tokens")
    out = torch.empty((n_layers, 2, end, H, D), dtype=dtype or k0.dtype, device=device)
    for i in range(n_layers):
        k, v = _get_layer(cache, i)
        if k.shape[2] < end:
            raise ValueError(f"layer {i} holds {k.shape[2]} tokens, {end} were asked for")
        out[i, 0].copy_(k[0, :, :end].transpose(0, 1))
        out[i, 1].copy_(v[0, :, :end].transpose(0, 1))
    return out


def _kv_views(x: torch.Tensor, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` = ``[2, T, H, D]`` (one layer) -> (K, V) as ``[1, H, T, D]`` views (copies only to change
    device or dtype)."""
    x = x.to(device=device, dtype=dtype)
    return x[0].permute(1, 0, 2).unsqueeze(0), x[1].permute(1, 0, 2).unsqueeze(0)


def kv_to_cache(kv: torch.Tensor, config: Any) -> Any:
    """A ``DynamicCache`` (batch 1) holding ``kv`` = ``[L, 2, T, H, D]``.

    The cache's tensors are transposed *views* of ``kv`` (no copy); the model's first update concatenates,
    so ``kv`` itself is never written.
    """
    if kv.dim() != 5 or kv.shape[1] != 2:
        raise LayoutError(f"kv must be [num_layers, 2, T, num_kv_heads, head_dim], got {tuple(kv.shape)}")
    num_layers, num_kv_heads, head_dim = _geometry(_text_config(config))
    if (kv.shape[0], kv.shape[3], kv.shape[4]) != (num_layers, num_kv_heads, head_dim):
        raise LayoutError(
            f"kv {tuple(kv.shape)} does not fit the config ({num_layers} layers, {num_kv_heads} kv heads, "
            f"head_dim {head_dim})"
        )
    cache = _new_cache(getattr(config, "config", config))
    for i in range(num_layers):
        k, v = _kv_views(kv[i], kv.device, kv.dtype)
        _set_layer(cache, i, k, v)
    return cache


# --- prefill -------------------------------------------------------------------------------------------------
@dataclass
class PrefillStats:
    """Where a :func:`prefill_with_pool` call spent its time (seconds) and what it restored."""

    prompt_tokens: int = 0
    hit_tokens: int = 0  # prefix tokens the pool held (whole chunks)
    restored_tokens: int = 0  # tokens whose KV came from the pool (at most prompt_tokens - 1)
    computed_tokens: int = 0  # tokens the model ran on
    stored_tokens: int = 0  # tokens of new chunks written back
    layerwise: bool = False  # the forward overlapped the restore
    restore_s: float = 0.0  # first read issued -> last layer in memory
    compute_s: float = 0.0  # the forward pass (wall; with layerwise, stalls included)
    stall_s: float = 0.0  # layerwise: time the layer pre-hooks waited for KV
    stalled_layers: int = 0  # layerwise: how many layers found their KV not there yet
    ttft_s: float = 0.0  # call -> logits
    store_s: float = 0.0  # writing the new chunks back
    fallback: str = ""  # why a restore was abandoned for a recompute, or layerwise was not possible


class _Aborted(Exception):
    """Raised in the forward thread when the layer-wise restore failed or was cancelled."""


class _LayerGate:
    """Per-layer readiness shared by the event loop (producer) and the forward thread (pre-hooks)."""

    def __init__(self, num_layers: int) -> None:
        self.events = [threading.Event() for _ in range(num_layers)]
        self.error: BaseException | None = None
        self.owner: int | None = None  # thread ident of the forward this gate belongs to
        self.stall_s = 0.0
        self.stalled = 0

    def release(self, layer: int) -> None:
        self.events[layer].set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        for ev in self.events:
            ev.set()

    def hook(self, layer: int) -> Callable[..., None]:
        def pre_hook(_module: Any, _args: Any) -> None:
            if threading.get_ident() != self.owner:
                return  # someone else's forward through this module
            ev = self.events[layer]
            if not ev.is_set():
                t0 = time.perf_counter()
                ev.wait()
                self.stall_s += time.perf_counter() - t0
                self.stalled += 1
            if self.error is not None:
                raise _Aborted(str(self.error))

        return pre_hook


def _decoder_layers(model: Any, num_layers: int) -> Sequence[torch.nn.Module] | None:
    """The model's decoder layers in order (``model.model.layers`` and kin), or None when not found."""
    candidates: list[Any] = []
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            candidates.append(getattr(get_decoder(), "layers", None))
        except (AttributeError, NotImplementedError, TypeError):  # no single decoder: try the usual places
            candidates.append(None)
    inner = getattr(model, "model", None)
    candidates += [getattr(inner, "layers", None), getattr(model, "layers", None)]
    candidates.append(getattr(getattr(model, "transformer", None), "h", None))
    for c in candidates:
        if isinstance(c, torch.nn.ModuleList) and len(c) == num_layers:
            return list(c)
    return None


def _as_ids(input_ids: Any) -> torch.Tensor:
    ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.as_tensor(list(input_ids))
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"input_ids must be 1-D (one prompt), got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError("input_ids is empty")
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be integers, got {ids.dtype}")
    return ids.to(device="cpu", dtype=torch.long)


def _accepts(fn: Any, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def cache_argument(model: Any) -> str:
    """The name ``model.forward`` takes the KV cache under, for decoding after :func:`prefill_with_pool`:
    ``model(**{cache_argument(model): cache}, ...)``.

    Newer transformers (5.24 is tested) name it ``cache`` and warn that ``past_key_values`` goes away in 5.40;
    the 5.16-5.19 that vLLM pins know only ``past_key_values``. The forward's signature says which.
    """
    return "cache" if _accepts(model.forward, "cache") else "past_key_values"


def output_cache(out: Any) -> Any:
    """The cache a forward returned, under either name (a ``ModelOutput`` holds only the fields that are set)."""
    keys = out.keys() if hasattr(out, "keys") else ()
    if "cache" in keys:
        return out["cache"]
    if "past_key_values" in keys:
        return out["past_key_values"]
    return None


def _model_device_dtype(model: Any) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def _run_forward(
    model: Any,
    ids: torch.Tensor,
    start: int,
    cache: Any,
    logits_to_keep: int,
    device: torch.device,
    gate: _LayerGate | None,
) -> tuple[torch.Tensor, Any, float]:
    """Run the model on ``ids[start:]`` with ``cache`` holding positions ``[0, start)``; in a worker thread."""
    if gate is not None:
        gate.owner = threading.get_ident()
    t0 = time.perf_counter()
    n = ids.shape[0]
    positions = torch.arange(start, n, device=device)
    kwargs: dict[str, Any] = {
        "input_ids": ids[start:].unsqueeze(0).to(device),
        cache_argument(model): cache,
        "position_ids": positions.unsqueeze(0),
        "use_cache": True,
    }
    if logits_to_keep:
        kwargs["logits_to_keep"] = logits_to_keep
    if _accepts(model.forward, "cache_position"):  # transformers 4.x
        kwargs["cache_position"] = positions
    with torch.no_grad():  # grad mode is per thread: set it in the thread that runs the model
        out = model(**kwargs)
    return out.logits[0], output_cache(out), time.perf_counter() - t0


async def _join_thread(fut: asyncio.Future[_T]) -> _T:
    """Await a worker thread's future. If the caller is cancelled, wait for the thread to finish anyway (it
    cannot be interrupted) before re-raising: when this returns or raises, the model is no longer in use."""
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        while not fut.done():
            try:
                await asyncio.wait([fut])
            except asyncio.CancelledError:
                continue
        if not fut.cancelled():
            fut.exception()  # retrieved: nobody else will
        raise


def _in_thread(fn: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
    return asyncio.get_running_loop().run_in_executor(None, fn, *args)


async def prefill_with_pool(
    model: Any,
    pool: KVPool,
    input_ids: Any,
    *,
    store: bool = True,
    layerwise: bool = False,
    prefetch_layers: int | None = None,
    logits_to_keep: int = 0,
    stats: PrefillStats | None = None,
) -> tuple[torch.Tensor, Any, int]:
    """Prefill one prompt, restoring its cached prefix from ``pool``; return ``(logits, cache, hit_tokens)``.

    Parameters
    ----------
    model
        A transformers causal LM (batch 1). ``pool.layout`` must match it (see :func:`layout_for`).
    input_ids
        The prompt: a 1-D sequence or tensor of token ids (``[1, T]`` is accepted too).
    store
        Write the prompt's full chunks that the pool did not hold back to it (``pool.put`` skips the rest).
    layerwise
        Start the forward as soon as layer 0 of the prefix is read; each decoder layer waits for its own KV.
        Falls back to restore-then-forward when the model's decoder layers cannot be found.
    prefetch_layers
        Layers read ahead of the one being consumed. Default: all of them when restoring before the forward
        (the KV is kept anyway); 2 with ``layerwise`` (so layer 0 is not queued behind the others).
    logits_to_keep
        0 = logits of every computed token; ``k`` = only the last ``k`` (saves the LM head on long prompts).
    stats
        Filled in with timings and token counts.

    Returns
    -------
    logits
        ``[computed_tokens, vocab]`` (or ``[logits_to_keep, vocab]``) for the *last* tokens of the prompt:
        positions ``hit_tokens .. len(input_ids)-1``.
    cache
        A ``DynamicCache`` holding the KV of the whole prompt, ready for decoding.
    hit_tokens
        Prompt tokens whose KV was restored from the pool instead of computed. At least the last token is
        always computed (there must be logits), so a fully cached prompt reports ``len(input_ids) - 1``.
    """
    t_call = time.perf_counter()
    st = stats if stats is not None else PrefillStats()
    ids = _as_ids(input_ids)
    n = int(ids.shape[0])
    tokens = ids.tolist()
    layout = pool.layout
    st.prompt_tokens = n
    num_layers, num_kv_heads, head_dim = _geometry(_text_config(model))
    if (num_layers, num_kv_heads, head_dim) != (layout.num_layers, layout.num_kv_heads, layout.head_dim):
        raise LayoutError(
            f"the pool's layout ({layout.num_layers} layers, {layout.num_kv_heads} kv heads, head_dim "
            f"{layout.head_dim}) does not match the model ({num_layers}, {num_kv_heads}, {head_dim})"
        )
    device, dtype = _model_device_dtype(model)
    config = model.config
    if prefetch_layers is None:  # everything at once, unless layer 0 should arrive first
        prefetch_layers = _LAYERWISE_PREFETCH if layerwise else num_layers
    prefetch = prefetch_layers
    layers = _decoder_layers(model, num_layers) if layerwise else None
    if layerwise and layers is None:
        st.fallback = "decoder layers not found: restored before the forward"

    restored = 0
    result: tuple[torch.Tensor, Any, float] | None = None
    if layers is not None:
        result, restored = await _prefill_layerwise(
            model, pool, ids, tokens, layers, prefetch, logits_to_keep, device, dtype, st
        )
    else:
        cache = _new_cache(config)
        t0 = time.perf_counter()
        try:
            async for layer, x in pool.stream(tokens, prefetch_layers=prefetch):
                st.hit_tokens = x.shape[1]
                restored = min(x.shape[1], n - 1)
                k, v = _kv_views(x[:, :restored], device, dtype)
                _set_layer(cache, layer, k, v)
        except RestoreError as exc:  # an object vanished mid-restore: recompute everything
            st.fallback = f"restore failed ({exc}): recomputed"
            restored = 0
        st.restore_s = time.perf_counter() - t0 if restored else 0.0
        if restored:
            result = await _join_thread(
                _in_thread(_run_forward, model, ids, restored, cache, logits_to_keep, device, None)
            )
    if result is None:  # nothing cached (or the restore failed): a plain prefill
        restored = 0
        result = await _join_thread(
            _in_thread(_run_forward, model, ids, 0, _new_cache(config), logits_to_keep, device, None)
        )
    logits, cache, st.compute_s = result
    st.restored_tokens = restored
    st.computed_tokens = n - restored
    st.ttft_s = time.perf_counter() - t_call

    if store:
        end = (n // layout.chunk_tokens) * layout.chunk_tokens
        if end > st.hit_tokens:
            t0 = time.perf_counter()
            # Chunks the pool holds are skipped by put; the whole range is still filled so that a chunk evicted
            # since the lookup is written with its true KV, never with garbage.
            kv = await asyncio.to_thread(cache_to_kv, cache, end=end, dtype=layout.dtype)
            await pool.put(tokens[:end], kv)
            st.stored_tokens = end - st.hit_tokens
            st.store_s = time.perf_counter() - t0
    return logits, cache, restored


async def _prefill_layerwise(
    model: Any,
    pool: KVPool,
    ids: torch.Tensor,
    tokens: list[int],
    layers: Sequence[torch.nn.Module],
    prefetch: int,
    logits_to_keep: int,
    device: torch.device,
    dtype: torch.dtype,
    st: PrefillStats,
) -> tuple[tuple[torch.Tensor, Any, float] | None, int]:
    """Restore layer by layer while the forward runs in a worker thread. Returns (None, 0) when nothing was
    restored (the caller runs a plain prefill)."""
    n = int(ids.shape[0])
    num_layers = len(layers)
    t0 = time.perf_counter()
    stream = pool.stream(tokens, prefetch_layers=prefetch)
    try:
        try:
            layer0, x0 = await anext(stream)
        except StopAsyncIteration:
            return None, 0
        except RestoreError as exc:
            st.fallback = f"restore failed ({exc}): recomputed"
            return None, 0
        assert layer0 == 0
        st.hit_tokens = x0.shape[1]
        restored = min(x0.shape[1], n - 1)
        if restored == 0:
            return None, 0
        # Every layer starts as a zero-memory placeholder of the right length (the model reads the cache's
        # length before layer 0 runs); each is swapped for the real KV before its pre-hook lets it run.
        cache = _new_cache(model.config)
        H, D = pool.layout.num_kv_heads, pool.layout.head_dim
        ph = torch.zeros((1, 1, 1, 1), dtype=dtype, device=device).expand(1, H, restored, D)
        for i in range(num_layers):
            _set_layer(cache, i, ph, ph)
        gate = _LayerGate(num_layers)
        k, v = _kv_views(x0[:, :restored], device, dtype)
        _set_layer(cache, 0, k, v)
        gate.release(0)
        handles = [mod.register_forward_pre_hook(gate.hook(i)) for i, mod in enumerate(layers)]
        fut = _in_thread(_run_forward, model, ids, restored, cache, logits_to_keep, device, gate)

        def _unhook(_f: object) -> None:
            for h in handles:
                h.remove()

        fut.add_done_callback(_unhook)  # only once the forward is over: never mutate hooks under it
        try:
            async for layer, x in stream:
                k, v = _kv_views(x[:, :restored], device, dtype)
                _set_layer(cache, layer, k, v)
                gate.release(layer)
                if fut.done():  # the forward failed: stop reading
                    break
            st.restore_s = time.perf_counter() - t0
        except RestoreError as exc:
            gate.fail(exc)
        except BaseException as exc:  # cancelled (or worse): the worker unwinds at its next layer; wait for it
            gate.fail(exc)
            with contextlib.suppress(BaseException):
                await _join_thread(fut)
            raise
        try:
            result = await _join_thread(fut)
        except _Aborted:
            st.fallback = f"restore failed ({gate.error}): recomputed"
            return None, 0
        st.layerwise = True
        st.stall_s, st.stalled_layers = gate.stall_s, gate.stalled
        return result, restored
    finally:
        aclose = getattr(stream, "aclose", None)  # typed as an AsyncIterator; it is an async generator
        if aclose is not None:
            await aclose()
