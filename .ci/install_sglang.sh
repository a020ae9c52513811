#!/usr/bin/env bash
# Test-only: SGLang 0.5.23's HiCache storage classes for tests/integrations/test_sglang.py.
#
# sglang is installed with --no-deps (its own requirements pin torch==2.14.1 and CUDA kernels); only the
# modules that `import sglang.srt.mem_cache.hicache_storage` / `...storage.backend_factory` really need are
# added. torch stays pinned at 2.13.0 in every command. Idempotent: a second run is a no-op (~2 s).
# Not installed on purpose: torchvision (PyPI's wheel is a CUDA build that cannot load on the CPU torch, and a
# half-loadable torchvision breaks transformers' image utilities for the rest of the suite).
set -euo pipefail
export PIP_DISABLE_PIP_VERSION_CHECK=1
PY=${PYTHON:-python3}
if "$PY" - <<'PY' 2>/dev/null
import importlib.metadata as md, sys
ok = md.version("sglang") == "0.5.23"
for m in ("psutil", "pybase64", "msgspec", "zmq", "triton", "orjson", "requests", "packaging", "PIL",
          "starlette", "pydantic", "tqdm", "IPython", "aiohttp"):
    __import__(m)
sys.exit(0 if ok else 1)
PY
then
  echo "sglang 0.5.23 and its hicache_storage imports are already installed"
  exit 0
fi
# leaf modules imported at module load by sglang.srt.utils / sglang.srt.environ (triton: sglang.srt.utils.common)
"$PY" -m pip install -q torch==2.13.0 psutil pybase64 msgspec pyzmq triton \
  orjson requests packaging pillow starlette pydantic tqdm ipython aiohttp
"$PY" -m pip install -q --no-deps sglang==0.5.23
"$PY" -c "import sglang.srt.mem_cache.storage.backend_factory, torch; assert torch.__version__.startswith('2.13.0'), torch.__version__; print('sglang', __import__('sglang').__version__, 'torch', torch.__version__)"
