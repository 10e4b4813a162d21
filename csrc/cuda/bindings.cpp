// Torch side of the CUDA kernels: tensors -> device metadata -> the launchers of launchers.h.
// Compiled only into the CUDA build of the extension (loft_kernels/_ext.py); bound as the
// `cuda` submodule of the extension with the same signatures as the CPU functions.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include <vector>

#include "host/packing.h"
#include "host/partial_conv.h"
#include "launchers.h"

namespace loft_kernels {
namespace cuda {
namespace {

using Tensors = std::vector<at::Tensor>;

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "the CUDA kernels take float16/bfloat16/float32/float64, got ", t.scalar_type());
  }
}

void* stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

int64_t ptr(const at::Tensor& t) { return reinterpret_cast<int64_t>(t.data_ptr()); }

// Host int64 values -> a device tensor the kernels read (freed by the caching
// allocator only after the work queued on this stream, so it outlives the launch).
at::Tensor to_device(const std::vector<int64_t>& values, const at::Device& device) {
  at::Tensor host = at::tensor(values, at::TensorOptions().dtype(at::kLong));
  return host.to(device);
}

template <typename T>
const T* as(const at::Tensor& meta, int64_t offset) {
  return reinterpret_cast<const T*>(meta.const_data_ptr<int64_t>() + offset);
}

