#!/usr/bin/env bash
# The GPU check in one command, for a lent GPU machine (its preinstalled torch, no network):
# builds what the CUDA toolkit there can build, checks every op x GPU backend against the
# float64 reference, runs the suite's GPU tests, `loft bench --device cuda`, a training smoke
# run, and writes bench/results/gpu-check-<gpu>/ (see loft_kernels/benchmarks/gpu_check.py).
# At most 8 minutes. Without a GPU it says so in one line and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-$(command -v python || command -v python3)}"
exec timeout 470 "$python" -m loft_kernels.benchmarks.gpu_check "$@"
