// Terms of the snapshot-distance matrices (footrule_matrix, mask_distance_matrix).
//
// Ranks are 1-based: rank 1 is the highest score, ties go to the lower filter index.
#pragma once

#include <cmath>

#include "common.h"

namespace loft_kernels {

// (1/i) * |ln i - ln sigma| with i's reciprocal and both logarithms precomputed
// (a kernel that reuses ranks across many pairs tabulates them once).
LK_HOST_DEVICE inline double footrule_term_from_logs(double inv_i, double log_i, double log_sigma) {
  return inv_i * fabs(log_i - log_sigma);
}

// The footrule term for the filter ranked i at snapshot a and sigma at snapshot b.
LK_HOST_DEVICE inline double footrule_term(int64_t i, int64_t sigma) {
  return footrule_term_from_logs(1.0 / static_cast<double>(i), log(static_cast<double>(i)),
                                 log(static_cast<double>(sigma)));
}

// 1 if a filter with these ranks is kept (rank <= keep) at exactly one of the two snapshots.
LK_HOST_DEVICE inline int mask_disagree(int64_t rank_a, int64_t rank_b, int64_t keep) {
  return (rank_a <= keep) != (rank_b <= keep) ? 1 : 0;
}

}  // namespace loft_kernels
