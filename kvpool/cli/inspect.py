"""``kvpool inspect`` and ``kvpool fsck``: a pool file or device, read without touching it."""

from __future__ import annotations

import asyncio
import logging
import statistics
import sys
from typing import Any

from ..errors import PoolLockedError
from ..ssd.store import UringBackend
from ..units import format_size
from .checks import UsageError
from .reader import BadObject, PoolReader

__all__ = ["describe", "fsck", "print_description", "print_fsck"]

log = logging.getLogger("kvpool")


def _open(path: str) -> PoolReader:
    return PoolReader(path)


def describe(path: str) -> dict[str, Any]:
    """What the pool at ``path`` holds, as plain values (the ``--json`` form of ``inspect``)."""
    with _open(path) as r:
        g = r.geometry
        sizes = [e.length for e in r.entries]
        gaps = r.free_extents()
        return {
            "path": path,
            "kind": "block device" if r.is_block_device else "file",
            "format_version": r.version,
            "capacity": g.total,
            "data_region": g.d_len,
            "metadata": g.d_off,
            "objects": len(r.entries),
            "used_bytes": r.used_bytes,
            "free_bytes": sum(gaps),
            "free_extents": len(gaps),
            "largest_free_extent": max(gaps, default=0),
            "fragmentation": round(r.fragmentation(), 4),
            "object_bytes": {"min": min(sizes, default=0), "median": int(statistics.median(sizes)) if sizes else 0,
                             "max": max(sizes, default=0)},
            "objects_since_checkpoint": len(r.journal_keys),
            "objects_in_checkpoint": len(r.entries) - len([e for e in r.entries if e.key in r.journal_keys]),
            "dropped_overlapping": r.dropped,
            "checkpoint_found": r.epoch is not None,
        }


def _pct(a: float, b: float) -> str:
    return f"{100 * a / b:.0f}%" if b else "-"


def print_description(d: dict[str, Any]) -> None:
    """The human form of :func:`describe`, in 80 columns."""
    sz = d["object_bytes"]
    rows = [
        ("pool", f"{d['path']} ({d['kind']}, read-only view)"),
        ("format", f"kvpool uring format version {d['format_version']}"
                   + ("" if d["checkpoint_found"] else ", no valid checkpoint (empty)")),
        ("capacity", f"{format_size(d['capacity'])} ({format_size(d['data_region'])} for data, "
                     f"{format_size(d['metadata'])} metadata)"),
        ("used", f"{format_size(d['used_bytes'])} in {d['objects']} objects "
                 f"({_pct(d['used_bytes'], d['data_region'])} of data)"),
        ("free", f"{format_size(d['free_bytes'])} in {d['free_extents']} extents, largest "
                 f"{format_size(d['largest_free_extent'])}"),
        ("fragmented", f"{100 * d['fragmentation']:.0f}% (1 - largest free extent / free)"),
        ("objects", f"{format_size(sz['min'])} min, {format_size(sz['median'])} median, "
                    f"{format_size(sz['max'])} max" if d["objects"] else "none"),
        ("age", f"{d['objects_in_checkpoint']} as of the last checkpoint, "
                f"{d['objects_since_checkpoint']} written since"),
        ("models", "not recorded: keys hash model, layout, namespace, tokens"),
    ]
    if d["dropped_overlapping"]:
        rows.append(("superseded", f"{d['dropped_overlapping']} older records overlap newer objects (ignored)"))
    for k, v in rows:
        print(f"{k:11s} {v}")


def fsck(path: str) -> tuple[int, list[BadObject]]:
    """Verify every object's checksums; return (objects, bad ones)."""
    from .bench import Progress

    with _open(path) as r:
        prog = Progress("fsck", sum(e.length for e in r.entries))
        bad = []
        for e, b in r.verify():
            if b is not None:
                bad.append(b)
            prog.advance(e.length)
        return len(r.entries), bad


async def repair(path: str, bad: list[BadObject]) -> int:
    """Delete the bad objects through a writable open (the pool must not be open elsewhere)."""
    try:
        async with UringBackend(path) as b:
            n = 0
            for o in bad:
                if await b.delete(o.key):
                    log.info("fsck --repair %s: deleted object %s at byte %d (%s)", path, o.key.hex(), o.offset,
                             o.problem)
                    n += 1
            await b.flush()
            return n
    except PoolLockedError:
        raise UsageError(f"{path} is open in another process; --repair needs it to itself",
                         "stop that process, or run fsck without --repair (read-only)") from None


def print_fsck(path: str, objects: int, bad: list[BadObject], repaired: int | None) -> None:
    for o in bad:
        print(f"bad  {o.key.hex()[:16]}  byte {o.offset}: {o.problem}")
    line = f"fsck {path}: {objects} objects, " + ("ok" if not bad else f"{len(bad)} bad")
    if repaired is not None:
        line += f", {repaired} deleted"
    print(line)
    if bad and repaired is None:
        print(f"  hint: kvpool fsck --repair {path} deletes them (they already read as misses)")


def run_repair(path: str, bad: list[BadObject]) -> int:
    return asyncio.run(repair(path, bad))
