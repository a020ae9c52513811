"""Issue 10's direct-read rule on io_uring: the DIO memory alignment comes from the device (statx
STATX_DIOALIGN, else sysfs dma_alignment), is exposed in stats, and decides which reads go straight into the
caller's memory."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import torch

from kvpool.ssd.store import UringBackend
from kvpool.ssd.uring_transport import _statx_dio_mem_align, dio_mem_align
from kvpool.testing.backend_tests import rand_bytes, rand_key

MiB = 1 << 20


def _sysfs_dma_alignment(path: Path) -> int | None:
    st = os.stat(path)
    dev = st.st_rdev if stat.S_ISBLK(st.st_mode) else st.st_dev
    for q in (f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/queue/dma_alignment",
              f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/../queue/dma_alignment"):
        if os.path.exists(q):
            return int(Path(q).read_text()) + 1
    return None


def test_probe_agrees_with_the_kernel(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"\0" * 4096)
    fd = os.open(p, os.O_RDONLY)
    try:
        align, source = dio_mem_align(fd)
        sx = _statx_dio_mem_align(fd)
    finally:
        os.close(fd)
    sysfs = _sysfs_dma_alignment(p)
    if sx is not None:
        assert (align, source) == (sx, "statx")
        if sysfs is not None:  # ext4/xfs report the backing device's DMA alignment
            assert sx == max(sysfs, 1) or sx % sysfs == 0
    elif sysfs is not None:
        assert (align, source) == (sysfs, "sysfs")
    else:
        assert (align, source) == (512, "default")
    assert align & (align - 1) == 0


def _at(align: int, n: int, not_multiple_of: int) -> torch.Tensor:
    raw = torch.empty(n + 2 * not_multiple_of, dtype=torch.uint8)
    s = (-raw.data_ptr()) % not_multiple_of + align  # a multiple of align, never of not_multiple_of
    t = raw[s : s + n]
    assert t.data_ptr() % align == 0 and t.data_ptr() % not_multiple_of != 0
    return t


async def test_reads_go_direct_exactly_when_memory_meets_the_alignment(tmp_path: Path) -> None:
    async with UringBackend(tmp_path / "p", 32 * MiB, bounce=8 * MiB) as b:
        a = b.stats()["mem_align"]
        assert b.stats()["mem_align_source"] in ("statx", "sysfs", "default")
        k, d = rand_key(), rand_bytes(1 * MiB)
        await b.write(k, d)
        if a < 4096:  # memory aligned to the device's rule but not to a page: still straight in
            out = _at(a, 1 * MiB, 4096)
            assert await b.read_into(k, out) and torch.equal(out, d)
            assert b.stats()["direct_reads"] == 1 and b.stats()["bounce_reads"] == 0
        if a > 1:  # memory that misses the rule by a little: bounced, still correct
            out = _at(a // 2 if a > 2 else 1, 1 * MiB, a)
            assert await b.read_into(k, out) and torch.equal(out, d)
            assert b.stats()["bounce_reads"] == 1
