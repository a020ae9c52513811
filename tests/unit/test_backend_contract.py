"""The backend contract itself: required capabilities, optional surfaces checked once at open, and the
pool using the declared surfaces (flush only durable tiers, hints only hinted ones) instead of probing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest
import torch

from kvpool import KVLayout, KVPool
from kvpool.memory.dram import DRAMBackend
from kvpool.ssd.store import UringBackend
from kvpool.storage.backend import Backend, Capabilities, check_contract
from kvpool.storage.eviction import PrefixAwarePolicy
from kvpool.testing.faults import FaultyBackend, LatencyBackend

CAPS = dict(persistent=False, durable=False, device_memory=False, partial_reads=True, remote=False,
            queued_io=False, eviction_hints=False, host_memory="none", read_bandwidth=None)


def test_every_capability_must_be_declared() -> None:
    assert Capabilities(**CAPS).persistent is False  # type: ignore[arg-type]
    for field in CAPS:
        partial = {k: v for k, v in CAPS.items() if k != field}
        with pytest.raises(TypeError, match=field):
            Capabilities(**partial)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Capabilities(False, False, False, True, False, False, False, "none", None)  # type: ignore[misc]
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="read_bandwidth"):
            Capabilities(**{**CAPS, "read_bandwidth": bad})  # type: ignore[arg-type]


class _Minimal(Backend):
    """Implements the core and nothing optional."""

    async def write(self, key: bytes, src: torch.Tensor) -> None: ...
    async def read_into(self, key: bytes, dest: torch.Tensor, offset: int = 0) -> bool:
        return False
    async def delete(self, key: bytes) -> bool:
        return False
    async def contains(self, key: bytes) -> bool:
        return False
    async def keys(self) -> AsyncIterator[bytes]:
        return
        yield


def test_a_backend_without_capabilities_cannot_be_built() -> None:
    with pytest.raises(TypeError, match="capabilities"):
        _Minimal()  # type: ignore[abstract]


class _Declared(_Minimal):
    capabilities = Capabilities(**CAPS)  # type: ignore[arg-type]
    closed = 0

    async def _close(self) -> None:
        type(self).closed += 1


class _ClaimsDurable(_Declared):
    capabilities = Capabilities(**{**CAPS, "persistent": True, "durable": True})  # type: ignore[arg-type]


class _ClaimsHints(_Declared):
    capabilities = Capabilities(**{**CAPS, "eviction_hints": True})  # type: ignore[arg-type]

    def hint_prefix(self, parent: bytes, child: bytes) -> None:  # but not hint_attention / hint_touch
        pass


class _ClaimsHostMemory(_Declared):
    capabilities = Capabilities(**{**CAPS, "host_memory": "registered"})  # type: ignore[arg-type]


async def test_open_checks_declared_surfaces_once() -> None:
    b = _Declared()
    await b.open()
    await b.flush()  # the documented no-op
    b.hint_prefix(b"a" * 16, b"b" * 16)
    assert b.device_path is None
    await b.close()
    for cls, missing in ((_ClaimsDurable, "flush"), (_ClaimsHints, "hint_attention, hint_touch"),
                          (_ClaimsHostMemory, "attach_staging")):
        before = cls.closed
        bad = cls()
        with pytest.raises(TypeError, match=missing):
            await bad.open()
        assert not bad.is_open and cls.closed == before + 1  # what _open acquired was released again
        with pytest.raises(TypeError):
            check_contract(bad)


async def test_builtin_declarations(tmp_path: Path) -> None:
    async with DRAMBackend(1 << 20) as d, UringBackend(tmp_path / "p.kv", 8 << 20) as u:
        assert d.capabilities.eviction_hints and not d.capabilities.durable and not d.capabilities.queued_io
        assert u.capabilities.durable and u.capabilities.persistent and u.device_path == str(tmp_path / "p.kv")
        for b in (d, u):
            check_contract(b)


async def test_wrappers_forward_every_surface(tmp_path: Path) -> None:
    inner = UringBackend(tmp_path / "p.kv", 8 << 20, policy=PrefixAwarePolicy())
    for w in (FaultyBackend(inner), LatencyBackend(inner)):
        async with w:
            assert w.capabilities.durable and w.device_path == inner.device_path
            await w.flush()
            w.hint_prefix(b"p" * 16, b"c" * 16)
            assert isinstance(inner.policy, PrefixAwarePolicy) and inner.policy._parent[b"c" * 16] == b"p" * 16
    assert LatencyBackend(DRAMBackend(1 << 20)).capabilities.queued_io  # it simulates a device


class _RecordingDRAM(DRAMBackend):
    """A real DRAM tier that also records the optional calls the pool makes."""

    def __init__(self, *a: object, caps: Capabilities, **kw: object) -> None:
        super().__init__(*a, **kw)  # type: ignore[arg-type]
        self._caps = caps
        self.calls: list[str] = []

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    async def flush(self) -> None:
        self.calls.append("flush")

    def hint_prefix(self, parent: bytes, child: bytes) -> None:
        self.calls.append("prefix")
        super().hint_prefix(parent, child)

    def hint_attention(self, key: bytes, mass: float) -> None:
        self.calls.append("attention")


async def test_pool_uses_only_declared_surfaces() -> None:
    layout = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype=torch.float32, chunk_tokens=4)
    base = DRAMBackend.capabilities
    hinted = _RecordingDRAM(1 << 20, caps=base)
    durable = _RecordingDRAM(1 << 20, caps=attrs.evolve(base, eviction_hints=False, persistent=True, durable=True))
    plain = _RecordingDRAM(1 << 20, caps=attrs.evolve(base, eviction_hints=False))
    async with await KVPool.open(layout=layout, model_id="m", backends=[hinted, durable, plain]) as pool:
        tokens = list(range(12))
        await pool.put(tokens, torch.randn(layout.kv_shape(12)))
        await pool.observe_attention(tokens, [1.0, 2.0, 3.0])
        await pool.flush()
    assert hinted.calls.count("prefix") == 2 and hinted.calls.count("attention") == 3
    assert "flush" not in hinted.calls
    assert durable.calls == ["flush"]
    assert plain.calls == []
