"""The pool's staging arena under the io_uring store (issue 10): registered as fixed buffers while I/O runs,
used as the store's staging memory, and the ways that can go wrong.

Everything is real: io_uring on O_DIRECT files under ``tmp_path`` and on loop devices, the kernel's own
refusal of a registration (RLIMIT_MEMLOCK in a child process without CAP_IPC_LOCK), and VmRSS of this process.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kvpool import KVLayout, KVPool
from kvpool.ssd.ops import Op
from kvpool.ssd.store import UringBackend
from kvpool.ssd.uring_transport import UringTransport
from kvpool.storage.staging import StagingArena

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]


def unaligned(n: int, fill: int | None = None) -> torch.Tensor:
    """A plain tensor whose data misses the 512-byte DIO alignment (so reads and writes of it are staged)."""
    t = torch.empty(n + 512, dtype=torch.uint8)
    s = (-t.data_ptr()) % 512 + 64
    v = t[s : s + n]
    if fill is not None:
        v.fill_(fill)
    return v


def rand(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)


async def registered(arena: StagingArena, t: UringTransport) -> None:
    await arena.wait_ready()
    await t.wait_registered()


def transport_of(b: UringBackend) -> UringTransport:
    t = b._transport
    assert isinstance(t, UringTransport)
    return t


# --- the transport: op rewrite --------------------------------------------------------------------------------
async def test_transport_rewrites_single_segment_ops_into_the_arena_as_fixed(tmp_path: Path) -> None:
    """Reads and writes of arena memory go out as READ_FIXED / WRITE_FIXED and move exactly the same bytes
    as plain READV / WRITEV (checked against the file through an independent pread/pwrite)."""
    path = tmp_path / "dev.img"
    with open(path, "wb") as f:
        f.truncate(16 * MiB)
    data = rand(8 * MiB, 1)
    os.pwrite(os.open(path, os.O_WRONLY), data.numpy().tobytes(), 0)
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    arena = StagingArena(8 * MiB)
    t = UringTransport(fd, str(path))
    try:
        await t.attach_memory(arena)
        await registered(arena, t)
        assert t.arena_registered and t.counters["registered_bytes"] == arena.nbytes
        buf = arena.try_empty((4 * MiB,), torch.uint8)
        assert buf is not None
        # one segment inside the arena: fixed; 512-byte steps at odd offsets of the arena check the arithmetic
        res = await t.submit([Op.read_iov(0, [(buf.data_ptr(), MiB)]),
                              Op.read_iov(3 * MiB + 512, [(buf.data_ptr() + MiB + 4096, MiB - 512)])])
        assert res == [MiB, MiB - 512]
        assert t.counters["fixed_ops"] == 2
        assert torch.equal(buf[:MiB], data[:MiB])
        assert torch.equal(buf[MiB + 4096 : 2 * MiB + 3584], data[3 * MiB + 512 : 4 * MiB])
        # two segments cannot be one fixed op: READV, same bytes
        (r,) = await t.submit([Op.read_iov(4 * MiB, [(buf.data_ptr(), 4096), (buf.data_ptr() + 8192, 4096)])])
        assert r == 8192 and t.counters["fixed_ops"] == 2
        assert torch.equal(buf[:4096], data[4 * MiB : 4 * MiB + 4096])
        # a write from the arena: WRITE_FIXED, read back through the page cache by another descriptor
        src = rand(2 * MiB, 2)
        buf[: 2 * MiB].copy_(src)
        (w,) = await t.submit([Op.write_iov(10 * MiB, [(buf.data_ptr(), 2 * MiB)])])
        assert w == 2 * MiB and t.counters["fixed_ops"] == 3
        back = os.pread(os.open(path, os.O_RDONLY), 2 * MiB, 10 * MiB)
        assert back == src.numpy().tobytes()
        # memory outside the arena is left alone (READV)
        plain = torch.empty(MiB + 4096, dtype=torch.uint8)
        off = (-plain.data_ptr()) % 4096
        (r,) = await t.submit([Op.read_iov(0, [(plain.data_ptr() + off, MiB)])])
        assert r == MiB and t.counters["fixed_ops"] == 3
        del buf
    finally:
        await t.aclose()
        os.close(fd)
        arena.close()


async def test_attach_while_reads_are_in_flight(tmp_path: Path) -> None:
    """Registration does not wait for the I/O in flight, nor stop it: reads run all along (before the arena is
    populated, while it is pinned, after), each byte-exact; none fails (no EBUSY), and the later ones are
    fixed."""
    path = tmp_path / "pool.kv"
    objs = {bytes([i]) * 16: rand(MiB + 4096 * i + 100, i) for i in range(8)}
    async with UringBackend(path, 64 * MiB, bounce=8 * MiB) as b:
        for k, v in objs.items():
            await b.write(k, v)
        t = transport_of(b)
        arena = StagingArena(512 * MiB)  # populating takes a while: reads start before it is ready
        assert not arena.ready
        stop = asyncio.Event()
        reads = {"before": 0, "after": 0}

        async def reader(seed: int) -> None:
            outs = {k: unaligned(v.numel()) for k, v in objs.items()}
            while not stop.is_set():
                phase = "after" if t.arena_registered else "before"
                for k, v in objs.items():
                    outs[k].zero_()
                    assert await b.read_into(k, outs[k])
                    assert torch.equal(outs[k], v), k
                reads[phase] += 1

        tasks = [asyncio.ensure_future(reader(i)) for i in range(3)]
        await asyncio.sleep(0.05)
        await b.attach_staging(arena)  # returns at once: registration waits for the population, off the loop
        assert not t.arena_registered
        await registered(arena, t)
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*tasks)
        st = b.stats()
        assert reads["before"] > 0 and reads["after"] > 0, reads
        assert st["read_errors"] == 0 and st["corrupt"] == 0 and st["register_failures"] == 0
        assert st["fixed_ops"] > 0 and st["arena_staging"] > 0
    arena.close()


async def test_reads_before_the_arena_is_ready_are_staged_in_its_populated_part(tmp_path: Path) -> None:
    """Open does not wait for the arena: a request made while it populates is staged in the part already
    populated (plain READV: nothing is registered before the whole arena is), byte-exact."""
    async with UringBackend(tmp_path / "pool.kv", 32 * MiB, bounce=8 * MiB) as b:
        arena = StagingArena(1 << 30)
        await b.attach_staging(arena)
        while arena.populated < 16 * MiB:
            await asyncio.sleep(0.001)
        v = rand(3 * MiB + 1000, 5)
        await b.write(b"k" * 16, unaligned(v.numel()).copy_(v))
        out = unaligned(v.numel(), 0)
        assert await b.read_into(b"k" * 16, out)
        assert torch.equal(out, v)
        st = b.stats()
        if arena.ready:
            pytest.skip("the arena was populated before the reads (too fast a machine to see the early case)")
        assert st["fixed_ops"] == 0 and not st["arena_registered"]
        assert st["arena_staging"] == 2 and st["bounce_staging"] == 0
    arena.close()


# --- the store: staging from the arena ------------------------------------------------------------------------
async def test_store_stages_in_the_arena_with_fixed_ops_byte_exact(make_loop: Callable[[int], str]) -> None:
    """On a raw loop device: unaligned puts and reads are staged in the arena, the ops are fixed, the bytes
    exact -- checked again through a store with no arena (plain READV into its own bounce buffer)."""
    dev = make_loop(64 * MiB)
    objs = {os.urandom(16): rand(n, i) for i, n in enumerate([4096, 100_000, 2 * MiB + 4, 5 * MiB])}
    arena = StagingArena(32 * MiB)
    async with UringBackend(dev, format=True, bounce=8 * MiB) as b:
        await b.attach_staging(arena)
        await registered(arena, transport_of(b))
        for k, v in objs.items():
            await b.write(k, unaligned(v.numel()).copy_(v))
        for k, v in objs.items():
            out = unaligned(v.numel(), 0)
            assert await b.read_into(k, out)
            assert torch.equal(out, v)
            # a range that starts inside a checksum part
            part = unaligned(v.numel() // 3, 0)
            assert await b.read_into(k, part, v.numel() // 2)
            assert torch.equal(part, v[v.numel() // 2 : v.numel() // 2 + part.numel()])
        st = b.stats()
        assert st["fixed_ops"] >= 2 * len(objs)
        assert st["arena_staging"] > 0 and st["bounce_staging"] == 0
        # the bounce buffer was never registered (pinning would have faulted it in)
        assert st["registered_bytes"] == arena.nbytes
    assert arena.free_bytes == arena.nbytes  # every staging slice came back
    async with UringBackend(dev, bounce=8 * MiB) as b:
        for k, v in objs.items():
            out = unaligned(v.numel(), 0)
            assert await b.read_into(k, out)
            assert torch.equal(out, v)
        assert b.stats()["fixed_ops"] > 0  # the bounce buffer, pinned on first use (no arena)
        assert b.stats()["bounce_staging"] > 0
    arena.close()


async def test_full_arena_falls_back_to_the_bounce_buffer(tmp_path: Path) -> None:
    arena = StagingArena(4 * MiB)
    async with UringBackend(tmp_path / "pool.kv", 32 * MiB, bounce=8 * MiB) as b:
        await b.attach_staging(arena)
        await registered(arena, transport_of(b))
        v = rand(3 * MiB, 9)
        await b.write(b"a" * 16, v)
        held = arena.try_empty((4 * MiB,), torch.uint8)  # a caller holds every byte of the arena
        assert held is not None
        out = unaligned(v.numel(), 0)
        assert await b.read_into(b"a" * 16, out)
        assert torch.equal(out, v)
        assert b.stats()["bounce_staging"] == 1
        del held
        out.zero_()
        assert await b.read_into(b"a" * 16, out)
        assert torch.equal(out, v)
        assert b.stats()["bounce_staging"] == 1 and b.stats()["arena_staging"] == 2
    arena.close()


# --- a kernel that refuses ------------------------------------------------------------------------------------
_REFUSED_CHILD = r"""
import asyncio, json, resource, sys, torch
from kvpool.ssd.store import UringBackend
from kvpool.storage.staging import StagingArena
resource.setrlimit(resource.RLIMIT_MEMLOCK, (1 << 20, 1 << 20))  # 1 MiB: no 64 MiB registration fits

