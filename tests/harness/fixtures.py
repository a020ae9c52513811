"""pytest fixtures over :mod:`harness.servers` (imported by ``tests/conftest.py``).

Session-wide servers serve most tests (each test uses its own key prefix); ``own_*`` fixtures give a test a
server of its own, to pause or kill. Every server is stopped in the fixture's finalizer; a Mooncake cluster
closes this process's idle clients of its master first (see :mod:`harness.servers`).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .servers import (
    MooncakeCluster,
    RedisClusterNodes,
    RedisServer,
    close_mooncake_clients,
    mooncake_binaries,
)


def _need_redis() -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")


def _need_mooncake() -> None:
    try:
        import mooncake.store  # noqa: F401
    except ImportError as exc:  # the wheel, or a shared library it needs (libfabric.so.1, libcuda.so.1)
        pytest.skip(f"the Mooncake Store client cannot be imported ({exc}); pip install "
                    "mooncake-transfer-engine-non-cuda (the efa-non-cuda build also needs libfabric1)")
    if mooncake_binaries() is None:
        pytest.skip("the Mooncake wheel installed no mooncake_master / mooncake_client binary")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the whole session."""
    _need_redis()
    with RedisServer(tmp_path_factory.mktemp("redis")) as srv:
        yield srv


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own (to pause or kill)."""
    _need_redis()
    with RedisServer(tmp_path / "own-redis") as srv:
        yield srv


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisClusterNodes]:
    """Three redis-server nodes in one Redis Cluster."""
    _need_redis()
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli is not installed")
    c = RedisClusterNodes(tmp_path / "redis-cluster")
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session")
def mooncake_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MooncakeCluster]:
    """One Mooncake master and storage node for the whole session."""
    _need_mooncake()
    c = MooncakeCluster(tmp_path_factory.mktemp("mooncake"))
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session")
def mooncake_raw(mooncake_cluster: MooncakeCluster) -> Iterator[Any]:
    """A plain Mooncake client of the session cluster, to look at and damage what a backend stored; closed
    before the cluster stops."""
    from mooncake.store import MooncakeDistributedStore

    s = MooncakeDistributedStore()
    rc = s.setup("127.0.0.1", mooncake_cluster.metadata, 0, 64 << 20, "tcp", "", mooncake_cluster.master_address)
    assert rc == 0, f"a raw Mooncake client could not be set up ({rc})"
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def own_mooncake(tmp_path: Path) -> Iterator[MooncakeCluster]:
    """A Mooncake cluster of this test's own (to pause or kill its master)."""
    _need_mooncake()
    c = MooncakeCluster(tmp_path / "own-mooncake", segment="256MB")
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session", autouse=True)
def _no_mooncake_client_left() -> Iterator[None]:
    """At the session's end (inside pytest's output capture, before its summary), close the Mooncake clients
    still left: those whose calls on a killed master had not returned when their cluster stopped. Left to
    the interpreter's exit, they would log from their destructors after the summary."""
    yield
    close_mooncake_clients(None, wait=10.0)
