// Python bindings of the extension (one module for the CPU and, when built, the CUDA kernels).
// Only the pybind11 type casters for tensors: far quicker to compile than torch/extension.h.
#include <torch/csrc/utils/pybind.h>

#include "ops.h"

#ifdef LK_WITH_CUDA
namespace loft_kernels {
namespace cuda {
void bind(pybind11::module& m);  // csrc/cuda/bindings.cpp
}
}  // namespace loft_kernels
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace cpu = loft_kernels::cpu;
  m.doc() = "loft_kernels C++/OpenMP (and CUDA) kernels; called through loft_kernels.backends";
  m.def("partial_conv2d", &cpu::partial_conv2d);
  m.def("partial_conv2d_backward", &cpu::partial_conv2d_backward);
  m.def("grouped_partial_conv2d", &cpu::grouped_partial_conv2d);
  m.def("grouped_partial_conv2d_backward", &cpu::grouped_partial_conv2d_backward);
  m.def("partial_conv2d_node", &cpu::partial_conv2d_node);
  m.def("grouped_partial_conv2d_node", &cpu::grouped_partial_conv2d_node);
  m.def("filter_norms", &cpu::filter_norms);
  m.def("filter_stats", &cpu::filter_stats);
  m.def("footrule_matrix", &cpu::footrule_matrix);
  m.def("mask_distance_matrix", &cpu::mask_distance_matrix);
  m.def("pack_rows", &cpu::pack_rows);
  m.def("unpack_rows", &cpu::unpack_rows);
#ifdef LK_WITH_CUDA
  m.attr("with_cuda") = true;
  auto cuda = m.def_submodule("cuda", "CUDA kernels");
  loft_kernels::cuda::bind(cuda);
#else
  m.attr("with_cuda") = false;
#endif
}
