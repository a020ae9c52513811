"""LMCache 0.5.6's LocalDiskBackend (use_odirect) on a directory: store N chunks, then restore them cold.

Run under the LMCache venv (see bench_ssd.py, which creates it): prints one JSON line. The restore is timed
in a fresh process after the page cache was dropped, with LMCache's own CPU memory pool (LocalCPUBackend,
allocated at construction, before the timed read) as the destination: the way LMCache serves a request.

    python lmcache_driver.py DIR --chunks 48 --layers 32 --heads 8 --head-dim 128 --chunk-tokens 256 --phase put
    python lmcache_driver.py DIR ... --phase get
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import threading
import time

import torch
from lmcache.utils import CacheEngineKey
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.memory_management import MemoryFormat
from lmcache.v1.metadata import LMCacheMetadata
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend
from lmcache.v1.storage_backend.local_disk_backend import LocalDiskBackend


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--phase", choices=("put", "get"), required=True)
    ap.add_argument("--chunks", type=int, default=48)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--chunk-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0, help="disk_io_threads (0: LMCache's default)")
    args = ap.parse_args()

    dtype = torch.float16
    shape = torch.Size([2, args.layers, args.chunk_tokens, args.heads * args.head_dim])  # KV_2LTD
    chunk_bytes = shape.numel() * 2
    total = args.chunks * chunk_bytes
    extra: dict[str, object] = {"use_odirect": True}
    if args.threads:
        extra["disk_io_threads"] = args.threads
    cfg = LMCacheEngineConfig.from_defaults(
        chunk_size=args.chunk_tokens, local_cpu=False, max_local_cpu_size=total / 2**30 + 0.25,
        local_disk=args.dir.rstrip("/") + "/", max_local_disk_size=total / 2**30 + 1, extra_config=extra,
    )
    md = LMCacheMetadata(model_name="bench", world_size=1, local_world_size=1, worker_id=0, local_worker_id=0,
                         kv_dtype=dtype, kv_shape=(args.layers, 2, args.chunk_tokens, args.heads, args.head_dim))
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    cpu = LocalCPUBackend(cfg, md, dst_device="cpu")  # its memory pool: allocated here, before any request
    disk = LocalDiskBackend(cfg, loop, cpu, "cpu", None, md)
    keys = [CacheEngineKey("bench", 1, 0, 1000 + i, dtype) for i in range(args.chunks)]

    if args.phase == "put":
        for i, k in enumerate(keys):
            obj = cpu.allocate(shape, dtype, MemoryFormat.KV_2LTD)
            assert obj is not None and obj.tensor is not None
            obj.tensor.fill_(float(i % 100))
            disk.submit_put_task(k, obj)
            obj.ref_count_down()
        deadline = time.time() + 600
        while not all(disk.contains(k) for k in keys):
            if time.time() > deadline:
                raise SystemExit("LMCache did not store every chunk")
            time.sleep(0.05)
        os.sync()
        print(json.dumps({"stored": len(keys), "bytes": total}))
        return

    # get: LocalDiskBackend rebuilds its index only from what this process put, so re-insert the metadata of
    # the chunks on disk (as a restarted LMCache would after scanning its directory), untimed
    for k in keys:
        path = disk._key_to_path(k)
        assert os.path.getsize(path) == chunk_bytes, path
        disk.insert_key(k, chunk_bytes, shape, dtype, MemoryFormat.KV_2LTD)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    objs = disk.batched_get_blocking(keys)
    dt = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    assert all(o is not None for o in objs), "LMCache missed a chunk"
    for i, o in enumerate(objs):
        assert o is not None and o.tensor is not None
        v = float(o.tensor.view(-1)[12345])
        assert v == float(i % 100), f"chunk {i}: wrong bytes ({v})"
    cpu_s = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    print(json.dumps({"bytes": total, "seconds": dt, "GBps": total / dt / 1e9, "cpu_s": cpu_s,
                      "cpu_s_per_GB": cpu_s / (total / 1e9), "threads": args.threads or "default"}))
    os._exit(0)  # LMCache's worker threads do not stop on their own


if __name__ == "__main__":
    main()
