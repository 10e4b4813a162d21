// Host side of pack_rows / unpack_rows, shared by the CPU and the CUDA build (needs ATen, not CUDA).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "loft_kernels/packing.h"

namespace loft_kernels {
namespace host {

// Host-side plan of a pack/unpack: each tensor as a strided [outer, size_d, inner]
// view plus its segment of the flat buffer.
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

}  // namespace host
}  // namespace loft_kernels
