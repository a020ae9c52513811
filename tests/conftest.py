from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Pools opened by the tests use a small staging arena (the production default is an eighth of the machine's memory,
# populated in the background: hundreds of short-lived test pools would spend minutes of CPU zeroing it). Tests
# of the default itself clear this variable.
os.environ.setdefault("KVPOOL_STAGING_BYTES", "256MiB")
sys.path.insert(0, str(ROOT / "tests"))

# real servers for the remote tiers (redis, a redis cluster, Mooncake), shared by every test file
from harness.fixtures import (  # noqa: E402,F401
    _no_mooncake_client_left,
    mooncake_cluster,
    mooncake_raw,
    own_mooncake,
    own_redis,
    redis_cluster,
    redis_server,
)
from harness.loopdev import loop_factory  # noqa: E402  (real loop block devices)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (none on this machine)")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture
def make_loop(tmp_path: Path) -> Iterator[Callable[[int], str]]:
    """Factory of real loop block devices of a given size, all detached at the end of the test."""
    with loop_factory(tmp_path) as make:
        yield make


@pytest.fixture(scope="module")
def module_loops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[int], str]]:
    """The same, shared by a test module (devices detached after its last test)."""
    with loop_factory(tmp_path_factory.mktemp("loops")) as make:
        yield make


@pytest.fixture
def disk_tmp(tmp_path: Path) -> Path:
    """A temp dir on a real disk (O_DIRECT does not work on tmpfs)."""
    return tmp_path


os.environ.setdefault("KVPOOL_TEST", "1")

