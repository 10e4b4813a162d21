// Partial convolutions on any device: gather the selected weight of all groups once,
// let ATen convolve (oneDNN on CPU, cuDNN on CUDA), scatter the gradients once.
//
// Shapes: G groups, x [G, N, C, H, W], out_index [G, n_rows], in_index [G, n_cols].
// The stacked form views the G batches as one batch with G * C channels
// ([N, G * C, H, W]) and the gathered weight [G * n_rows, n_cols, kh, kw] as the
// weight of one convolution with G channel groups: group g of that convolution is
// exactly partial convolution g. The single op is the case G = 1.
#include "host/partial_conv.h"

#include <ATen/ops/arange.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros_like.h>

namespace loft_kernels {
namespace host {
namespace {

// Index sets checked where the kernels would read them as raw memory: here the
// structure, on the host also the range (device indices were range-checked by
// the Python ops layer; reading them back here would cost a device sync).
void check_index(const OptTensor& index, const char* name, int64_t groups, int64_t size, const at::Tensor& w) {
  if (!index) return;
  TORCH_CHECK(index->scalar_type() == at::kLong && index->dim() == 2 && index->size(0) == groups &&
                  index->size(1) > 0 && index->is_contiguous(),
              name, " must be a contiguous int64 tensor of shape [", groups, ", n > 0]");
  TORCH_CHECK(index->device() == w.device(), name, " must be on the weight's device ", w.device());
  if (!index->is_cpu()) return;
  const int64_t* p = index->const_data_ptr<int64_t>();
  for (int64_t i = 0; i < index->numel(); ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < size, name, " has entry ", p[i], ", out of range for size ", size);
  }
}

// The G groups' selection of one weight, with the index tensors it points into.
struct Selection {
  OptTensor rows, cols;  // [G, n] int64
  ConvSlice slice;

