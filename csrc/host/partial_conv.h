// Host side of the partial convolutions, shared by the CPU and the CUDA build (csrc/host:
// ATen-side code of both builds; shared host/device arithmetic lives in csrc/include).
//
// Needs ATen (not CUDA); never included by .cu files. The convolution itself is
// ATen's (oneDNN on CPU, cuDNN on CUDA); what a build supplies is the device half,
// `SliceKernels`: one pass that gathers the selected weight (and bias) of all
// groups, and one pass that scatters their gradients into full-size tensors.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

#include "loft_kernels/partial_conv.h"

namespace loft_kernels {
namespace host {

using OptTensor = std::optional<at::Tensor>;
using Ints = std::vector<int64_t>;
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

struct SliceKernels {
  // s.groups * s.n_rows * s.n_cols blocks of the contiguous weight -> w_sel [G * n_rows, n_cols, kh, kw]
  // (preallocated); when bias is given, its selected rows -> b_sel [G * n_rows].
  void (*gather)(const ConvSlice& s, const at::Tensor& weight, const at::Tensor* bias, at::Tensor& w_sel,
                 at::Tensor* b_sel);
  // Gathered gradients gw_sel [G * n_rows, n_cols, kh, kw] (and gb_sel [G * n_rows]) -> full-size gw
  // [n_out, c_in, kh, kw] (and gb [n_out]), preallocated, every element written once: the sum over the
  // groups that selected it, zero where none did. row_pos / col_pos: see scatter_block_source.
  void (*scatter)(const ConvSlice& s, const int64_t* row_pos, const int64_t* col_pos, const at::Tensor& gw_sel,
                  const at::Tensor* gb_sel, at::Tensor& gw, at::Tensor* gb);
};

// How the grouped op runs its G convolutions: one grouped convolution over the G
// batches stacked along the channels, or a loop of G convolutions (both share the
// single gather and scatter).
enum class Grouping { kStacked, kLoop };

at::Tensor partial_conv2d(const SliceKernels& k, const at::Tensor& x, const at::Tensor& weight,
                          const OptTensor& bias, const OptTensor& out_index, const OptTensor& in_index,
                          const Ints& stride, const Ints& padding, const Ints& dilation, int64_t groups);
Grads partial_conv2d_backward(const SliceKernels& k, const at::Tensor& grad, const at::Tensor& x,
                              const at::Tensor& weight, const OptTensor& out_index, const OptTensor& in_index,
                              bool has_bias, const Ints& stride, const Ints& padding, const Ints& dilation,
                              int64_t groups, bool need_input, bool need_weight);
at::Tensor grouped_partial_conv2d(const SliceKernels& k, Grouping how, const at::Tensor& x,
                                  const at::Tensor& weight, const OptTensor& bias, const OptTensor& out_index,
                                  const OptTensor& in_index, const Ints& stride, const Ints& padding,
                                  const Ints& dilation);
Grads grouped_partial_conv2d_backward(const SliceKernels& k, Grouping how, const at::Tensor& grad,
                                      const at::Tensor& x, const at::Tensor& weight, const OptTensor& out_index,
                                      const OptTensor& in_index, bool has_bias, const Ints& stride,
                                      const Ints& padding, const Ints& dilation, bool need_input, bool need_weight);

}  // namespace host
}  // namespace loft_kernels
