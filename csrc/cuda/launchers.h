// Launchers of the CUDA kernels: plain C++ entry points taking raw device pointers.
//
// This header needs neither torch nor the CUDA headers, so the .cu files compile
// with plain nvcc and bindings.cpp (the torch side) can call them. Every pointer
// argument is a device pointer; `stream` is a cudaStream_t.
#pragma once

#include <cstdint>

#include "loft_kernels/packing.h"
#include "loft_kernels/partial_conv.h"

namespace loft_kernels {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Per-row statistics over a list of n tensors viewed as [rows_i, len_i]. Rows of
// all tensors are numbered globally; tensor i owns rows [row_start[i], row_start[i + 1]).
// b == nullptr: filter_norms (out[i] has rows_i floats), else filter_stats
// (out[i] has rows_i x 4 floats: ||a||^2, ||b||^2, <a, b>, ||a - b||^2).
void launch_filter_stats(DType dtype, int64_t n, int64_t total_rows, const int64_t* row_start,
                         const int64_t* row_len, const void* const* a, const void* const* b, float* const* out,
                         void* stream);

// rank: for each layer l, a [T, n[l]] int32 block at offset[l] of 1-based ranks.
// out: [L, T, T] float32.
void launch_footrule(int64_t L, int64_t T, const int64_t* n, const int64_t* offset, const int32_t* rank, float* out,
                     void* stream);
void launch_mask_distance(int64_t L, int64_t T, const int64_t* n, const int64_t* offset, const int32_t* rank,
                          const int64_t* keep, float* out, void* stream);

// Partial convolutions (layouts in loft_kernels/partial_conv.h; s.rows / s.cols are device pointers).
// Gather: weight [n_out, c_in, k] -> w_sel [G * n_rows, n_cols, k] and, if bias, bias -> b_sel [G * n_rows].
void launch_gather_weight(DType dtype, const ConvSlice& s, const void* weight, const void* bias, void* w_sel,
                          void* b_sel, void* stream);
// Scatter: gw_sel (and gb_sel) -> full-size gw [n_out, c_in, k] (and gb [n_out]), summed over groups.
void launch_scatter_grad(DType dtype, const ConvSlice& s, const int64_t* row_pos, const int64_t* col_pos,
                         const void* gw_sel, const void* gb_sel, void* gw, void* gb, void* stream);

// Copy the selected rows of n tensors to (pack) or from (unpack) one flat buffer
// of `total` elements of `element_size` bytes (1, 2, 4, 8 or 16); returns false
// for any other element size. idx[i] and data[i] are device pointers held in device arrays.
bool launch_pack(bool pack, int64_t n, int64_t total, const int64_t* starts, const PackView* views,
                 const int64_t* const* idx, void* const* data, void* flat, int64_t element_size, void* stream);

}  // namespace cuda
}  // namespace loft_kernels
