"""The `kvpool` command through its real entry point (the console script, in a subprocess): bench end to end,
inspect and fsck on real pool files (also while another process holds the pool open), and every user mistake
answered by one line with a hint and exit status 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import kvpool
from kvpool import KVLayout, KVPool

KVPOOL = shutil.which("kvpool") or pytest.skip("the kvpool console script is not installed", allow_module_level=True)


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KVPOOL, *args], capture_output=True, text=True, timeout=timeout)


def assert_readable(text: str) -> None:
    for line in text.splitlines():
        assert len(line) <= 80, f"line wider than 80 columns: {line!r}"


def test_version_and_help() -> None:
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"kvpool {kvpool.__version__}"
    for args in (("--help",), ("bench", "--help"), ("inspect", "--help"), ("fsck", "--help")):
        r = run(*args)
        assert r.returncode == 0 and "``" not in r.stdout  # plain text, not RST
        assert_readable(r.stdout)


def test_bench_small_json(tmp_path: Path) -> None:
    r = run("bench", "--size", "16MiB", "--layout", "small", "--repeat", "1", "--no-fio", "--json", "--dir",
            str(tmp_path))
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["get_into_GBps"] > 0 and res["tier"]["hits"] > 0 and res["tier"]["corrupt"] == 0
    assert "restore" in r.stderr  # progress output
    assert not list(tmp_path.iterdir())  # the temp pool is removed


def test_bench_keep_leaves_a_pool_to_inspect(tmp_path: Path) -> None:
    r = run("bench", "--size", "16MiB", "--layout", "small", "--repeat", "1", "--no-fio", "--keep", "--dir",
            str(tmp_path))
    assert r.returncode == 0, r.stderr
    pools = list(tmp_path.glob("kvpool-bench-*/pool.kv"))
    assert_readable(r.stdout.replace(str(pools[0]), "P"))
    assert len(pools) == 1 and f"kvpool inspect {pools[0]}" in r.stdout
    r = run("inspect", str(pools[0]))
    assert r.returncode == 0, r.stderr
    assert_readable(r.stdout.replace(str(pools[0]), "P"))
    assert "used        16.0 MiB in 8 objects" in r.stdout and "format      kvpool uring format version" in r.stdout
    d = json.loads(run("inspect", "--json", str(pools[0])).stdout)
    assert d["objects"] == 8 and d["used_bytes"] == 16 << 20 and d["free_bytes"] + d["used_bytes"] == d["data_region"]


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")
def test_dir_dev_shm_is_a_directory_on_tmpfs_not_a_block_device() -> None:
    r = run("bench", "--size", "8MiB", "--layout", "small", "--prompt-chunks", "2", "--repeat", "1", "--no-fio",
            "--dir", "/dev/shm")
    assert r.returncode == 0, r.stderr
    assert "/dev/shm is tmpfs (memory): the figures measure RAM" in r.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("bench", "--size", "1XB"), "--size 1XB: not a size"),
        (("bench", "--size", "0"), "--size must be more than 0"),
        (("bench", "--size", "64MiB"), "--size 64MiB is less than one prompt"),
        (("bench", "--dir", "/nope"), "--dir /nope: no such directory"),
        (("bench", "--dir", "/etc/hostname"), "--dir /etc/hostname: not a directory"),
        (("bench", "--concurrency", "0"), "--concurrency must be at least 1"),
        (("bench", "--prompt-chunks", "0"), "--prompt-chunks must be at least 1"),
        (("bench", "--repeat", "0"), "--repeat must be at least 1"),
        (("bench", "--concurrency", "x"), "invalid int value: 'x'"),
        (("bench", "--layout", "9b"), "invalid choice: '9b'"),
        (("bench", "--path", "/nope/dir/p.kv"), "directory /nope/dir does not exist"),
        (("inspect", "/nope"), "/nope does not exist"),
        (("inspect", "/etc"), "neither a pool file nor a block device"),
        (("fsck", "/etc/hostname"), "is not a kvpool pool"),
        (("frobnicate",), "invalid choice: 'frobnicate'"),
        ((), "kvpool: missing COMMAND"),
    ],
)
def test_user_errors_are_one_line_with_a_hint_and_exit_2(args: tuple[str, ...], needle: str) -> None:
    r = run(*args, timeout=60)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert needle in lines[0] and "(hint: " in lines[0]


def test_inspect_refuses_a_file_that_is_not_a_pool_and_leaves_it_alone(tmp_path: Path) -> None:
    p = tmp_path / "notes.txt"
    p.write_bytes(b"my precious data\n" * 1000)
    before = p.read_bytes()
    for cmd in ("inspect", "fsck"):
        r = run(cmd, str(p))
        assert r.returncode == 2 and "is not a kvpool pool (starts with b'my precious " in r.stderr
    assert p.read_bytes() == before


async def make_pool(path: Path) -> tuple[int, int]:
    """A 4-object pool; return (absolute offset of its first object, that object's length)."""
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.float16, chunk_tokens=256)
    async with KVPool.open(layout=layout, model_id="m", backends=[f"uring://{path}?capacity=16MiB"]) as pool:
        await pool.put(list(range(1024)), torch.randn(layout.kv_shape(1024)).half())
        tier = pool.tiers[0]
        first = next(iter(tier._index.values()))  # type: ignore[attr-defined]
        return tier._geo.d_off + first.offset, first.length  # type: ignore[attr-defined]


