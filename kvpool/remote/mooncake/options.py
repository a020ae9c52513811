"""The ``mooncake://`` options: defaults, validation of a set of them, and parsing them from a spec string.

Pure: no client, no I/O (except :func:`local_address`, which asks the kernel for a route, sending nothing).
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlsplit

from ...errors import ConfigError
from ..base import COMMON_OPTIONS, RemoteBackend
from ..format import hdr_len

if TYPE_CHECKING:
    from ...config import BackendSpec

MiB = 1 << 20
DEFAULT_BUFFER = 256 * MiB
DEFAULT_MASTER_PORT = 50051
DEFAULT_METADATA_PORT = 8080
DEFAULT_ADMIN_PORT = 9003
# Values sit in the transfer buffer at multiples of this; the buffer's allocator hands out regions aligned so.
SLOT = 64
REGION_ALIGN = 4096
INLINE_OFF = hdr_len(1)  # where an inline object's data starts (64: aligned for any dtype)

OPTIONS = (
    *COMMON_OPTIONS, "metadata", "local", "segment", "buffer", "protocol", "device", "zero_copy", "threads",
    "admin", "replicas",
)


def round_up(n: int, a: int = SLOT) -> int:
    return (n + a - 1) // a * a


def split_hostport(text: str, default_port: int | None, what: str) -> tuple[str, int | None]:
    parts = urlsplit(f"//{text}")
    if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.username:
        raise ConfigError(f"{what} must be host[:port], got {text!r}")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"{what}: bad port in {text!r}") from None
    return parts.hostname, port if port is not None else default_port


def fmt_host(host: str, port: int | None) -> str:
    h = f"[{host}]" if ":" in host else host
    return h if port is None else f"{h}:{port}"


def is_loopback(host: str) -> bool:
    return host == "localhost" or host.startswith("127.") or host == "::1"


def local_address(master_host: str, master_port: int) -> str:
    """The address this host reaches the master from (a UDP connect sends nothing)."""
    if is_loopback(master_host):
        return "127.0.0.1"
    try:
        fam = socket.AF_INET6 if ":" in master_host else socket.AF_INET
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.connect((master_host, master_port))
            return str(s.getsockname()[0])
    except OSError:
        return socket.gethostname()


class Addresses(NamedTuple):
    """Where the master, its metadata server and its admin server are."""

    master_host: str
    master_port: int
    address: str  # host:port of the master, as messages and stats show it
    metadata: str
    admin: str


def validate(
    master: str, *, metadata: str | None, local: str | None, segment: int, buffer: int, part_size: int,
    prefix: str, protocol: str, threads: int, admin: str | None, replicas: int,
) -> Addresses:
    """Check the Mooncake-specific options (the common ones are the base's); :class:`~kvpool.ConfigError`
    naming the first bad one."""
    host, port = split_hostport(master, DEFAULT_MASTER_PORT, "the master address")
    assert port is not None
    two_parts = 2 * round_up(INLINE_OFF + part_size, REGION_ALIGN) if isinstance(part_size, int) else 0
    if not (isinstance(buffer, int) and buffer >= two_parts):
        raise ConfigError(
            f"buffer must hold two parts of {part_size} bytes with their headers (>= {two_parts} bytes), "
            f"got {buffer!r}"
        )
    if not (isinstance(segment, int) and segment >= 0):
        raise ConfigError(f"segment must be a size >= 0, got {segment!r}")
    if any(c.isspace() for c in prefix):
        raise ConfigError(f"prefix must be a str without spaces, got {prefix!r}")
    if not (isinstance(threads, int) and 1 <= threads <= 256):
        raise ConfigError(f"threads must be in [1, 256], got {threads!r}")
    if not (isinstance(replicas, int) and replicas >= 1):
        raise ConfigError(f"replicas must be a positive integer, got {replicas!r}")
    if not isinstance(protocol, str) or not protocol.isidentifier():
        raise ConfigError(f"protocol must be a name like tcp or rdma, got {protocol!r}")
    if local is not None:
        split_hostport(local, None, "local")
    if admin is not None:
        ahost, aport = split_hostport(admin, DEFAULT_ADMIN_PORT, "admin")
    else:
        ahost, aport = host, DEFAULT_ADMIN_PORT
    return Addresses(
        host, port, fmt_host(host, port), metadata or f"http://{fmt_host(host, DEFAULT_METADATA_PORT)}/metadata",
        fmt_host(ahost, aport),
    )


def from_spec(spec: BackendSpec) -> tuple[str, dict[str, Any]]:
    """The master address and the constructor's keyword arguments of a ``mooncake://`` spec."""
    spec.check_known(OPTIONS)
    if spec.scheme != "mooncake":
        raise ConfigError(f"{spec.text}: the mooncake backend does not serve {spec.scheme}://")
    loc = spec.location.strip("/") or f"127.0.0.1:{DEFAULT_MASTER_PORT}"
    return loc, {
        "metadata": spec.params.get("metadata") or None,
        "local": spec.params.get("local") or None,
        "segment": spec.size("segment", 0) or 0,
        "buffer": spec.size("buffer", DEFAULT_BUFFER) or DEFAULT_BUFFER,
        "protocol": spec.params.get("protocol", "tcp"),
        "device": spec.params.get("device", ""),
        "zero_copy": spec.flag("zero_copy", True),
        "threads": spec.integer("threads", 4),
        "admin": spec.params.get("admin") or None,
        "replicas": spec.integer("replicas", 1),
        **RemoteBackend.common_options(spec),
    }
