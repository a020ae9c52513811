"""A stateful (Hypothesis) test of a backend: random put/get/range-read/delete/reopen sequences, checked
against a dict after every step.

:class:`StatefulTests` is mixed into :class:`kvpool.testing.BackendTests`. The machine drives the backend on
an event loop of its own (Hypothesis runs rules synchronously), so the test is a plain function; each
example gets a fresh directory, so a persistent backend's reopen finds exactly what the model says. Sized
(:attr:`StatefulTests.stateful_examples`, :attr:`StatefulTests.stateful_steps`) to finish in seconds.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

from ..storage.backend import Backend
from ._data import rand_bytes, rand_key

__all__ = ["StatefulTests"]

T = TypeVar("T")


class StatefulTests:
    """The stateful test (see the module docstring)."""

    capacity: int
    object_nbytes: int
    #: Hypothesis examples (each a fresh backend) and steps per example
    stateful_examples: int = 8
    stateful_steps: int = 30

    async def make_backend(self, tmp_path: Path, capacity: int) -> Backend:
        raise NotImplementedError

    def test_stateful_against_a_model(self, tmp_path: Path) -> None:
        pytest.importorskip("hypothesis")
        from hypothesis import HealthCheck, settings
        from hypothesis import strategies as st
        from hypothesis.stateful import (
            RuleBasedStateMachine,
            invariant,
            precondition,
            rule,
            run_state_machine_as_test,
        )

        suite = self
        loop = asyncio.new_event_loop()
        examples = itertools.count()
        keys = [rand_key() for _ in range(6)]  # few keys, so that puts overwrite and deletes hit
        sizes = [512, 4096, 3 * 4096 + 100, suite.object_nbytes]

        def run(coro: Coroutine[Any, Any, T]) -> T:
            return loop.run_until_complete(coro)

        async def fresh(where: Path) -> Backend:
            b = await suite.make_backend(where, suite.capacity)
            await b.open()
            return b

        class BackendMachine(RuleBasedStateMachine):
            def __init__(self) -> None:
                super().__init__()
                self.where = tmp_path / f"example-{next(examples)}"
                self.model: dict[bytes, torch.Tensor] = {}
                self.b = run(fresh(self.where))
                self.persistent = self.b.capabilities.persistent
                self.partial = self.b.capabilities.partial_reads

            @rule(k=st.sampled_from(keys), size=st.sampled_from(sizes), seed=st.integers(0, 1 << 16))
            def put(self, k: bytes, size: int, seed: int) -> None:
                data = rand_bytes(size, seed)
                run(self.b.write(k, data))
                self.model[k] = data

            @rule(k=st.sampled_from(keys))
            def get(self, k: bytes) -> None:
                want = self.model.get(k)
                out = torch.zeros(want.numel() if want is not None else 4096, dtype=torch.uint8)
                ok = run(self.b.read_into(k, out))
                assert ok == (want is not None)
                if want is not None:
                    assert torch.equal(out, want)

            @precondition(lambda self: self.partial and bool(self.model))
            @rule(data=st.data())
            def get_range(self, data: Any) -> None:
                k = data.draw(st.sampled_from(sorted(self.model)))
                want = self.model[k]
                off = data.draw(st.integers(0, want.numel() - 1))
                n = data.draw(st.integers(1, want.numel() - off))
                out = torch.zeros(n, dtype=torch.uint8)
                assert run(self.b.read_into(k, out, off))
                assert torch.equal(out, want[off : off + n])

            @rule(k=st.sampled_from(keys))
            def delete(self, k: bytes) -> None:
                assert run(self.b.delete(k)) == (k in self.model)
                self.model.pop(k, None)

            @precondition(lambda self: self.persistent)
            @rule()
            def reopen(self) -> None:
                run(self.b.close())
                self.b = run(fresh(self.where))

            @invariant()
            def membership_and_sizes(self) -> None:
                assert run(self.b.contains_many(keys)) == [k in self.model for k in keys]
                for k in keys:
                    want = self.model.get(k)
                    assert run(self.b.object_size(k)) == (None if want is None else want.numel())

            def teardown(self) -> None:
                run(self.b.close())

        try:
            run_state_machine_as_test(  # type: ignore[no-untyped-call]
                BackendMachine,
                settings=settings(
                    max_examples=self.stateful_examples,
                    stateful_step_count=self.stateful_steps,
                    deadline=None,
                    database=None,
                    suppress_health_check=list(HealthCheck),
                ),
            )
        finally:
            loop.close()
