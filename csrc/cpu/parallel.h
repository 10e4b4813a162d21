// OpenMP helpers of the CPU kernels.
#pragma once

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>

namespace loft_kernels {
namespace cpu {

// Split [0, n) into one contiguous chunk per thread and call f(begin, end) on each.
// Uses torch's thread count (torch.set_num_threads) and at most one thread per
// `grain` items: a parallel region costs microseconds (far more on a loaded
// machine), so small inputs run serially, as they do inside a parallel region.
// f must not throw.
template <typename F>
inline void parallel_chunks(int64_t n, int64_t grain, const F& f) {
  if (n <= 0) return;
  const int64_t want = std::min<int64_t>(at::get_num_threads(), (n + grain - 1) / std::max<int64_t>(grain, 1));
  if (want <= 1 || omp_in_parallel()) {
    f(int64_t{0}, n);
    return;
  }
#pragma omp parallel num_threads(static_cast<int>(want))
  {
    const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t chunk = (n + nt - 1) / nt;
    const int64_t begin = tid * chunk, end = std::min(n, begin + chunk);
    if (begin < end) f(begin, end);
  }
}

// Call f(i) for every i in [0, n), dynamically scheduled: for tasks of uneven size.
// `work` estimates the total elements touched; below `grain` it runs serially.
template <typename F>
inline void parallel_tasks(int64_t n, int64_t work, int64_t grain, const F& f) {
  if (n <= 0) return;
  const int want = static_cast<int>(std::min<int64_t>(at::get_num_threads(), n));
  if (want <= 1 || work < grain || omp_in_parallel()) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(want)
  for (int64_t i = 0; i < n; ++i) f(i);
}

}  // namespace cpu
}  // namespace loft_kernels
