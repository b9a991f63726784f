#!/usr/bin/env bash
# The CUDA checks, for a machine with a GPU (for example the lent H100/H200), in
# under 8 minutes: the tests' CUDA variants, then the step benchmark with the
# model on the GPU. nearstep is pure Python, so it runs from the checkout without
# an install; the machine's own torch (a CUDA build) is used.
#
#   bash bench/gpu_check.sh            # results under $OUT (or bench/results)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-bench/results}"
mkdir -p "$out"
py=python3
$py - <<'PY' 2>&1 | tee "$out/gpu-env.txt"
import os, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0))
print("cpus", os.cpu_count())
PY
status=0
# 1. The CUDA variants of the tests (the CPU ones run in CI).
timeout 240 $py -m pytest -q -p no:cacheprovider -k cuda tests/test_modes.py tests/test_optim.py 2>&1 | tee "$out/gpu-tests.log" || status=1
# 2. The step benchmark with the model on the GPU: none / torch / sync / overlap / delayed.
timeout 200 $py -m nearstep.cli bench step --model mlp --device cuda --rounds 2 --steps 8 \
    --dir /tmp/nearstep-bench --json "$out/bench-step-cuda.json" 2>&1 | tee "$out/bench-step-cuda.log" || status=1
exit $status
