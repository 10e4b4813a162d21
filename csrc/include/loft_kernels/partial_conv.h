// Index arithmetic of the partial convolutions: the weight gather and the gradient scatter.
//
// G groups each select rows rows[g, 0..n_rows) (output filters) and columns
// cols[g, 0..n_cols) (input channels) of one weight [n_out, c_in, k] (k = kh * kw,
// contiguous). The gathered weight is [G, n_rows, n_cols, k]: the groups stacked
// along the output channels, which is exactly the weight of one grouped
// convolution over the G input batches stacked along the channels. A null rows
// or cols pointer selects every row or column. Rows are distinct within a group
// and may repeat across groups, so the gradient scatter sums over the groups.
#pragma once

#include "common.h"

namespace loft_kernels {

struct ConvSlice {
  int64_t groups, n_out, c_in, k;  // G and the full weight's [n_out, c_in, k]
  int64_t n_rows, n_cols;          // rows and columns each group selects
  const int64_t* rows;             // [G, n_rows] or nullptr (all rows)
  const int64_t* cols;             // [G, n_cols] or nullptr (all columns)

  LK_HOST_DEVICE int64_t row(int64_t g, int64_t r) const { return rows ? rows[g * n_rows + r] : r; }
  LK_HOST_DEVICE int64_t col(int64_t g, int64_t c) const { return cols ? cols[g * n_cols + c] : c; }
  LK_HOST_DEVICE int64_t gathered_blocks() const { return groups * n_rows * n_cols; }  // k elements each
  LK_HOST_DEVICE int64_t full_blocks() const { return n_out * c_in; }
};

// Offset in the full weight of gathered k-block b = (g, r, c) of [G, n_rows, n_cols].
LK_HOST_DEVICE inline int64_t gather_block_offset(const ConvSlice& s, int64_t b) {
  const int64_t c = b % s.n_cols, gr = b / s.n_cols, r = gr % s.n_rows, g = gr / s.n_rows;
  return (s.row(g, r) * s.c_in + s.col(g, c)) * s.k;
}

// Full-weight row gathered as bias entry e = (g, r) of [G, n_rows].
LK_HOST_DEVICE inline int64_t gather_bias_row(const ConvSlice& s, int64_t e) {
  return s.row(e / s.n_rows, e % s.n_rows);
}

// Where group g's gradient of full k-block f = (o, i) of [n_out, c_in] lies in the
// gathered gradient [G, n_rows, n_cols, k]: its element offset, or -1 when group g
// did not select row o and column i. row_pos [G, n_out] / col_pos [G, c_in] hold each
// full row's / column's position in group g's selection (-1: not selected; null: all).
LK_HOST_DEVICE inline int64_t scatter_block_source(const ConvSlice& s, const int64_t* row_pos,
                                                   const int64_t* col_pos, int64_t g, int64_t f) {
  const int64_t o = f / s.c_in, i = f % s.c_in;
  const int64_t r = row_pos ? row_pos[g * s.n_out + o] : o;
  const int64_t c = col_pos ? col_pos[g * s.c_in + i] : i;
  return (r < 0 || c < 0) ? -1 : ((g * s.n_rows + r) * s.n_cols + c) * s.k;
}

// Where group g's bias gradient of full row o lies in the gathered [G, n_rows], or -1.
LK_HOST_DEVICE inline int64_t scatter_bias_source(const ConvSlice& s, const int64_t* row_pos, int64_t g, int64_t o) {
  const int64_t r = row_pos ? row_pos[g * s.n_out + o] : o;
  return r < 0 ? -1 : g * s.n_rows + r;
}

}  // namespace loft_kernels
