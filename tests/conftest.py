from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

# real servers for the remote tiers (redis, a redis cluster, Mooncake), shared by every test file
from harness.fixtures import (  # noqa: E402,F401
    _no_mooncake_client_left,
    mooncake_cluster,
    own_mooncake,
    own_redis,
    redis_cluster,
    redis_server,
)


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
def disk_tmp(tmp_path: Path) -> Path:
    """A temp dir on a real disk (O_DIRECT does not work on tmpfs)."""
    return tmp_path


os.environ.setdefault("KVPOOL_TEST", "1")