Tensors filter_stats_rows(const Tensors& a_in, const Tensors* b_in) {
  TORCH_CHECK(!a_in.empty(), "tensors must not be empty");
  const c10::cuda::CUDAGuard guard(a_in[0].device());
  Tensors a, b, out;
  std::vector<int64_t> row_start{0}, row_len, pa, pb, po;
  for (size_t i = 0; i < a_in.size(); ++i) {
    a.push_back(a_in[i].contiguous());
    if (b_in) b.push_back((*b_in)[i].contiguous());
    const int64_t n = a[i].size(0), m = n == 0 ? 0 : a[i].numel() / n;
    const auto opts = a[i].options().dtype(at::kFloat);
    out.push_back(b_in ? at::empty({n, 4}, opts) : at::empty({n}, opts));
    row_start.push_back(row_start.back() + n);
    row_len.push_back(m);
    pa.push_back(ptr(a[i]));
    pb.push_back(b_in ? ptr(b[i]) : 0);
    po.push_back(ptr(out[i]));
  }
  const int64_t n = static_cast<int64_t>(a.size()), total_rows = row_start.back();
  std::vector<int64_t> meta(row_start.begin(), row_start.end());
  for (const auto* part : {&row_len, &pa, &pb, &po}) meta.insert(meta.end(), part->begin(), part->end());
  const at::Tensor d = to_device(meta, a[0].device());
  // Layout of d: row_start[n + 1], row_len[n], a[n], b[n], out[n].
  launch_filter_stats(dtype_of(a[0]), n, total_rows, as<int64_t>(d, 0), as<int64_t>(d, n + 1),
                      as<const void*>(d, 2 * n + 1), b_in ? as<const void*>(d, 3 * n + 1) : nullptr,
                      const_cast<float* const*>(as<float*>(d, 4 * n + 1)), stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

Tensors filter_norms(const Tensors& tensors) { return filter_stats_rows(tensors, nullptr); }

Tensors filter_stats(const Tensors& a, const Tensors& b) {
  TORCH_CHECK(a.size() == b.size(), "a and b must have the same length");
  return filter_stats_rows(a, &b);
}

// Ranks of every layer (ATen's stable sort on the device), concatenated as int32,
// plus the device metadata n[L], offset[L] (and keep[L]) the distance kernels read.
struct DeviceRanks {
  at::Tensor rank, meta;
  int64_t L, T;
};

DeviceRanks device_ranks(const Tensors& scores, const std::vector<int64_t>* keep) {
  TORCH_CHECK(!scores.empty(), "scores must not be empty");
  std::vector<at::Tensor> flat;
  std::vector<int64_t> n, offset, meta;
  int64_t total = 0;
  for (const auto& s : scores) {
    const at::Tensor order = std::get<1>(s.sort(/*stable=*/true, /*dim=*/1, /*descending=*/true));
    const at::Tensor positions =
        at::arange(1, s.size(1) + 1, order.options()).unsqueeze(0).expand_as(order);
    flat.push_back(at::empty_like(order).scatter_(1, order, positions).to(at::kInt).reshape(-1));
    n.push_back(s.size(1));
    offset.push_back(total);
    total += s.numel();
  }
  meta = n;
  meta.insert(meta.end(), offset.begin(), offset.end());
  if (keep) meta.insert(meta.end(), keep->begin(), keep->end());
  return {at::cat(flat), to_device(meta, scores[0].device()), static_cast<int64_t>(scores.size()), scores[0].size(0)};
}

at::Tensor footrule_matrix(const Tensors& scores) {
  const c10::cuda::CUDAGuard guard(scores[0].device());
  const DeviceRanks r = device_ranks(scores, nullptr);
  at::Tensor out = at::empty({r.L, r.T, r.T}, scores[0].options().dtype(at::kFloat));
  launch_footrule(r.L, r.T, as<int64_t>(r.meta, 0), as<int64_t>(r.meta, r.L), r.rank.const_data_ptr<int32_t>(),
                  out.data_ptr<float>(), stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor mask_distance_matrix(const Tensors& scores, const std::vector<int64_t>& keep) {
  TORCH_CHECK(keep.size() == scores.size(), "keep must have one count per layer");
  const c10::cuda::CUDAGuard guard(scores[0].device());
  const DeviceRanks r = device_ranks(scores, &keep);
  at::Tensor out = at::empty({r.L, r.T, r.T}, scores[0].options().dtype(at::kFloat));
  launch_mask_distance(r.L, r.T, as<int64_t>(r.meta, 0), as<int64_t>(r.meta, r.L), r.rank.const_data_ptr<int32_t>(),
                       as<int64_t>(r.meta, 2 * r.L), out.data_ptr<float>(), stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void run_pack(bool pack, const host::PackPlan& plan, void* flat, int64_t element_size, const at::Device& device) {
  const int64_t n = static_cast<int64_t>(plan.data.size());
  static_assert(sizeof(PackView) == 6 * sizeof(int64_t), "PackView is six int64");
  // Layout: starts[n], views[6 n], idx[n], data[n].
  std::vector<int64_t> meta(plan.starts.begin(), plan.starts.end());
  for (const PackView& v : plan.views) meta.insert(meta.end(), {v.outer, v.k, v.inner, v.so, v.sd, v.si});
  for (const auto& i : plan.index) meta.push_back(ptr(i));
  for (const auto& t : plan.data) meta.push_back(ptr(t));
  const at::Tensor d = to_device(meta, device);
  const bool ok = launch_pack(pack, n, plan.total, as<int64_t>(d, 0), as<PackView>(d, n),
                              as<const int64_t*>(d, 7 * n), const_cast<void* const*>(as<void*>(d, 8 * n)), flat,
                              element_size, stream());
  TORCH_CHECK(ok, "pack_rows/unpack_rows: unsupported element size ", element_size);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor pack_rows(const Tensors& tensors, const Tensors& indices, const std::vector<int64_t>& dims) {
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const host::PackPlan plan = host::make_pack_plan(tensors, indices, dims);
  at::Tensor flat = at::empty({plan.total}, tensors[0].options());
  run_pack(true, plan, flat.data_ptr(), flat.element_size(), flat.device());
  return flat;
}

void unpack_rows(const at::Tensor& flat_in, const Tensors& tensors, const Tensors& indices,
                 const std::vector<int64_t>& dims) {
  for (const auto& t : tensors) at::assert_no_internal_overlap(t);  // shared locations: one arbitrary write wins
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const host::PackPlan plan = host::make_pack_plan(tensors, indices, dims);
  const at::Tensor flat = flat_in.contiguous();
  TORCH_CHECK(flat.numel() == plan.total, "flat must hold the ", plan.total, " packed elements");
  run_pack(false, plan, const_cast<void*>(flat.const_data_ptr()), flat.element_size(), flat.device());
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (!plan.data[i].is_same(tensors[i])) tensors[i].copy_(plan.data[i]);  // written into a contiguous copy
  }
}

// ---- partial convolutions: gather and scatter launches around cuDNN (csrc/host/partial_conv_host.cpp) ----
void gather_weight(const ConvSlice& s, const at::Tensor& weight, const at::Tensor* bias, at::Tensor& w_sel,
                   at::Tensor* b_sel) {
  launch_gather_weight(dtype_of(weight), s, weight.const_data_ptr(), bias ? bias->const_data_ptr() : nullptr,
                       w_sel.data_ptr(), b_sel ? b_sel->data_ptr() : nullptr, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void scatter_grad(const ConvSlice& s, const int64_t* row_pos, const int64_t* col_pos, const at::Tensor& gw_sel,
                  const at::Tensor* gb_sel, at::Tensor& gw, at::Tensor* gb) {
  launch_scatter_grad(dtype_of(gw), s, row_pos, col_pos, gw_sel.const_data_ptr(),
                      gb_sel ? gb_sel->const_data_ptr() : nullptr, gw.data_ptr(), gb ? gb->data_ptr() : nullptr,
                      stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

const host::SliceKernels kSlice{&gather_weight, &scatter_grad};
using host::Grads;
using host::Ints;
using host::OptTensor;

at::Tensor partial_conv2d(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                          const OptTensor& out_index, const OptTensor& in_index, Ints stride, Ints padding,
                          Ints dilation, int64_t groups) {
  const c10::cuda::CUDAGuard guard(x.device());
  return host::partial_conv2d(kSlice, x, weight, bias, out_index, in_index, stride, padding, dilation, groups);
}

Grads partial_conv2d_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                              const OptTensor& out_index, const OptTensor& in_index, bool has_bias, Ints stride,
                              Ints padding, Ints dilation, int64_t groups, bool need_input, bool need_weight) {
  const c10::cuda::CUDAGuard guard(x.device());
  return host::partial_conv2d_backward(kSlice, grad, x, weight, out_index, in_index, has_bias, stride, padding,
                                       dilation, groups, need_input, need_weight);
}

// cuDNN runs the G convolutions as one grouped convolution over the batches stacked along the channels.
at::Tensor grouped_partial_conv2d(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                                  const OptTensor& out_index, const OptTensor& in_index, Ints stride,
                                  Ints padding, Ints dilation) {
  const c10::cuda::CUDAGuard guard(x.device());
  return host::grouped_partial_conv2d(kSlice, host::Grouping::kStacked, x, weight, bias, out_index, in_index,
                                      stride, padding, dilation);
}

Grads grouped_partial_conv2d_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                      const OptTensor& out_index, const OptTensor& in_index, bool has_bias,
                                      Ints stride, Ints padding, Ints dilation, bool need_input, bool need_weight) {
  const c10::cuda::CUDAGuard guard(x.device());
  return host::grouped_partial_conv2d_backward(kSlice, host::Grouping::kStacked, grad, x, weight, out_index,
                                               in_index, has_bias, stride, padding, dilation, need_input,
                                               need_weight);
}

}  // namespace

void bind(pybind11::module& m) {
  m.def("partial_conv2d", &partial_conv2d);
  m.def("partial_conv2d_backward", &partial_conv2d_backward);
  m.def("grouped_partial_conv2d", &grouped_partial_conv2d);
  m.def("grouped_partial_conv2d_backward", &grouped_partial_conv2d_backward);
  m.def("filter_norms", &filter_norms);
  m.def("filter_stats", &filter_stats);
  m.def("footrule_matrix", &footrule_matrix);
  m.def("mask_distance_matrix", &mask_distance_matrix);
  m.def("pack_rows", &pack_rows);
  m.def("unpack_rows", &unpack_rows);
}

}  // namespace cuda
}  // namespace loft_kernels
