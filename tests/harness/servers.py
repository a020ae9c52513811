"""Real servers for the remote tiers' tests and benchmarks, on free loopback ports, no mocks.

- :class:`RedisServer` (from :mod:`kvpool.testing.servers`, shipped for backend authors): one redis-server
  to pause (SIGSTOP), resume, kill (SIGKILL), restart and stop;
- :class:`RedisClusterNodes`: three redis-server nodes joined into a Redis Cluster (``redis-cli --cluster``);
- :class:`MooncakeCluster`: ``mooncake_master`` (RPC, HTTP metadata and admin servers) and one storage node
  (the wheel's ``mooncake_client``) lending a segment; its master paused, killed or stopped.

Every class stops what it started in ``stop()`` (also on a failed start). A Mooncake cluster closes the idle
shared clients of its master *before* it stops the master: a client left to the interpreter's exit logs,
from its C++ destructor, that it could not deregister from a metadata server that is gone -- lines that
would land after pytest's summary.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from kvpool.testing.servers import RedisServer

__all__ = [
    "RedisServer", "RedisClusterNodes", "MooncakeCluster", "free_port", "listening", "http_get", "unique_prefix",
    "mooncake_binaries", "stop_process", "close_mooncake_clients",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def http_get(port: int, path: str) -> str | None:
    """The body of ``GET http://127.0.0.1:PORT/PATH``, None when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return str(r.read().decode())
    except OSError:
        return None


