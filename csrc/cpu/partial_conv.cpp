// Partial convolution over a subset of filters (and input channels), single and grouped.
//
// The arithmetic goes through ATen (oneDNN on CPU); what this file adds is the
// one-pass gather of the weight slice weight[out_index][:, in_index] and the
// one-pass scatter of its gradient into the full-size weight gradient.
#include <ATen/Dispatch.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/flatten.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/unflatten.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "ops.h"
#include "parallel.h"

namespace loft_kernels {
namespace cpu {
namespace {

constexpr int64_t kGrainElems = 1 << 16;  // elements per thread before going parallel

// Grain in kernel-sized blocks of k elements.
inline int64_t grain_blocks(int64_t k) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(k, 1)); }

struct Selection {
  const int64_t* rows;  // nullptr: all rows
  const int64_t* cols;  // nullptr: all columns
  int64_t n_rows, n_cols;
  int64_t row(int64_t r) const { return rows ? rows[r] : r; }
  int64_t col(int64_t c) const { return cols ? cols[c] : c; }
};

Selection selection(const at::Tensor& weight, const OptTensor& out_index, const OptTensor& in_index) {
  return {out_index ? out_index->data_ptr<int64_t>() : nullptr, in_index ? in_index->data_ptr<int64_t>() : nullptr,
          out_index ? out_index->numel() : weight.size(0), in_index ? in_index->numel() : weight.size(1)};
}

// The ops layer validates indices, but not inside torch.compile graphs: the
// kernels index raw memory with them, so the range is checked here too (k values).
void check_index(const OptTensor& index, const char* name, int64_t size) {
  if (!index) return;
  TORCH_CHECK(index->scalar_type() == at::kLong && index->dim() == 1 && index->is_contiguous(), name,
              " must be a contiguous 1-D int64 tensor");
  const int64_t* p = index->const_data_ptr<int64_t>();
  for (int64_t i = 0; i < index->numel(); ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < size, name, " has entry ", p[i], ", out of range for size ", size);
  }
}

// weight[out_index][:, in_index] as a new contiguous tensor, rows and columns in one pass.
at::Tensor gather_weight(const at::Tensor& weight, const OptTensor& out_index, const OptTensor& in_index) {
  if (!out_index && !in_index) return weight;
  check_index(out_index, "out_index", weight.size(0));
  check_index(in_index, "in_index", weight.size(1));
  const at::Tensor w = weight.contiguous();
  const Selection sel = selection(w, out_index, in_index);
  const int64_t k = w.size(2) * w.size(3), c_in = w.size(1);
  at::Tensor out = at::empty({sel.n_rows, sel.n_cols, w.size(2), w.size(3)}, w.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "gather_weight", [&] {
    const scalar_t* src = w.const_data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    parallel_chunks(sel.n_rows * sel.n_cols, grain_blocks(k), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t r = p / sel.n_cols, c = p % sel.n_cols;
        std::copy_n(src + (sel.row(r) * c_in + sel.col(c)) * k, k, dst + p * k);
      }
    });
  });
  return out;
}

// Position of each full row in the selection, -1 where not selected.
std::vector<int64_t> positions(const int64_t* index, int64_t n_sel, int64_t n_full) {
  std::vector<int64_t> pos(n_full);
  if (!index) {
    std::iota(pos.begin(), pos.end(), int64_t{0});
    return pos;
  }
  std::fill(pos.begin(), pos.end(), int64_t{-1});
  for (int64_t i = 0; i < n_sel; ++i) pos[index[i]] = i;
  return pos;
}

// Full-size weight gradient, grad_sel in the selected rows/columns and zero
// elsewhere: every element written exactly once (no separate zero fill).
at::Tensor scatter_weight_grad(const at::Tensor& grad_sel, const at::Tensor& weight, const OptTensor& out_index,
                               const OptTensor& in_index) {
  if (!out_index && !in_index) return grad_sel;
  const at::Tensor g = grad_sel.contiguous();
  const Selection sel = selection(weight, out_index, in_index);
  const int64_t n_out = weight.size(0), c_in = weight.size(1), k = weight.size(2) * weight.size(3);
  const std::vector<int64_t> row_pos = positions(sel.rows, sel.n_rows, n_out);
  const std::vector<int64_t> col_pos = positions(sel.cols, sel.n_cols, c_in);
  at::Tensor full = at::empty(weight.sizes(), weight.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "scatter_weight_grad", [&] {
    const scalar_t* src = g.const_data_ptr<scalar_t>();
    scalar_t* dst = full.data_ptr<scalar_t>();
    parallel_chunks(n_out * c_in, grain_blocks(k), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t r = row_pos[p / c_in], c = col_pos[p % c_in];
        if (r >= 0 && c >= 0) {
          std::copy_n(src + (r * sel.n_cols + c) * k, k, dst + p * k);
        } else {
          std::fill_n(dst + p * k, k, scalar_t(0));
        }
      }
    });
  });
  return full;
}

