"""The ``kvpool`` command: ``bench``, ``inspect`` and ``fsck``.

Every mistake in a command line is one line on stderr with a hint, exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from ..errors import KVPoolError
from .checks import UsageError

__all__ = ["main"]

_DESCRIPTION = """\
kvpool: a KV-cache store for LLM serving (DRAM, io_uring SSD, remote tiers).

commands:
  bench     fill a uring:// pool, restore it, compare with the raw device (fio)
  inspect   show what a pool file or device holds (read-only)
  fsck      verify every object's checksums; list the bad ones (read-only)
"""

_EPILOG = """\
examples:
  kvpool bench                            1 GiB pool in /var/tmp, removed after
  kvpool bench --size 4GiB --dir /mnt/nvme --keep
  kvpool bench --path /dev/nvme1n1        a raw device (root; data is lost)
  kvpool inspect /var/tmp/kv.pool
  kvpool fsck /var/tmp/kv.pool
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line with a hint (``--help``), exit status 2."""

    def error(self, message: str) -> NoReturn:
        message = message.replace("the following arguments are required:", "missing")  # fits 80 columns
        _fail(f"{self.prog}: {message}", f"{self.prog} --help")


def _fail(message: str, hint: str = "", status: int = 2) -> NoReturn:
    line = f"error: {message}" if not message.startswith("kvpool") else f"{message}"
    if hint:
        line += f" (hint: {hint})"
    print(line if line.startswith("kvpool") else f"kvpool: {line}", file=sys.stderr)
    raise SystemExit(status)


def _version() -> str:
    from .. import __version__

    return f"kvpool {__version__}"


def _parser() -> argparse.ArgumentParser:
    from .bench import LAYOUTS

    fmt = argparse.RawDescriptionHelpFormatter
    ap = _Parser(prog="kvpool", description=_DESCRIPTION, epilog=_EPILOG, formatter_class=fmt)
    ap.add_argument("--version", action="version", version=_version())
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    b = sub.add_parser("bench", help="fill a pool, restore it, compare with fio", formatter_class=fmt,
                       description="Fill a uring:// pool with random KV, flush it, restore it with get_into\n"
                                   "and print GB/s and CPU-s/GB next to fio's best random read.")
    b.add_argument("--path", help="pool file or raw block device to use (kept; a device's data is lost)")
    b.add_argument("--dir", default=None,
                   help="directory for a temp pool file (default: /var/tmp, or /tmp if that is\n"
                        "on disk); on tmpfs the figures measure RAM")
    b.add_argument("--size", default="1GiB", help="bytes of KV to store, e.g. 4GiB (default 1GiB)")
    b.add_argument("--layout", choices=sorted(LAYOUTS), default="8b",
                   help="model geometry: 8b (32 MiB a chunk), 70b (80 MiB), small (2 MiB)")
    b.add_argument("--prompt-chunks", type=int, default=8, metavar="N", help="chunks per prompt (default 8)")
    b.add_argument("--concurrency", type=int, default=4, metavar="N", help="prompts restored at once (4)")
    b.add_argument("--repeat", type=int, default=3, metavar="N", help="restore passes, median taken (3)")
    b.add_argument("--keep", action="store_true", help="keep the temp pool (to inspect it)")
    b.add_argument("--no-fio", action="store_true", help="skip the fio reference")
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    i = sub.add_parser("inspect", help="show what a pool holds (read-only)",
                       description="Show a pool's format, capacity, use, free space and objects.\n"
                                   "Reads only; works while another process has the pool open.",
                       formatter_class=fmt)
    i.add_argument("path", help="pool file or block device")
    i.add_argument("--json", action="store_true", help="print as JSON")
    f = sub.add_parser("fsck", help="verify every object (read-only unless --repair)",
                       description="Read every object and check its checksums; list each bad one\n"
                                   "(key, byte offset, what failed). Exit status 1 if any is bad.",
                       formatter_class=fmt)
    f.add_argument("path", help="pool file or block device")
    f.add_argument("--repair", action="store_true",
                   help="delete the bad objects (needs the pool not open elsewhere)")
    f.add_argument("--json", action="store_true", help="print as JSON")
    return ap


def _runner() -> Any:
    try:
        import uvloop

        return uvloop.run
    except ImportError:  # pragma: no cover - uvloop is an optional extra
        return asyncio.run


def _hint(cmd: str, exc: KVPoolError) -> str:
    from ..errors import ConfigError, PoolLockedError

    if isinstance(exc, PoolLockedError):
        return "another process has it open; inspect and fsck (without --repair) can still read it"
    if isinstance(exc, ConfigError) and cmd in ("inspect", "fsck"):
        return "kvpool bench --keep makes a pool"
    if isinstance(exc, ConfigError):
        return "check --path, --dir and --size"
    return "see docs/configuration.md"


def _command(args: argparse.Namespace) -> int:
    if args.cmd == "bench":
        from . import bench

        plan = bench.Plan(args)
        res = _runner()(bench.run(plan))
        if args.json:
            print(json.dumps(res, indent=2, default=str))
        else:
            bench.report(res, plan)
        return 0
    from . import inspect

    if args.cmd == "inspect":
        d = inspect.describe(args.path)
        if args.json:
            print(json.dumps(d, indent=2))
        else:
            inspect.print_description(d)
        return 0
    objects, bad = inspect.fsck(args.path)
    repaired = inspect.run_repair(args.path, bad) if args.repair and bad else (0 if args.repair else None)
    if args.json:
        print(json.dumps({"objects": objects - (repaired or 0), "bad": len(bad) - (repaired or 0),
                          "repaired": repaired or 0,
                          "bad_objects": [{"key": b.key.hex(), "offset": b.offset, "length": b.length,
                                           "problem": b.problem} for b in bad]}, indent=2))
    else:
        inspect.print_fsck(args.path, objects, bad, repaired)
    return 1 if bad and not args.repair else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kvpool`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        return _command(args)
    except UsageError as exc:
        _fail(f"kvpool {args.cmd}: {exc}", exc.hint)
    except KVPoolError as exc:
        _fail(f"kvpool {args.cmd}: {exc}", _hint(args.cmd, exc))
    except KeyboardInterrupt:
        _fail(f"kvpool {args.cmd}: interrupted", status=130)
    except BrokenPipeError:  # `kvpool inspect ... | head`
        return 0