def unique_prefix() -> str:
    """A key prefix of one test's own on a shared server."""
    return f"t{uuid.uuid4().hex[:12]}:"


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM (after SIGCONT: a paused process cannot act on it), then SIGKILL after 5 s."""
    if proc is not None and proc.poll() is None:
        try:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class RedisClusterNodes:
    """Three redis-server nodes in one Redis Cluster (no replicas), ready when every node says ``ok``."""

    def __init__(self, workdir: Path, n: int = 3) -> None:
        if shutil.which("redis-cli") is None:
            raise RuntimeError("redis-cli is not installed")
        self.nodes: list[RedisServer] = []
        try:
            for i in range(n):
                self.nodes.append(self._node(workdir / f"node{i}"))
            subprocess.run(
                ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{s.port}" for s in self.nodes),
                 "--cluster-replicas", "0", "--cluster-yes"],
                check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                timeout=30,
            )
            deadline = time.monotonic() + 15
            while True:
                states = [
                    subprocess.run(["redis-cli", "-p", str(s.port), "cluster", "info"], capture_output=True,
                                   text=True, timeout=5, check=False).stdout
                    for s in self.nodes
                ]
                if all("cluster_state:ok" in s for s in states):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the redis cluster did not come up: {states}")
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise

    @staticmethod
    def _node(d: Path) -> RedisServer:
        """One cluster node. Its cluster bus listens on port + 10000, which must exist and be free too, so a
        node that cannot start is tried again on another free port."""
        for _attempt in range(5):
            try:
                srv = RedisServer(d, "--cluster-enabled", "yes", "--cluster-config-file", str(d / "nodes.conf"),
                                  "--cluster-node-timeout", "2000")
            except RuntimeError:
                continue
            if srv.port + 10000 <= 65535:
                return srv
            srv.stop()
        raise RuntimeError(f"no redis cluster node would start in {d}")

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.nodes]

    def stop(self) -> None:
        for s in self.nodes:
            s.stop()


def mooncake_binaries() -> tuple[str, str] | None:
    """``mooncake_master`` and ``mooncake_client`` of the installed wheel (or on PATH), None if missing."""
    try:
        import mooncake
    except ImportError:
        return None
    found = []
    for name in ("mooncake_master", "mooncake_client"):
        here = os.path.join(os.path.dirname(mooncake.__file__), name)
        path = here if os.path.isfile(here) and os.access(here, os.X_OK) else shutil.which(name)
        if path is None:
            return None
        found.append(path)
    return found[0], found[1]


def close_mooncake_clients(master: str | None = None, wait: float = 5.0) -> int:
    """:func:`kvpool.remote.mooncake.close_idle_clients`, or nothing where no client was ever made (the tier
    not imported, or not installed)."""
    if "kvpool.remote.mooncake.client" not in sys.modules:
        return 0
    try:
        from kvpool.remote.mooncake import close_idle_clients
    except ImportError:
        return 0
    return close_idle_clients(master, wait=wait)


class MooncakeCluster:
    """``mooncake_master`` (RPC, HTTP metadata and admin servers on free loopback ports) and one storage node
    lending ``segment`` bytes."""

    def __init__(self, workdir: Path, segment: str = "1GB") -> None:
        bins = mooncake_binaries()
        if bins is None:
            raise RuntimeError("the Mooncake wheel installed no mooncake_master / mooncake_client binary")
        self._master_bin, self._node_bin = bins
        workdir.mkdir(parents=True, exist_ok=True)
        self.master: subprocess.Popen[bytes] | None = None
        self.node: subprocess.Popen[bytes] | None = None
        try:
            self._start_master(workdir)
            self._start_node(workdir, segment)
        except BaseException:
            self.stop()
            raise

    def _start_master(self, workdir: Path) -> None:
        for _attempt in range(5):
            self.port, self.meta_port, self.admin_port = free_port(), free_port(), free_port()
            if len({self.port, self.meta_port, self.admin_port}) < 3:
                continue
            self.master_log = workdir / f"master-{self.port}.log"
            with open(self.master_log, "wb") as log:
                self.master = subprocess.Popen(
                    [self._master_bin, f"--rpc_port={self.port}", "--rpc_address=127.0.0.1",
                     "--enable_http_metadata_server=true", "--http_metadata_server_host=127.0.0.1",
                     f"--http_metadata_server_port={self.meta_port}", "--metrics_host=127.0.0.1",
                     f"--metrics_port={self.admin_port}", "--logtostderr"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                )
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self.master.poll() is None:
                if all(listening(p) for p in (self.port, self.meta_port)) and http_get(
                    self.admin_port, "/get_all_segments"
                ) is not None:
                    return
                time.sleep(0.05)
            stop_process(self.master)  # a port was taken meanwhile, or the master failed: try others
        raise RuntimeError(f"mooncake_master did not start; see {self.master_log}")

    def _start_node(self, workdir: Path, segment: str) -> None:
        for _attempt in range(3):
            self.node_port = free_port()
            self.node_log = workdir / f"node-{self.node_port}.log"
            with open(self.node_log, "wb") as log:
                self.node = subprocess.Popen(
                    [self._node_bin, f"--global_segment_size={segment}", "--host=127.0.0.1",
                     f"--port={self.node_port}", f"--master_server_address=127.0.0.1:{self.port}",
                     f"--metadata_server={self.metadata}"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                )
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.node.poll() is None:
                if (http_get(self.admin_port, "/get_all_segments") or "").strip():
                    return  # its segment is mounted
                time.sleep(0.05)
            stop_process(self.node)
        raise RuntimeError(f"the mooncake storage node did not start; see {self.node_log}")

    @property
    def metadata(self) -> str:
        return f"http://127.0.0.1:{self.meta_port}/metadata"

    @property
    def master_address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def admin(self) -> str:
        return f"127.0.0.1:{self.admin_port}"

    def spec(self, **opts: Any) -> str:
        q = {"metadata": self.metadata, "admin": self.admin, **opts}
        return f"mooncake://{self.master_address}?" + "&".join(f"{k}={v}" for k, v in q.items())

    def backend(self, **kw: Any) -> Any:
        """A :class:`~kvpool.remote.mooncake.MooncakeBackend` of this cluster (its own prefix, a 32 MiB buffer
        unless told otherwise)."""
        from kvpool.remote.mooncake import MooncakeBackend

        kw.setdefault("prefix", unique_prefix())
        kw.setdefault("buffer", 32 << 20)
        return MooncakeBackend(self.master_address, metadata=self.metadata, admin=self.admin, **kw)

    def all_keys(self) -> list[str]:
        return (http_get(self.admin_port, "/get_all_keys") or "").split()

    def pause(self) -> None:
        """SIGSTOP the master: it keeps its connections but answers nothing."""
        if self.master is not None and self.master.poll() is None:
            self.master.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.master is not None and self.master.poll() is None:
            self.master.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL the master (the storage node stays)."""
        if self.master is not None and self.master.poll() is None:
            self.master.send_signal(signal.SIGCONT)
            self.master.kill()
            self.master.wait(5)

    def close_clients(self, wait: float = 5.0) -> int:
        """Close this process's idle Mooncake clients of this master (while it is still up, if it is),
        giving calls abandoned on a dead master ``wait`` seconds to return."""
        return close_mooncake_clients(self.master_address, wait)

    def stop(self) -> None:
        self.resume()
        self.close_clients()
        stop_process(self.node)
        stop_process(self.master)
