"""The pool façade and the tier logic behind it: locate, fallback, promotion, write-back, admission, the
per-tier I/O scheduler, and paged restores."""

from .facade import KVPool

__all__ = ["KVPool"]
