"""Random put/get/get_into/stream/delete/cancel/reopen sequences against a model of what must be there.

The pool is DRAM over a uring:// file (write-through, so every acknowledged chunk is on the file tier and
survives a reopen). Chunk data is a function of the chunk's key, so any chunk the pool returns can be
checked, and prompts share prefixes so that deletes and cancelled puts hit chunks other prompts rely on.
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvpool import KVLayout, KVPool

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=32, dtype=torch.float16, chunk_tokens=8)
CH = LAYOUT.chunk_nbytes
N_PROMPTS = 6


def prompt(i: int) -> list[int]:
    # a tree of prefixes: prompts 0-2 share their first chunk, 3-5 theirs, pairs share two chunks
    return [i // 3] * 8 + [i // 2 + 10] * 8 + [i + 100] * 8 + [i + 200] * 8


def chunk_data(key: bytes) -> torch.Tensor:
    g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))
    return torch.randn(LAYOUT.kv_shape(8), generator=g).to(LAYOUT.dtype)


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = tempfile.TemporaryDirectory()
        self.pool = self.run(self.open())
        self.must: set[bytes] = set()  # chunks that must be stored (acknowledged, not deleted since)

    def run(self, coro):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coro)

    async def open(self) -> KVPool:
        return await KVPool.open(
            layout=LAYOUT, model_id="m",
            backends=[f"dram://?capacity={12 * CH}", f"uring://{Path(self.dir.name)}/p.kv?capacity=16MiB"],
            config={"promotion": "always"},
        )

    def kv(self, i: int) -> torch.Tensor:
        return torch.cat([chunk_data(k) for k in self.pool.keys_for(prompt(i))], dim=2)

    def expected_hit(self, i: int) -> int:
        n = 0
        for k in self.pool.keys_for(prompt(i)):
            if k not in self.must:
                break
            n += 1
        return n * 8

    def check(self, i: int, got: torch.Tensor, n: int) -> None:
        keys = self.pool.keys_for(prompt(i))
        assert n >= self.expected_hit(i), (n, self.expected_hit(i))
        for c in range(n // 8):
            assert torch.equal(got[:, :, c * 8:(c + 1) * 8], chunk_data(keys[c])), f"wrong bytes, chunk {c}"

    @rule(i=st.integers(0, N_PROMPTS - 1))
    def put(self, i: int) -> None:
        assert self.run(self.pool.put(prompt(i), self.kv(i))) == 32
        self.must.update(self.pool.keys_for(prompt(i)))

    @rule(i=st.integers(0, N_PROMPTS - 1), delay=st.sampled_from([0, 1, 3]))
    def cancelled_put(self, i: int, delay: int) -> None:
        async def go() -> None:
            t = asyncio.ensure_future(self.pool.put(prompt(i), self.kv(i)))
            for _ in range(delay):
                await asyncio.sleep(0)
            t.cancel()
            try:
                await t
            except asyncio.CancelledError:
                return
            self.must.update(self.pool.keys_for(prompt(i)))  # it finished before the cancel landed

        self.run(go())

    @rule(i=st.integers(0, N_PROMPTS - 1))
    def get(self, i: int) -> None:
        got = self.run(self.pool.get(prompt(i)))
        self.check(i, got, got.shape[2])

    @rule(i=st.integers(0, N_PROMPTS - 1))
    def get_into(self, i: int) -> None:
        out = torch.zeros(LAYOUT.kv_shape(32), dtype=LAYOUT.dtype)
        n = self.run(self.pool.get_into(prompt(i), out))
        self.check(i, out, n)

    @rule(i=st.integers(0, N_PROMPTS - 1))
    def stream(self, i: int) -> None:
        async def go() -> tuple[torch.Tensor, int]:
            layers = [x async for _l, x in self.pool.stream(prompt(i))]
            if not layers:
                return torch.zeros(LAYOUT.kv_shape(0), dtype=LAYOUT.dtype), 0
            return torch.stack(layers), layers[0].shape[1]

        got, n = self.run(go())
        self.check(i, got, n)

    @rule(i=st.integers(0, N_PROMPTS - 1))
    def delete(self, i: int) -> None:
        self.run(self.pool.delete(prompt(i)))
        self.must.difference_update(self.pool.keys_for(prompt(i)))

    @rule()
    def reopen(self) -> None:
        self.run(self.pool.close())
        self.pool = self.run(self.open())  # DRAM starts empty; the file tier holds every acknowledged chunk

    @precondition(lambda self: True)
    @invariant()
    def no_claims_leak(self) -> None:
        assert len(self.pool._tiers.intents) == 0

    def teardown(self) -> None:
        self.run(self.pool.close())
        self.loop.close()
        self.dir.cleanup()


PoolMachine.TestCase.settings = settings(
    max_examples=6, stateful_step_count=20, deadline=None,
    suppress_health_check=[HealthCheck.too_slow], derandomize=True,
)
TestPoolModel = PoolMachine.TestCase
