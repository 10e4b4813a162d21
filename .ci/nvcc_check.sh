#!/usr/bin/env bash
# Build check of the CUDA kernels: compile every csrc/cuda/*.cu with plain nvcc
# (no torch headers) for sm_80 and sm_90. Nothing built here is run.
# Exits 0 with a printed reason when nvcc is absent, non-zero if a compile fails.
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC="${NVCC:-$(command -v nvcc || true)}"
if [ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [ -z "$NVCC" ]; then
  echo "nvcc_check: skipped, nvcc not found (set NVCC or put it on PATH)"
  exit 0
fi

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
echo "nvcc_check: $("$NVCC" --version | tail -n 1)"
shopt -s nullglob
sources=(csrc/cuda/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
  echo "nvcc_check: no csrc/cuda/*.cu files found" >&2
  exit 1
fi
for src in "${sources[@]}"; do
  obj="$out/$(basename "${src%.cu}").o"
  "$NVCC" -std=c++17 -O3 -Werror all-warnings \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    -I csrc/include -c "$src" -o "$obj"
  echo "nvcc_check: compiled $src for sm_80, sm_90 ($(stat -c %s "$obj") bytes)"
done
echo "nvcc_check: all ${#sources[@]} CUDA sources compiled"
