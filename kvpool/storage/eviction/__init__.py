"""Eviction policies: which object a full tier gives up first (one module per policy).

A policy only orders keys; the tier that owns the bytes asks it for candidates and skips the ones it cannot
evict right now (pinned by an in-flight read). Policies are plain synchronous objects: every call is O(1)
amortised (the attention-aware policy: O(log n), a heap), because they run on every hit.

The calling protocol (what :mod:`kvpool.memory.dram` and :mod:`kvpool.ssd.store` do)::

    victim = next((k for k in policy.candidates() if not pinned(k)), None)
    ... policy.remove(victim) ...        # then ask for a fresh candidates() stream for the next victim

``insert`` on a write, ``touch`` on a read hit, ``remove`` on a delete or an eviction (also before an
overwrite's ``insert``). The pool additionally calls ``link(parent, child)`` for consecutive chunk keys of
every stored prompt and ``observe(key, mass)`` with the attention mass a chunk received; policies that do not
use them inherit the no-ops.

Policies (``make_policy(name)``, ``dram://?policy=NAME``):

``lru``        least recently used first.
``s3fifo``     S3-FIFO (Yang et al., SOSP'23): a small probationary FIFO, a main FIFO with reinsertion and a
               ghost FIFO; one-hit wonders leave quickly, so a one-off scan does not flush the hot set.
``prefix``     LRU among chunks no other cached chunk depends on (leaves) before any chunk that has cached
               children, so a cached prefix is peeled from its tail and never loses its head first.
``attention``  lowest decayed attention mass first (H2O/Quest-style heavy hitters), ties least recently used.
"""

from __future__ import annotations

from ...errors import ConfigError
from .attention import AttentionAwarePolicy
from .base import EvictionPolicy, PolicyHints
from .lru import LRUPolicy
from .prefix import PrefixAwarePolicy
from .s3fifo import S3FIFOPolicy

__all__ = [
    "POLICIES",
    "AttentionAwarePolicy",
    "EvictionPolicy",
    "LRUPolicy",
    "PolicyHints",
    "PrefixAwarePolicy",
    "S3FIFOPolicy",
    "make_policy",
]


POLICIES: dict[str, type[EvictionPolicy]] = {
    "lru": LRUPolicy,
    "s3fifo": S3FIFOPolicy,
    "prefix": PrefixAwarePolicy,
    "attention": AttentionAwarePolicy,
}


def make_policy(name: str) -> EvictionPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ConfigError(f"unknown eviction policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None
