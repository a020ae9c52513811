"""Shared remote tiers: Redis/Valkey (``redis.py``) and Mooncake Store (``mooncake/``), over one object format
(``format.py``: header, parts, checksums; ``objects.py``: the values passed around) and one base (``base.py``: options, naming, deadlines, the circuit
breaker, read planning over parts, verification, and the error policy), with one error boundary mapping each
client library's exceptions to kvpool's tree (``boundary.py``). Each transport module only moves values."""
