// The CPU kernels and the host-side helpers that the CUDA bindings reuse.
// Each function's arguments and results match loft_kernels/backends/reference.py.
#pragma once

#include <ATen/core/Tensor.h>

#include "loft_kernels/pack.h"

#include <optional>
#include <tuple>
#include <vector>

namespace loft_kernels {
namespace cpu {

using OptTensor = std::optional<at::Tensor>;
using Ints = std::vector<int64_t>;
using Tensors = std::vector<at::Tensor>;

at::Tensor partial_conv2d(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                          const OptTensor& out_index, const OptTensor& in_index, Ints stride, Ints padding,
                          Ints dilation, int64_t groups);
std::tuple<at::Tensor, at::Tensor, at::Tensor> partial_conv2d_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const OptTensor& out_index,
    const OptTensor& in_index, bool has_bias, Ints stride, Ints padding, Ints dilation, int64_t groups,
    bool need_input, bool need_weight);
at::Tensor grouped_partial_conv2d(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                                  const OptTensor& out_index, const OptTensor& in_index, Ints stride,
                                  Ints padding, Ints dilation);
std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_partial_conv2d_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const OptTensor& out_index,
    const OptTensor& in_index, bool has_bias, Ints stride, Ints padding, Ints dilation, bool need_input,
    bool need_weight);

Tensors filter_norms(const Tensors& tensors);
Tensors filter_stats(const Tensors& a, const Tensors& b);

at::Tensor footrule_matrix(const Tensors& scores);
at::Tensor mask_distance_matrix(const Tensors& scores, const Ints& keep);

at::Tensor pack_rows(const Tensors& tensors, const Tensors& indices, const Ints& dims);
void unpack_rows(const at::Tensor& flat, const Tensors& tensors, const Tensors& indices, const Ints& dims);

}  // namespace cpu

// Host-side plan of a pack/unpack: each tensor as a strided [outer, size_d, inner]
// view plus its segment of the flat buffer. Shared by the CPU kernel and the CUDA binding.
struct PackPlan {
  std::vector<int64_t> starts;  // segment start of each tensor in the flat buffer
  std::vector<at::Tensor> data;  // tensors the kernel reads/writes (a contiguous copy where needed)
  std::vector<at::Tensor> index;  // int64 contiguous row indices
  std::vector<PackView> views;  // each tensor as [outer, size_d, inner] with strides
  int64_t total = 0;             // elements in the flat buffer
};
// A tensor whose layout cannot be viewed as [outer, size_d, inner] gets a
// contiguous copy in `data` (an unpack copies it back after the kernel).
PackPlan make_pack_plan(const std::vector<at::Tensor>& tensors, const std::vector<at::Tensor>& indices,
                        const std::vector<int64_t>& dims);

}  // namespace loft_kernels
