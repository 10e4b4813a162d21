// Offset mapping of pack_rows / unpack_rows.
//
// Tensor i is viewed as [outer_i, size_d_i, inner_i] with element strides
// (so, sd, si); its k_i selected rows idx_i[0..k_i) along the middle dimension
// occupy flat[start_i, start_i + outer_i * k_i * inner_i) in [outer, k, inner]
// order, exactly like t.index_select(d, idx).reshape(-1).
#pragma once

#include "common.h"

namespace loft_kernels {

struct PackView {
  int64_t outer, k, inner;  // packed extent of this tensor: outer x k x inner
  int64_t so, sd, si;       // element strides of the outer, row and inner dimensions
};

// Position q inside one tensor's packed segment -> (outer, selected-row, inner) coordinates.
LK_HOST_DEVICE inline void pack_coords(int64_t q, int64_t k, int64_t inner, int64_t& o, int64_t& r, int64_t& j) {
  j = q % inner;
  const int64_t t = q / inner;
  r = t % k;
  o = t / k;
}

// Element offset in the tensor of packed coordinates (o, r, j), row r meaning source row idx[r].
LK_HOST_DEVICE inline int64_t pack_source_offset(const PackView& v, const int64_t* idx, int64_t o, int64_t r,
                                                 int64_t j) {
  return o * v.so + idx[r] * v.sd + j * v.si;
}

// Flat buffer position p -> (tensor s, element offset in tensor s), given the
// ascending segment starts of the n tensors.
LK_HOST_DEVICE inline int64_t pack_locate(const int64_t* starts, int64_t n, const PackView* views,
                                          const int64_t* const* idx, int64_t p, int64_t& offset) {
  const int64_t s = segment_of(starts, n, p);
  int64_t o, r, j;
  pack_coords(p - starts[s], views[s].k, views[s].inner, o, r, j);
  offset = pack_source_offset(views[s], idx[s], o, r, j);
  return s;
}

}  // namespace loft_kernels
