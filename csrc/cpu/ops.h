// The CPU kernels, bound by module.cpp.
// Each function's arguments and results match loft_kernels/backends/reference.py.
#pragma once

#include <ATen/core/Tensor.h>


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
                                  Ints padding, Ints dilation, int64_t grouping);
std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_partial_conv2d_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const OptTensor& out_index,
    const OptTensor& in_index, bool has_bias, Ints stride, Ints padding, Ints dilation, bool need_input,
    bool need_weight, int64_t grouping);
// The same convolutions with their autograd node attached (partial_conv_node.cpp): the eager CPU path.
at::Tensor partial_conv2d_node(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                               const OptTensor& out_index, const OptTensor& in_index, Ints stride, Ints padding,
                               Ints dilation, int64_t groups);
at::Tensor grouped_partial_conv2d_node(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                                       const OptTensor& out_index, const OptTensor& in_index, Ints stride,
                                       Ints padding, Ints dilation, int64_t grouping);

Tensors filter_norms(const Tensors& tensors);
Tensors filter_stats(const Tensors& a, const Tensors& b);

at::Tensor footrule_matrix(const Tensors& scores);
at::Tensor mask_distance_matrix(const Tensors& scores, const Ints& keep);

at::Tensor pack_rows(const Tensors& tensors, const Tensors& indices, const Ints& dims);
void unpack_rows(const at::Tensor& flat, const Tensors& tensors, const Tensors& indices, const Ints& dims);

}  // namespace cpu

}  // namespace loft_kernels
