// Definitions shared by the CPU (C++/OpenMP) and CUDA kernels.
//
// Everything under csrc/include/loft_kernels/ is plain C++ that needs neither
// torch nor the CUDA toolkit, so the .cu files compile with plain nvcc and the
// CPU build (whose tests run everywhere) exercises the same arithmetic.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LK_HOST_DEVICE __host__ __device__
#else
#define LK_HOST_DEVICE
#endif

namespace loft_kernels {

// Index of the segment that holds `pos`, given `n` ascending segment starts with
// starts[0] == 0: the last s with starts[s] <= pos. Empty segments (equal starts)
// are skipped because the search takes the last match.
LK_HOST_DEVICE inline int64_t segment_of(const int64_t* starts, int64_t n, int64_t pos) {
  int64_t lo = 0, hi = n - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (starts[mid] <= pos) lo = mid; else hi = mid - 1;
  }
  return lo;
}

}  // namespace loft_kernels
