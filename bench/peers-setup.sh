#!/usr/bin/env bash
# Optional: install DeepSpeed so that `nearstep bench peers` can run its DeepSpeed rows
# (ZeRO-3 with the optimizer on NVMe, ZeRO-3 with the optimizer on CPU) and
# `nearstep bench io` its DeepSpeed async I/O row. nearstep itself never needs it.
#
#   bash bench/peers-setup.sh            # as root (apt-get), or with sudo for the apt part
#   bash bench/peers-setup.sh --check    # only say whether DeepSpeed and its aio op are usable
#
# What it does, and why:
# - DeepSpeed 0.19.8 with --no-deps: its declared dependencies include a plain `torch`,
#   which on a CPU machine could replace the local CPU build with a CUDA one. Its real
#   runtime dependencies are installed by name instead, with torch pinned to what is here.
# - libaio-dev (Debian/Ubuntu): DeepSpeed's async I/O op (the one ZeRO-Infinity's NVMe
#   swapper uses) links against libaio and compiles on first use.
# - It compiles nothing now: DeepSpeed's ops (cpu_adam, async_io) build on first use,
#   about 3 minutes on 2 cores, cached under ~/.cache/torch_extensions.
set -euo pipefail
cd "$(dirname "$0")/.."

DEEPSPEED_VERSION=0.19.8
TORCH_PIN="torch==$(python -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || echo 2.13.0)"
PY=${PYTHON:-python}

check() {
    DS_ACCELERATOR=cpu "$PY" - <<'PY'
import sys
try:
    import deepspeed
except Exception as exc:  # ImportError, or a broken install
    print(f"deepspeed does not import: {exc}")
    sys.exit(1)
from deepspeed.ops.op_builder import AsyncIOBuilder
ok = AsyncIOBuilder().is_compatible(verbose=False)
print(f"deepspeed {deepspeed.__version__} imports; async I/O op {'compatible' if ok else 'NOT compatible (libaio-dev missing?)'}")
sys.exit(0 if ok else 1)
PY
}

if [[ "${1:-}" == "--check" ]]; then
    check
    exit $?
fi

if command -v apt-get >/dev/null; then
    SUDO=""
    [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq libaio-dev
else
    echo "no apt-get here: install libaio's development files (libaio-devel, libaio-dev) yourself" >&2
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1
"$PY" -m pip install --no-deps "deepspeed==$DEEPSPEED_VERSION"
# DeepSpeed's runtime dependencies, with the torch that is installed pinned, so pip never swaps it.
"$PY" -m pip install "$TORCH_PIN" hjson ninja numpy packaging psutil py-cpuinfo pydantic tqdm einops msgpack

check
