// The partial convolutions' autograd node for plain CPU tensors in eager mode.
//
// loft_kernels/ops/partial_conv.py sends such calls past the custom op's Python
// dispatch; a node written in Python (torch.autograd.Function) would still cost
// tens of microseconds per forward + backward, more on large activations, where
// ATen's own convolution node costs next to nothing. This node runs the same
// CPU kernels as the custom op (partial_conv.cpp). When autograd records the
// backward itself (create_graph=True), the backward goes through the registered
// custom backward op instead, so a second derivative fails there exactly as it
// does on the custom op's path, rather than coming out silently zero.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>

#include "ops.h"

namespace loft_kernels {
namespace cpu {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kSingle = -1;  // `grouping` of the single op; >= 0: the grouped op's formulation

OptTensor optional(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }
c10::IValue boxed(const at::Tensor& t) { return t.defined() ? c10::IValue(t) : c10::IValue(); }

// The custom backward op (registered from Python by loft_kernels.ops), called boxed.
std::tuple<at::Tensor, at::Tensor, at::Tensor> recorded_backward(bool grouped, std::vector<c10::IValue> stack) {
  static const auto single =
      c10::Dispatcher::singleton().findSchemaOrThrow("loft_kernels::partial_conv2d_backward", "");
  static const auto grouped_op =
      c10::Dispatcher::singleton().findSchemaOrThrow("loft_kernels::grouped_partial_conv2d_backward", "");
  (grouped ? grouped_op : single).callBoxed(&stack);
  return {stack[0].toTensor(), stack[1].toTensor(), stack[2].toTensor()};
}

}  // namespace

// Named outside the anonymous namespace: autograd's messages and grad_fn.name() show this name.
struct PartialConvNode : public torch::autograd::Function<PartialConvNode> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const OptTensor& bias, const OptTensor& out_index, const OptTensor& in_index,
                            const Ints& stride, const Ints& padding, const Ints& dilation, int64_t groups,
                            int64_t grouping) {
    ctx->save_for_backward({x, weight, out_index.value_or(at::Tensor()), in_index.value_or(at::Tensor())});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["grouping"] = grouping;
    if (grouping == kSingle) {
      return partial_conv2d(x, weight, bias, out_index, in_index, stride, padding, dilation, groups);
    }
    return grouped_partial_conv2d(x, weight, bias, out_index, in_index, stride, padding, dilation, grouping);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &rows = saved[2], &cols = saved[3];
    const Ints stride = ctx->saved_data["stride"].toIntVector(), padding = ctx->saved_data["padding"].toIntVector(),
               dilation = ctx->saved_data["dilation"].toIntVector();
    const int64_t groups = ctx->saved_data["groups"].toInt(), grouping = ctx->saved_data["grouping"].toInt();
    // needs_input_grad counts tensor inputs only: x, weight, then the bias where there is one
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    const bool has_bias = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2);
    const at::Tensor grad = grads[0].contiguous();
    std::tuple<at::Tensor, at::Tensor, at::Tensor> g;
    if (at::GradMode::is_enabled()) {
      std::vector<c10::IValue> stack{grad, x, weight, boxed(rows), boxed(cols), has_bias, stride, padding, dilation};
      if (grouping == kSingle) stack.emplace_back(groups);
      stack.emplace_back(need_x);
      stack.emplace_back(need_w);
      g = recorded_backward(grouping != kSingle, std::move(stack));
    } else if (grouping == kSingle) {
      g = partial_conv2d_backward(grad, x, weight, optional(rows), optional(cols), has_bias, stride, padding,
                                  dilation, groups, need_x, need_w);
    } else {
      g = grouped_partial_conv2d_backward(grad, x, weight, optional(rows), optional(cols), has_bias, stride,
                                          padding, dilation, need_x, need_w, grouping);
    }
    auto& [gx, gw, gb] = g;
    // one entry per forward argument; the non-tensor ones get none
    return {need_x ? gx : at::Tensor(), need_w ? gw : at::Tensor(), has_bias ? gb : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor partial_conv2d_node(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                               const OptTensor& out_index, const OptTensor& in_index, Ints stride, Ints padding,
                               Ints dilation, int64_t groups) {
  return PartialConvNode::apply(x, weight, bias, out_index, in_index, stride, padding, dilation, groups, kSingle);
}

at::Tensor grouped_partial_conv2d_node(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                                       const OptTensor& out_index, const OptTensor& in_index, Ints stride,
                                       Ints padding, Ints dilation, int64_t grouping) {
  TORCH_CHECK(grouping >= 0, "grouping must be 0 (stacked) or 1 (loop), got ", grouping);
  return PartialConvNode::apply(x, weight, bias, out_index, in_index, stride, padding, dilation, int64_t{1},
                                grouping);
}

}  // namespace cpu
}  // namespace loft_kernels