// full[out_index][:, in_index] += grad_sel (rows distinct within one selection, so no races).
void accumulate_weight_grad(at::Tensor& full, const at::Tensor& grad_sel, const OptTensor& out_index,
                            const OptTensor& in_index) {
  const at::Tensor g = grad_sel.contiguous();
  const Selection sel = selection(full, out_index, in_index);
  const int64_t c_in = full.size(1), k = full.size(2) * full.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "accumulate_weight_grad", [&] {
    const scalar_t* src = g.const_data_ptr<scalar_t>();
    scalar_t* dst = full.data_ptr<scalar_t>();
    parallel_chunks(sel.n_rows * sel.n_cols, grain_blocks(k), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t r = p / sel.n_cols, c = p % sel.n_cols;
        scalar_t* d = dst + (sel.row(r) * c_in + sel.col(c)) * k;
        const scalar_t* s = src + p * k;
        for (int64_t j = 0; j < k; ++j) d[j] += s[j];
      }
    });
  });
}

OptTensor row_of(const OptTensor& index, int64_t g) {
  return index ? OptTensor(index->select(0, g)) : std::nullopt;
}

}  // namespace

at::Tensor partial_conv2d(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                          const OptTensor& out_index, const OptTensor& in_index, Ints stride, Ints padding,
                          Ints dilation, int64_t groups) {
  const at::Tensor w = gather_weight(weight, out_index, in_index);
  OptTensor b = bias;
  if (bias && out_index) b = bias->index_select(0, *out_index);
  return at::convolution(x, w, b, stride, padding, dilation, false, {0, 0}, groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> partial_conv2d_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const OptTensor& out_index,
    const OptTensor& in_index, bool has_bias, Ints stride, Ints padding, Ints dilation, int64_t groups,
    bool need_input, bool need_weight) {
  const at::Tensor w = gather_weight(weight, out_index, in_index);
  const std::vector<int64_t> bias_size{w.size(0)};
  auto [gx, gw, gb] = at::convolution_backward(
      grad, x, w, has_bias ? at::OptionalIntArrayRef(bias_size) : at::OptionalIntArrayRef(), stride, padding,
      dilation, false, {0, 0}, groups, {need_input, need_weight, has_bias});
  if (need_weight) gw = scatter_weight_grad(gw, weight, out_index, in_index);
  if (has_bias && out_index) gb = at::zeros({weight.size(0)}, gb.options()).index_copy_(0, *out_index, gb);
  return {gx, gw, gb};
}

// A loop of single partial convolutions: measured faster on CPU than one
// oneDNN grouped convolution over the gathered weights (issue 2). Without
// indices every group uses the whole weight, so the groups fold into the batch.
at::Tensor grouped_partial_conv2d(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                                  const OptTensor& out_index, const OptTensor& in_index, Ints stride,
                                  Ints padding, Ints dilation) {
  if (!out_index && !in_index) {  // one weight for all groups: a single convolution over the folded batch
    const at::Tensor y = at::convolution(x.flatten(0, 1), weight, bias, stride, padding, dilation, false, {0, 0}, 1);
    return y.unflatten(0, {x.size(0), x.size(1)});
  }
  std::vector<at::Tensor> ys;
  ys.reserve(x.size(0));
  for (int64_t g = 0; g < x.size(0); ++g) {
    ys.push_back(partial_conv2d(x.select(0, g), weight, bias, row_of(out_index, g), row_of(in_index, g), stride,
                                padding, dilation, 1));
  }
  return at::stack(ys);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_partial_conv2d_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const OptTensor& out_index,
    const OptTensor& in_index, bool has_bias, Ints stride, Ints padding, Ints dilation, bool need_input,
    bool need_weight) {
  if (!out_index && !in_index) {  // as in the forward: one convolution over the folded batch
    const std::vector<int64_t> bias_size{weight.size(0)};
    auto [gx, gw, gb] = at::convolution_backward(
        grad.flatten(0, 1), x.flatten(0, 1), weight,
        has_bias ? at::OptionalIntArrayRef(bias_size) : at::OptionalIntArrayRef(), stride, padding, dilation, false,
        {0, 0}, 1, {need_input, need_weight, has_bias});
    if (need_input) gx = gx.unflatten(0, {x.size(0), x.size(1)});
    return {gx, gw, gb};
  }
  at::Tensor gx, gw, gb;
  if (need_input) gx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (has_bias) gb = at::zeros({weight.size(0)}, weight.options());
  for (int64_t g = 0; g < x.size(0); ++g) {
    const OptTensor rows = row_of(out_index, g), cols = row_of(in_index, g);
    const at::Tensor w = gather_weight(weight, rows, cols);
    const std::vector<int64_t> bias_size{w.size(0)};
    auto [gx_g, gw_g, gb_g] = at::convolution_backward(
        grad.select(0, g), x.select(0, g), w,
        has_bias ? at::OptionalIntArrayRef(bias_size) : at::OptionalIntArrayRef(), stride, padding, dilation, false,
        {0, 0}, 1, {need_input, need_weight, has_bias});
    if (need_input) gx.select(0, g).copy_(gx_g);
    if (need_weight) {
      if (g == 0) {
        // A fresh contiguous tensor in every case, so later groups can add into it.
        gw = scatter_weight_grad(gw_g, weight, rows, cols).contiguous();
      } else {
        accumulate_weight_grad(gw, gw_g, rows, cols);
      }
    }
    if (has_bias) {
      if (rows) gb.index_add_(0, *rows, gb_g); else gb.add_(gb_g);
    }
  }
  return {gx, gw, gb};
}

}  // namespace cpu
}  // namespace loft_kernels
