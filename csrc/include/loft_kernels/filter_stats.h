// Per-filter (row) statistics: the accumulation step of filter_norms and filter_stats.
#pragma once

#include "common.h"

namespace loft_kernels {

// Slots of one row's filter_stats output, in the order the op returns them.
enum StatSlot { kAA = 0, kBB = 1, kAB = 2, kDD = 3, kNumStats = 4 };

// Add one element's contribution to ||a||^2, ||b||^2, <a, b> and ||a - b||^2.
template <typename acc_t>
LK_HOST_DEVICE inline void stats_step(acc_t a, acc_t b, acc_t& aa, acc_t& bb, acc_t& ab, acc_t& dd) {
  aa += a * a;
  bb += b * b;
  ab += a * b;
  const acc_t d = a - b;
  dd += d * d;
}

// Add one element's contribution to ||a||^2 (filter_norms takes the square root at the end).
template <typename acc_t>
LK_HOST_DEVICE inline void norm_step(acc_t a, acc_t& aa) {
  aa += a * a;
}

}  // namespace loft_kernels
