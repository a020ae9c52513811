"""``flaky://FLAGFILE?inner=SPEC`` -- a test tier that wraps another and fails while FLAGFILE says so.

FLAGFILE holds ``read`` (reads miss, as a backend reports a fault), ``write`` (writes raise BackendError) or
both; missing or empty: healthy. The flag is re-read on every call, so a test flips it between requests.
Imported in the worker through the connector's ``backend_modules`` key.
"""

from __future__ import annotations

import torch

import kvpool
from kvpool.errors import BackendError
from kvpool.storage.registry import backend_from_spec
from kvpool.testing.faults import FaultyBackend


class FlakyBackend(FaultyBackend):
    scheme = "flaky"

    def __init__(self, inner: kvpool.Backend, flag: str) -> None:
        super().__init__(inner)
        self.flag = flag

    @classmethod
    def from_spec(cls, spec: kvpool.BackendSpec) -> FlakyBackend:
        return cls(backend_from_spec(spec.params["inner"]), spec.location)

    def _mode(self) -> str:
        try:
            with open(self.flag) as f:
                return f.read()
        except OSError:
            return ""

    async def write(self, key: bytes, src: torch.Tensor) -> None:
        if "write" in self._mode():
            self.injected += 1
            raise BackendError(5, "injected write fault")
        await self.inner.write(key, src)

    async def read_into(self, key: bytes, dest: torch.Tensor, offset: int = 0) -> bool:
        if "read" in self._mode():
            self.injected += 1
            return False
        return await self.inner.read_into(key, dest, offset)

    def stats(self) -> dict:
        return {**super().stats(), "injected": self.injected}


if "flaky" not in kvpool.known_backends():
    kvpool.register_backend("flaky", FlakyBackend)
