"""``mooncake://MASTER:PORT`` -- a remote tier on a Mooncake Store cluster, shared by every pool pointing at it.

Spec string::

    mooncake://10.0.0.5:50051?metadata=http://10.0.0.5:8080/metadata&protocol=tcp&timeout=2

Options (``?name=value``): ``metadata`` (the transfer engine's metadata server; default
``http://MASTER_HOST:8080/metadata``, the HTTP server ``mooncake_master --enable_http_metadata_server=true``
runs), ``local`` (this client's transfer-engine address ``host[:port]``; default ``127.0.0.1`` for a loopback
master, else the address this host reaches the master from, with a port the engine picks), ``segment`` (memory
this process lends to the store, default ``0``: a pure client), ``buffer`` (the registered transfer buffer,
default 256MiB), ``protocol`` (``tcp``, default, or ``rdma`` ...), ``device`` (RDMA device names, default
none), ``timeout`` (seconds, default 2.0), ``part_size`` (default 4MiB), ``prefix`` (default ``kvpool:``),
``retry_after`` (seconds the tier is skipped after the master failed to answer, default 1.0), ``zero_copy``
(default true), ``threads`` (client calls in flight, default 4), ``admin`` (the master's HTTP admin address,
used only to list keys; default ``MASTER_HOST:9003``) and ``replicas`` (copies of each object, default 1).

Cluster set-up. ``mooncake_master`` keeps the metadata; the memory is lent by clients that mount a *segment*:
storage nodes (``mooncake_client --global_segment_size=64GB ...``, the "real client" of the Mooncake wheel) or
serving processes themselves (``segment=``). An object lives in whichever segment the master placed it in and
dies with that segment's owner, so pools that come and go should be pure clients (the default) in front of
storage nodes that stay. The store has no capacity of its own here: the segments bound it, and the master
evicts (objects whose lease expired) above its high watermark. An object, or any part of one, evicted
underneath us is a miss, never data.

Object format. An object ``key`` (16 bytes) lives under ``PREFIX`` + the key in hex. Its value starts with a
header: a magic, the object's length, its part size, its number of parts, a random 64-bit version id, the key
itself (a value found under the wrong name is detected) and one xxh3-64 checksum per part, seeded with the key
and the part's index -- checksums of the row-major bytes, so they do not depend on the layout the object was
written from or is read into; the header has a checksum of its own. An object of at most ``part_size`` bytes
is stored inline after its header: one value, one fetch. A larger one is split into parts stored under
``PREFIX HEX:VERSION:INDEX``, so no transfer moves one huge value, and a range read fetches only the parts
that cover the range (whole, since checksums cover whole parts) after the header. Every read verifies what
it uses.

Replacement. Mooncake's ``upsert`` is not atomic for readers: while a value is being replaced a reader is told
the replica is not ready, or may even read a mix. So a write puts the parts under a fresh version id first,
then upserts the header; a reader that meets a value being written retries for a short while, and a reader
whose bytes fail verification reads once more (a torn read of a concurrent replacement then finds the new
value) before it reports a miss. The parts of the version a write replaced are removed ``max(5 s, 4 *
timeout)`` later (or when the backend closes), so a reader that fetched the old header an instant before still
finds them; meanwhile an overwritten multi-part object takes twice its size in the store.

Transfers. The client is synchronous: its calls run in a few daemon worker threads, each bounded by
``timeout`` (plus one second per 256 MiB moved), so the event loop never blocks and a call stuck on a dead
master is abandoned, not waited for. With ``zero_copy`` (the default) values move between the store and one
buffer registered with the transfer engine (page-aligned, page-locked when CUDA is there) by
``batch_get_into``, ``batch_put_from`` and ``batch_upsert_from``; a read then verifies the bytes there and
copies them into the caller's tensor, in place, strided or not. Without it the plain calls (``get_batch``,
``put_batch``, ``upsert_batch``) move Python ``bytes`` through the client's own buffer. Verification and
copies of 8 MiB or more run in a worker thread.

Faults. On the read side (``read_into``, ``read_many``, ``contains``, ``contains_many``, ``object_size``) a
missing, evicted, torn or corrupt object, a timeout, a master that is down or slow is a miss (``False``),
counted in :meth:`MooncakeBackend.stats`, never an exception; a ``delete`` that cannot reach the master returns
``False`` (counted in ``delete_errors``). After a timeout or an RPC failure the tier is skipped for
``retry_after`` seconds (reads miss at once, writes raise), so a dead master costs the serving path one
timeout, not one per call. Writes and :meth:`MooncakeBackend.keys` raise :class:`~kvpool.BackendError`; so
does :meth:`MooncakeBackend.open` when the master cannot be reached. The policy and the breaker are
:class:`~kvpool.remote.base.RemoteBackend`'s.

Lookups. ``contains_many`` is one ``batch_is_exist`` call for all keys.

Clients. Backends of one process with the same master, metadata server, local address, segment and protocol
share one Mooncake client (each with its own registered buffer). The client holds the GIL for about a second
while it closes, stalling every thread of the process, so a pure client outlives its backends for reuse; one
that lends a segment is closed (and its segment unmounted) when its last backend closes.
:func:`close_idle_clients` closes the idle ones while the store is still up (before a test's servers stop,
or at a serving process's shutdown): a client left to the interpreter's exit logs, from its destructor, that
it could not deregister from a metadata server that is gone.

Files: ``options.py`` (defaults, validation), ``client.py`` (error codes, worker threads, the shared-client
cache), ``regions.py`` (the registered transfer buffer), ``core.py`` (life cycle, bounded calls, pipelining,
delayed removal), ``reads.py``, ``writes.py``, ``backend.py`` (the public class).
"""

from .backend import MooncakeBackend
from .client import close_idle_clients

__all__ = ["MooncakeBackend", "close_idle_clients"]