async def main(path):
    arena = StagingArena(64 << 20)
    async with UringBackend(path, 32 << 20, bounce=8 << 20) as b:
        await b.attach_staging(arena)
        await arena.wait_ready()
        await b._transport.wait_registered()
        g = torch.Generator().manual_seed(3)
        v = torch.randint(0, 256, (3 << 20,), dtype=torch.uint8, generator=g)
        base = torch.empty((3 << 20) + 1024, dtype=torch.uint8)
        src = base[(-base.data_ptr()) % 512 + 64:][: 3 << 20]
        src.copy_(v)
        await b.write(b"k" * 16, src)
        out = torch.zeros((3 << 20) + 1024, dtype=torch.uint8)[100:][: 3 << 20]
        ok = await b.read_into(b"k" * 16, out)
        st = b.stats()
        print(json.dumps({"ok": ok, "equal": bool(torch.equal(out, v)), **{k: st[k] for k in (
            "register_failures", "fixed_ops", "arena_registered", "arena_staging", "bounce_staging")}}))
    arena.close()

asyncio.run(main(sys.argv[1]))
"""


def test_registration_refused_by_the_kernel_falls_back_to_readv(tmp_path: Path) -> None:
    """A process without CAP_IPC_LOCK is held to RLIMIT_MEMLOCK by io_uring: the kernel refuses to pin the
    arena (ENOMEM). Logged, counted, and the store carries on with plain READV/WRITEV, byte-exact."""
    setpriv = shutil.which("setpriv")
    if setpriv is None or os.geteuid() != 0:
        pytest.skip("needs setpriv and root (to drop CAP_IPC_LOCK from the bounding set)")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    res = subprocess.run([setpriv, "--bounding-set=-ipc_lock", "--inh-caps=-ipc_lock", sys.executable, "-c",
                          _REFUSED_CHILD, str(tmp_path / "pool.kv")],
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report == {"ok": True, "equal": True, "register_failures": 1, "fixed_ops": 0,
                      "arena_registered": False, "arena_staging": 2, "bounce_staging": 0}, report
    assert "cannot register memory with io_uring" in res.stderr


# --- RSS ------------------------------------------------------------------------------------------------------
def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


LAYOUT = KVLayout(num_layers=4, num_kv_heads=4, head_dim=128, dtype=torch.float16, chunk_tokens=256)  # 2 MiB


async def test_restores_through_the_bounce_path_stay_within_the_arena(tmp_path: Path) -> None:
    """A pool over a uring:// file with a 64 MiB arena and the store's default 256 MiB bounce buffer: opening
    it and restoring 128 MiB with get_into into unaligned plain tensors (the bounce path) grows VmRSS by the
    arena plus a small constant -- the bounce buffer is never touched (pinning it alone would add 256 MiB)."""
    arena_bytes, n_prompts, chunks = 64 * MiB, 16, 4
    prompts = [[p * 10_000 + i for i in range(chunks * LAYOUT.chunk_tokens)] for p in range(n_prompts)]
    kvs = [torch.randn(LAYOUT.kv_shape(len(p))).to(LAYOUT.dtype) for p in prompts]
    path = tmp_path / "pool.kv"
    pool = await KVPool.open(layout=LAYOUT, model_id="m", backends=[f"uring://{path}?capacity=512MiB"],
                             config={"staging_bytes": arena_bytes})
    try:
        for p, kv in zip(prompts, kvs):
            await pool.put(p, kv)
        await pool.flush()
    finally:
        await pool.close()
    del pool  # its arena is unmapped before the measurement starts
    gc.collect()
    # the caller's own buffers: plain tensors, resident before the measurement starts, off the DIO alignment
    outs = []
    for p, kv in zip(prompts, kvs):
        base = torch.zeros(kv.nbytes + 1024, dtype=torch.uint8)
        off = (-base.data_ptr()) % 512 + 128
        outs.append(base[off : off + kv.nbytes].view(LAYOUT.dtype).view(kv.shape))
    rss0 = _rss()
    pool = await KVPool.open(layout=LAYOUT, model_id="m", backends=[f"uring://{path}"],
                             config={"staging_bytes": arena_bytes})
    try:
        await pool.ready()
        tier = pool.tiers[0]
        assert isinstance(tier, UringBackend)
        await transport_of(tier).wait_registered()
        for _ in range(2):
            got = await asyncio.gather(*(pool.get_into(p, o) for p, o in zip(prompts, outs)))
            assert got == [len(p) for p in prompts]
        for o, kv in zip(outs, kvs):
            assert torch.equal(o, kv)
        grew = _rss() - rss0
        st = tier.stats()
        assert st["bounce_reads"] > 0 and st["direct_reads"] == 0
        assert st["bounce_staging"] == 0, st  # the store's own bounce buffer was never used
        assert st["arena_staging"] > 0 and st["fixed_ops"] > 0
        assert grew <= arena_bytes + 48 * MiB, f"VmRSS grew {grew / MiB:.0f} MiB (arena {arena_bytes / MiB:.0f})"
    finally:
        await pool.close()


# --- closing ---------------------------------------------------------------------------------------------------
async def test_close_while_the_arena_is_still_populating(tmp_path: Path) -> None:
    """The pending registration is cancelled at close; nothing is left pinned or waiting."""
    arena = StagingArena(1 << 30)
    b = UringBackend(tmp_path / "pool.kv", 16 * MiB, bounce=4 * MiB)
    await b.open()
    await b.attach_staging(arena)
    t = transport_of(b)
    assert t._tasks  # waiting for the population
    await b.close()
    assert not t._tasks
    await arena.wait_ready()
    arena.close()


async def test_pool_ready_includes_the_registration(tmp_path: Path) -> None:
    """``await pool.ready()`` returns only once the io_uring tier has registered the arena, so the first
    request after it pays no pinning."""
    pool = await KVPool.open(layout=LAYOUT, model_id="m", backends=[f"uring://{tmp_path / 'p.kv'}?capacity=64MiB"],
                             config={"staging_bytes": 256 * MiB})
    try:
        assert not pool.tiers[0].stats()["arena_registered"]  # open returned before population
        await pool.ready()
        st = pool.tiers[0].stats()
        assert st["arena_registered"] and st["registered_bytes"] >= 256 * MiB, st
    finally:
        await pool.close()