  Selection(const at::Tensor& weight, const OptTensor& out_index, const OptTensor& in_index, int64_t groups)
      : rows(out_index), cols(in_index) {
    check_index(rows, "out_index", groups, weight.size(0), weight);
    check_index(cols, "in_index", groups, weight.size(1), weight);
    slice = ConvSlice{groups, weight.size(0), weight.size(1), weight.size(2) * weight.size(3),
                      rows ? rows->size(1) : weight.size(0), cols ? cols->size(1) : weight.size(1),
                      rows ? rows->const_data_ptr<int64_t>() : nullptr,
                      cols ? cols->const_data_ptr<int64_t>() : nullptr};
  }
};

// [G, n_full]: each full row's position in group g's index set, -1 where absent.
at::Tensor positions(const at::Tensor& index, int64_t n_full) {
  const int64_t groups = index.size(0), n = index.size(1);
  const auto opts = index.options();
  return at::full({groups, n_full}, -1, opts).scatter_(1, index, at::arange(n, opts).expand({groups, n}));
}

struct Gathered {
  at::Tensor weight;
  OptTensor bias;
};

Gathered gather(const SliceKernels& k, const Selection& sel, const at::Tensor& weight, const OptTensor& bias) {
  const ConvSlice& s = sel.slice;
  const at::Tensor w = weight.contiguous();
  Gathered out{at::empty({s.groups * s.n_rows, s.n_cols, w.size(2), w.size(3)}, w.options()), std::nullopt};
  at::Tensor b_sel;
  if (bias) b_sel = at::empty({s.groups * s.n_rows}, bias->options());
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  k.gather(s, w, bias ? &b : nullptr, out.weight, bias ? &b_sel : nullptr);
  if (bias) out.bias = b_sel;
  return out;
}

void scatter(const SliceKernels& k, const Selection& sel, const at::Tensor& weight, const at::Tensor& gw_sel,
             const at::Tensor* gb_sel, at::Tensor* gw, at::Tensor* gb) {
  const at::Tensor row_pos = sel.rows ? positions(*sel.rows, sel.slice.n_out) : at::Tensor();
  const at::Tensor col_pos = sel.cols ? positions(*sel.cols, sel.slice.c_in) : at::Tensor();
  *gw = at::empty(weight.sizes(), weight.options().memory_format(at::MemoryFormat::Contiguous));
  if (gb) *gb = at::empty({weight.size(0)}, weight.options());
  k.scatter(sel.slice, sel.rows ? row_pos.const_data_ptr<int64_t>() : nullptr,
            sel.cols ? col_pos.const_data_ptr<int64_t>() : nullptr, gw_sel.contiguous(), gb_sel, *gw, gb);
}

// [G, N, C, H, W] <-> [N, G * C, H, W]: the G batches side by side along the channels.
at::Tensor stack_channels(const at::Tensor& t) {
  return t.transpose(0, 1).reshape({t.size(1), t.size(0) * t.size(2), t.size(3), t.size(4)});
}
at::Tensor unstack_channels(const at::Tensor& t, int64_t groups) {
  return t.view({t.size(0), groups, t.size(1) / groups, t.size(2), t.size(3)}).transpose(0, 1).contiguous();
}

at::OptionalIntArrayRef bias_sizes(bool has_bias, const std::vector<int64_t>& size) {
  return has_bias ? at::OptionalIntArrayRef(size) : at::OptionalIntArrayRef();
}

}  // namespace

at::Tensor grouped_partial_conv2d(const SliceKernels& k, Grouping how, const at::Tensor& x,
                                  const at::Tensor& weight, const OptTensor& bias, const OptTensor& out_index,
                                  const OptTensor& in_index, const Ints& stride, const Ints& padding,
                                  const Ints& dilation) {
  const int64_t G = x.size(0);
  if (!out_index && !in_index) {  // one weight for all groups: a single convolution over the folded batch
    const at::Tensor y = at::convolution(x.flatten(0, 1), weight, bias, stride, padding, dilation, false, {0, 0}, 1);
    return y.unflatten(0, {G, x.size(1)});
  }
  const Selection sel(weight, out_index, in_index, G);
  const Gathered w = gather(k, sel, weight, bias);
  if (G == 1) {
    return at::convolution(x.select(0, 0), w.weight, w.bias, stride, padding, dilation, false, {0, 0}, 1)
        .unsqueeze(0);
  }
  if (how == Grouping::kStacked) {
    const at::Tensor y =
        at::convolution(stack_channels(x), w.weight, w.bias, stride, padding, dilation, false, {0, 0}, G);
    return unstack_channels(y, G);
  }
  const int64_t n = sel.slice.n_rows;
  std::vector<at::Tensor> ys;
  for (int64_t g = 0; g < G; ++g) {
    const OptTensor b = w.bias ? OptTensor(w.bias->narrow(0, g * n, n)) : std::nullopt;
    ys.push_back(at::convolution(x.select(0, g), w.weight.narrow(0, g * n, n), b, stride, padding, dilation, false,
                                 {0, 0}, 1));
  }
  return at::stack(ys);
}

Grads grouped_partial_conv2d_backward(const SliceKernels& k, Grouping how, const at::Tensor& grad,
                                      const at::Tensor& x, const at::Tensor& weight, const OptTensor& out_index,
                                      const OptTensor& in_index, bool has_bias, const Ints& stride,
                                      const Ints& padding, const Ints& dilation, bool need_input, bool need_weight) {
  const int64_t G = x.size(0);
  if (!out_index && !in_index) {  // as in the forward: one convolution over the folded batch
    auto [gx, gw, gb] = at::convolution_backward(grad.flatten(0, 1), x.flatten(0, 1), weight,
                                                 bias_sizes(has_bias, {weight.size(0)}), stride, padding, dilation,
                                                 false, {0, 0}, 1, {need_input, need_weight, has_bias});
    if (need_input) gx = gx.unflatten(0, {G, x.size(1)});
    return {gx, gw, gb};
  }
  const Selection sel(weight, out_index, in_index, G);
  const at::Tensor w_sel = gather(k, sel, weight, std::nullopt).weight;
  const std::vector<int64_t> sel_bias{w_sel.size(0)};
  at::Tensor gx, gw_sel, gb_sel;
  if (G == 1 || how == Grouping::kStacked) {
    const bool one = G == 1;
    std::tie(gx, gw_sel, gb_sel) = at::convolution_backward(
        one ? grad.select(0, 0) : stack_channels(grad), one ? x.select(0, 0) : stack_channels(x), w_sel,
        bias_sizes(has_bias, sel_bias), stride, padding, dilation, false, {0, 0}, G,
        {need_input, need_weight, has_bias});
    if (need_input) gx = one ? gx.unsqueeze(0) : unstack_channels(gx, G);
  } else {
    const int64_t n = sel.slice.n_rows;
    if (need_input) gx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
    if (need_weight) gw_sel = at::empty(w_sel.sizes(), w_sel.options());
    if (has_bias) gb_sel = at::empty(sel_bias, w_sel.options());
    const std::vector<int64_t> one_bias{n};
    for (int64_t g = 0; g < G; ++g) {
      auto [gx_g, gw_g, gb_g] = at::convolution_backward(
          grad.select(0, g), x.select(0, g), w_sel.narrow(0, g * n, n), bias_sizes(has_bias, one_bias), stride,
          padding, dilation, false, {0, 0}, 1, {need_input, need_weight, has_bias});
      if (need_input) gx.select(0, g).copy_(gx_g);
      if (need_weight) gw_sel.narrow(0, g * n, n).copy_(gw_g);
      if (has_bias) gb_sel.narrow(0, g * n, n).copy_(gb_g);
    }
  }
  at::Tensor gw, gb;
  if (need_weight || has_bias) {
    // The scatter writes weight and bias gradients together; without need_weight it
    // still fills gw (cheap beside the convolution), which is then dropped.
    if (!need_weight) gw_sel = at::zeros_like(w_sel);
    scatter(k, sel, weight, gw_sel, has_bias ? &gb_sel : nullptr, &gw, has_bias ? &gb : nullptr);
    if (!need_weight) gw = at::Tensor();
  }
  return {gx, gw, gb};
}

at::Tensor partial_conv2d(const SliceKernels& k, const at::Tensor& x, const at::Tensor& weight,
                          const OptTensor& bias, const OptTensor& out_index, const OptTensor& in_index,
                          const Ints& stride, const Ints& padding, const Ints& dilation, int64_t groups) {
  if (!out_index && !in_index) {
    return at::convolution(x, weight, bias, stride, padding, dilation, false, {0, 0}, groups);
  }
  TORCH_CHECK(groups == 1, "partial_conv2d: groups > 1 together with out_index/in_index is not supported");
  const OptTensor rows = out_index ? OptTensor(out_index->unsqueeze(0)) : std::nullopt;
  const OptTensor cols = in_index ? OptTensor(in_index->unsqueeze(0)) : std::nullopt;
  return grouped_partial_conv2d(k, Grouping::kStacked, x.unsqueeze(0), weight, bias, rows, cols, stride, padding,
                                dilation)
      .squeeze(0);
}

Grads partial_conv2d_backward(const SliceKernels& k, const at::Tensor& grad, const at::Tensor& x,
                              const at::Tensor& weight, const OptTensor& out_index, const OptTensor& in_index,
                              bool has_bias, const Ints& stride, const Ints& padding, const Ints& dilation,
                              int64_t groups, bool need_input, bool need_weight) {
  if (!out_index && !in_index) {
    return at::convolution_backward(grad, x, weight, bias_sizes(has_bias, {weight.size(0)}), stride, padding,
                                    dilation, false, {0, 0}, groups, {need_input, need_weight, has_bias});
  }
  TORCH_CHECK(groups == 1, "partial_conv2d: groups > 1 together with out_index/in_index is not supported");
  const OptTensor rows = out_index ? OptTensor(out_index->unsqueeze(0)) : std::nullopt;
  const OptTensor cols = in_index ? OptTensor(in_index->unsqueeze(0)) : std::nullopt;
  auto [gx, gw, gb] = grouped_partial_conv2d_backward(k, Grouping::kStacked, grad.unsqueeze(0), x.unsqueeze(0),
                                                      weight, rows, cols, has_bias, stride, padding, dilation,
                                                      need_input, need_weight);
  if (need_input) gx = gx.squeeze(0);
  return {gx, gw, gb};
}

}  // namespace host
}  // namespace loft_kernels
