// Partial convolutions on the CPU: the weight gather and the gradient scatter as
// OpenMP passes over k-blocks (k = kh * kw contiguous elements); the arithmetic is
// ATen's (oneDNN), orchestrated by csrc/host/partial_conv.cpp.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>

#include "host/partial_conv.h"
#include "ops.h"
#include "parallel.h"

namespace loft_kernels {
namespace cpu {
namespace {

constexpr int64_t kGrainElems = 1 << 16;  // elements per thread before going parallel

// Grain in k-element blocks.
inline int64_t grain_blocks(int64_t k) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(k, 1)); }

// With every column selected, a selected row is one contiguous run of c_in * k elements:
// move whole rows (one copy per row instead of one per kh x kw block, which dominates
// small kernels on wide layers).
ConvSlice in_rows(const ConvSlice& s) {
  if (s.cols) return s;
  ConvSlice r = s;
  r.k = s.c_in * s.k;
  r.c_in = r.n_cols = 1;
  return r;
}

void gather(const ConvSlice& full, const at::Tensor& weight, const at::Tensor* bias, at::Tensor& w_sel,
            at::Tensor* b_sel) {
  const ConvSlice s = in_rows(full);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "gather_weight", [&] {
    const scalar_t* src = weight.const_data_ptr<scalar_t>();
    scalar_t* dst = w_sel.data_ptr<scalar_t>();
    parallel_chunks(s.gathered_blocks(), grain_blocks(s.k), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) std::copy_n(src + gather_block_offset(s, b), s.k, dst + b * s.k);
    });
    if (bias) {
      const scalar_t* bsrc = bias->const_data_ptr<scalar_t>();
      scalar_t* bdst = b_sel->data_ptr<scalar_t>();
      for (int64_t e = 0; e < s.groups * s.n_rows; ++e) bdst[e] = bsrc[gather_bias_row(s, e)];
    }
  });
}

void scatter(const ConvSlice& full, const int64_t* row_pos, const int64_t* col_pos, const at::Tensor& gw_sel,
             const at::Tensor* gb_sel, at::Tensor& gw, at::Tensor* gb) {
  const ConvSlice s = in_rows(full);  // col_pos is null exactly when s.cols is
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gw.scalar_type(), "scatter_weight_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = gw_sel.const_data_ptr<scalar_t>();
    scalar_t* dst = gw.data_ptr<scalar_t>();
    parallel_chunks(s.full_blocks(), grain_blocks(s.k), [&](int64_t begin, int64_t end) {
      for (int64_t f = begin; f < end; ++f) {
        scalar_t* d = dst + f * s.k;
        int64_t first = -1, g = 0;
        for (; g < s.groups && first < 0; ++g) first = scatter_block_source(s, row_pos, col_pos, g, f);
        if (first < 0) {
          std::fill_n(d, s.k, scalar_t(0));
          continue;
        }
        std::copy_n(src + first, s.k, d);  // the common case: one group selected this block
        for (; g < s.groups; ++g) {  // overlapping groups add up, in group order
          const int64_t from = scatter_block_source(s, row_pos, col_pos, g, f);
          if (from < 0) continue;
          for (int64_t j = 0; j < s.k; ++j) d[j] = static_cast<acc_t>(d[j]) + static_cast<acc_t>(src[from + j]);
        }
      }
    });
    if (gb) {
      const scalar_t* bsrc = gb_sel->const_data_ptr<scalar_t>();
      scalar_t* bdst = gb->data_ptr<scalar_t>();
      for (int64_t o = 0; o < s.n_out; ++o) {
        acc_t sum = 0;
        for (int64_t g = 0; g < s.groups; ++g) {
          const int64_t from = scatter_bias_source(s, row_pos, g, o);
          if (from >= 0) sum += static_cast<acc_t>(bsrc[from]);
        }
        bdst[o] = static_cast<scalar_t>(sum);
      }
    }
  });
}

const host::SliceKernels kKernels{&gather, &scatter};

// grouping: 0 = one stacked grouped convolution, 1 = a loop of G convolutions
// (the cpu backend picks per shape, see loft_kernels/backends/cpu.py).
host::Grouping choose(int64_t grouping) {
  TORCH_CHECK(grouping == 0 || grouping == 1, "grouping must be 0 (stacked) or 1 (loop), got ", grouping);
  return grouping == 0 ? host::Grouping::kStacked : host::Grouping::kLoop;
}

}  // namespace

at::Tensor partial_conv2d(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                          const OptTensor& out_index, const OptTensor& in_index, Ints stride, Ints padding,
                          Ints dilation, int64_t groups) {
  return host::partial_conv2d(kKernels, x, weight, bias, out_index, in_index, stride, padding, dilation, groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> partial_conv2d_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const OptTensor& out_index,
    const OptTensor& in_index, bool has_bias, Ints stride, Ints padding, Ints dilation, int64_t groups,
    bool need_input, bool need_weight) {
  return host::partial_conv2d_backward(kKernels, grad, x, weight, out_index, in_index, has_bias, stride, padding,
                                       dilation, groups, need_input, need_weight);
}

at::Tensor grouped_partial_conv2d(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                                  const OptTensor& out_index, const OptTensor& in_index, Ints stride,
                                  Ints padding, Ints dilation, int64_t grouping) {
  return host::grouped_partial_conv2d(kKernels, choose(grouping), x, weight, bias, out_index, in_index, stride,
                                      padding, dilation);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_partial_conv2d_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const OptTensor& out_index,
    const OptTensor& in_index, bool has_bias, Ints stride, Ints padding, Ints dilation, bool need_input,
    bool need_weight, int64_t grouping) {
  return host::grouped_partial_conv2d_backward(kKernels, choose(grouping), grad, x, weight, out_index, in_index,
                                               has_bias, stride, padding, dilation, need_input, need_weight);
}

}  // namespace cpu
}  // namespace loft_kernels
