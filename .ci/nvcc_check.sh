#!/usr/bin/env bash
# Build check of the CUDA kernels: compile every csrc/cuda/*.cu with plain nvcc
# (no torch headers) for sm_80 and sm_90, then syntax-check the CUDA build's
# torch side (csrc/cuda/*.cpp) against the installed torch's headers and the
# CUDA toolkit's (a CPU-only torch cannot link it). Nothing built here is run.
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

# The torch side: CPU torch wheels ship the c10/cuda headers but not the one CMake
# generates (cuda_cmake_macros.h), so an empty stand-in is put on the include path.
cxx="${CXX:-$(command -v g++ || command -v c++ || true)}"
python="${PYTHON:-$(command -v python || command -v python3 || true)}"
if [ -z "$cxx" ] || [ -z "$python" ] || ! "$python" -c "import torch" 2>/dev/null; then
  echo "nvcc_check: torch side skipped (needs a C++ compiler and an importable torch)"
  exit 0
fi
cuda_include="$(dirname "$(dirname "$(readlink -f "$NVCC")")")/include"
[ -f "$cuda_include/cuda_runtime.h" ] || cuda_include="${CUDA_HOME:-/usr/local/cuda}/include"
mkdir -p "$out/stub/c10/cuda/impl"
echo "#pragma once" > "$out/stub/c10/cuda/impl/cuda_cmake_macros.h"
mapfile -t torch_includes < <("$python" -c "from torch.utils.cpp_extension import include_paths
for p in include_paths(): print('-I' + p)")
py_include="$("$python" -c "import sysconfig; print(sysconfig.get_paths()['include'])")"
for src in csrc/cuda/*.cpp; do
  "$cxx" -std=c++20 -fsyntax-only -Wall -Werror -DLK_WITH_CUDA -DTORCH_EXTENSION_NAME=nvcc_check \
    "${torch_includes[@]}" -isystem "$out/stub" -isystem "$cuda_include" -isystem "$py_include" \
    -I csrc/include -I csrc "$src"
  echo "nvcc_check: $src passes a syntax check against torch $("$python" -c "import torch; print(torch.__version__)")"
done
