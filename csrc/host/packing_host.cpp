// Planning of pack_rows / unpack_rows: each tensor as a strided [outer, size_d, inner] view.
#include "host/packing.h"

namespace loft_kernels {
namespace host {
namespace {

// (size, stride) of dims [begin, end) merged into one, if their strides allow it.
bool merge_dims(const at::Tensor& t, int64_t begin, int64_t end, int64_t& size, int64_t& stride) {
  size = 1;
  stride = 1;
  bool first = true;
  for (int64_t d = end - 1; d >= begin; --d) {  // innermost first
    if (t.size(d) == 1) continue;
    if (first) {
      stride = t.stride(d);
      first = false;
    } else if (t.stride(d) != stride * size) {
      return false;
    }
    size *= t.size(d);
  }
  return true;
}

}  // namespace

PackPlan make_pack_plan(const std::vector<at::Tensor>& tensors, const std::vector<at::Tensor>& indices,
                        const std::vector<int64_t>& dims) {
  TORCH_CHECK(!tensors.empty() && tensors.size() == indices.size() && tensors.size() == dims.size(),
              "tensors, indices and dims must be non-empty and of equal length");
  PackPlan plan;
  for (size_t i = 0; i < tensors.size(); ++i) {
    at::Tensor t = tensors[i];
    const int64_t d = dims[i];
    TORCH_CHECK(d >= 0 && d < t.dim(), "dims[", i, "] out of range");
    TORCH_CHECK(t.scalar_type() == tensors[0].scalar_type(), "all tensors must share one dtype");
    TORCH_CHECK(indices[i].dim() == 1, "indices[", i, "] must be 1-D");
    int64_t outer, so, inner, si;
    if (!merge_dims(t, 0, d, outer, so) || !merge_dims(t, d + 1, t.dim(), inner, si)) {
      t = t.contiguous();  // not expressible as [outer, size_d, inner]: work on a contiguous copy
      merge_dims(t, 0, d, outer, so);
      merge_dims(t, d + 1, t.dim(), inner, si);
    }
    const at::Tensor index = indices[i].to(at::kLong).contiguous();
    const int64_t k = index.numel();
    if (index.is_cpu()) {  // the kernels index raw memory with these (device indices were checked by the ops layer)
      const int64_t* p = index.const_data_ptr<int64_t>();
      for (int64_t j = 0; j < k; ++j) {
        TORCH_CHECK(p[j] >= 0 && p[j] < t.size(d), "indices[", i, "] has entry ", p[j], ", out of range for size ",
                    t.size(d));
      }
    }
    plan.starts.push_back(plan.total);
    plan.total += outer * k * inner;
    plan.data.push_back(t);
    plan.index.push_back(index);
    plan.views.push_back(PackView{outer, k, inner, so, t.stride(d), si});
  }
  return plan;
}

}  // namespace host
}  // namespace loft_kernels
