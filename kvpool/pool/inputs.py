"""Argument checks the façade makes before any tier sees a call (a caller's mistake must never look like a
device failure to a tier, nor leave half an operation behind)."""

from __future__ import annotations

import torch

from ..config import PoolConfig
from ..errors import ConfigError

__all__ = ["check_config", "check_device"]

_DEVICES = ("cpu", "cuda")


def check_device(t: torch.Tensor, name: str = "kv") -> None:
    """Reject tensors whose memory the tiers cannot read or write.

    Raises
    ------
    TypeError
        ``t`` is not a tensor, or lives on the ``meta`` device (it has a shape but no data).
    ValueError
        ``t`` lives on a device other than CPU or CUDA.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    kind = t.device.type
    if kind == "meta":
        raise TypeError(f"{name} is on the 'meta' device: it has a shape but no data to store or fill")
    if kind not in _DEVICES:
        raise ValueError(f"{name} is on device {t.device}; kvpool moves CPU and CUDA tensors only")


def check_config(config: PoolConfig) -> None:
    """Validate the options the pool itself uses, before any tier is opened.

    Raises
    ------
    ConfigError
        For a limit that is out of range.
    """
    positive = ("io_max_inflight", "io_max_inflight_bytes", "io_op_bytes", "write_back_queue_bytes",
                "promotion_queue_bytes")
    for name in positive:
        v = getattr(config, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    for name in ("io_background_inflight",):
        v = getattr(config, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ConfigError(f"{name} must be a non-negative integer, got {v!r}")