async def test_fsck_lists_each_bad_object_and_repairs(tmp_path: Path) -> None:
    path = tmp_path / "p.kv"
    off, length = await make_pool(path)
    r = run("inspect", str(path))
    assert r.returncode == 0 and "in 4 objects" in r.stdout
    r = run("fsck", str(path))
    assert r.returncode == 0 and r.stdout.strip().endswith("4 objects, ok"), r.stdout
    with open(path, "r+b") as f:
        f.seek(off + 100)
        f.write(b"\xde\xad")
    r = run("fsck", str(path))
    assert r.returncode == 1
    bad = [line for line in r.stdout.splitlines() if line.startswith("bad ")]
    assert len(bad) == 1 and f"byte {off}: checksum mismatch, part 1/" in bad[0]
    assert "kvpool fsck --repair" in r.stdout
    assert_readable(r.stdout.replace(str(path), "P"))
    d = json.loads(run("fsck", "--json", str(path)).stdout)
    assert d["bad"] == 1 and d["bad_objects"][0]["offset"] == off and len(d["bad_objects"][0]["key"]) == 32
    r = run("fsck", "--repair", str(path))
    assert r.returncode == 0 and "1 bad, 1 deleted" in r.stdout, r.stdout + r.stderr
    assert json.loads(run("fsck", "--json", str(path)).stdout)["objects"] == 3


HOLDER = textwrap.dedent("""
    import asyncio, sys
    from kvpool.ssd.store import UringBackend

    async def main():
        async with UringBackend(sys.argv[1]) as b:
            print("open", flush=True)
            await asyncio.sleep(120)

    asyncio.run(main())
""")


async def test_inspect_and_fsck_read_a_pool_another_process_holds_open(tmp_path: Path) -> None:
    path = tmp_path / "p.kv"
    await make_pool(path)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        t0 = time.monotonic()
        r = run("inspect", str(path))
        assert r.returncode == 0 and "in 4 objects" in r.stdout, r.stderr
        r = run("fsck", str(path))
        assert r.returncode == 0 and "4 objects, ok" in r.stdout, r.stderr
        assert time.monotonic() - t0 < 60
        r = run("fsck", "--repair", str(path))  # nothing bad: no writable open needed
        assert r.returncode == 0
        assert holder.poll() is None
    finally:
        holder.kill()
        holder.wait()
