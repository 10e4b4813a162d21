// Partial convolutions on the GPU: the weight gather and the gradient scatter, one launch each.
// The convolution between them is cuDNN's (through ATen, csrc/host/partial_conv_host.cpp); the
// index arithmetic is csrc/include/loft_kernels/partial_conv.h, shared with the CPU build.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launchers.h"
#include "loft_kernels/partial_conv.h"

namespace loft_kernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ inline float to_acc(float v) { return v; }
__device__ inline double to_acc(double v) { return v; }
__device__ inline float to_acc(__half v) { return __half2float(v); }
__device__ inline float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ inline T from_acc(typename Acc<T>::type v) { return static_cast<T>(v); }
template <> __device__ inline __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ inline __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

unsigned grid_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65535 ? blocks : 65535);  // grid-stride beyond that
}

// Elements [0, weight_total) of the gathered weight, then the G * n_rows gathered bias entries.
template <typename T>
__global__ void gather_kernel(ConvSlice s, const T* weight, const T* bias, T* w_sel, T* b_sel) {
  const int64_t weight_total = s.gathered_blocks() * s.k;
  const int64_t total = weight_total + (bias ? s.groups * s.n_rows : 0);
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < total; q += step) {
    if (q < weight_total) {
      w_sel[q] = weight[gather_block_offset(s, q / s.k) + q % s.k];
    } else {
      b_sel[q - weight_total] = bias[gather_bias_row(s, q - weight_total)];
    }
  }
}

// Every element of the full-size gradients written once: the sum over the groups that
// selected it (in group order), zero where none did.
template <typename T>
__global__ void scatter_kernel(ConvSlice s, const int64_t* row_pos, const int64_t* col_pos, const T* gw_sel,
                               const T* gb_sel, T* gw, T* gb) {
  using acc_t = typename Acc<T>::type;
  const int64_t weight_total = s.full_blocks() * s.k;
  const int64_t total = weight_total + (gb ? s.n_out : 0);
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < total; p += step) {
    acc_t sum = 0;
    if (p < weight_total) {
      const int64_t f = p / s.k, j = p % s.k;
      for (int64_t g = 0; g < s.groups; ++g) {
        const int64_t from = scatter_block_source(s, row_pos, col_pos, g, f);
        if (from >= 0) sum += to_acc(gw_sel[from + j]);
      }
      gw[p] = from_acc<T>(sum);
    } else {
      const int64_t o = p - weight_total;
      for (int64_t g = 0; g < s.groups; ++g) {
        const int64_t from = scatter_bias_source(s, row_pos, g, o);
        if (from >= 0) sum += to_acc(gb_sel[from]);
      }
      gb[o] = from_acc<T>(sum);
    }
  }
}

template <typename T>
void gather(const ConvSlice& s, const void* weight, const void* bias, void* w_sel, void* b_sel, cudaStream_t st) {
  const int64_t total = s.gathered_blocks() * s.k + (bias ? s.groups * s.n_rows : 0);
  if (total == 0) return;
  gather_kernel<T><<<grid_for(total), kThreads, 0, st>>>(s, static_cast<const T*>(weight),
                                                         static_cast<const T*>(bias), static_cast<T*>(w_sel),
                                                         static_cast<T*>(b_sel));
}

template <typename T>
void scatter(const ConvSlice& s, const int64_t* row_pos, const int64_t* col_pos, const void* gw_sel,
             const void* gb_sel, void* gw, void* gb, cudaStream_t st) {
  const int64_t total = s.full_blocks() * s.k + (gb ? s.n_out : 0);
  if (total == 0) return;
  scatter_kernel<T><<<grid_for(total), kThreads, 0, st>>>(s, row_pos, col_pos, static_cast<const T*>(gw_sel),
                                                          static_cast<const T*>(gb_sel), static_cast<T*>(gw),
                                                          static_cast<T*>(gb));
}

}  // namespace

void launch_gather_weight(DType dtype, const ConvSlice& s, const void* weight, const void* bias, void* w_sel,
                          void* b_sel, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32: return gather<float>(s, weight, bias, w_sel, b_sel, st);
    case DType::kFloat64: return gather<double>(s, weight, bias, w_sel, b_sel, st);
    case DType::kFloat16: return gather<__half>(s, weight, bias, w_sel, b_sel, st);
    case DType::kBFloat16: return gather<__nv_bfloat16>(s, weight, bias, w_sel, b_sel, st);
  }
}

void launch_scatter_grad(DType dtype, const ConvSlice& s, const int64_t* row_pos, const int64_t* col_pos,
                         const void* gw_sel, const void* gb_sel, void* gw, void* gb, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32: return scatter<float>(s, row_pos, col_pos, gw_sel, gb_sel, gw, gb, st);
    case DType::kFloat64: return scatter<double>(s, row_pos, col_pos, gw_sel, gb_sel, gw, gb, st);
    case DType::kFloat16: return scatter<__half>(s, row_pos, col_pos, gw_sel, gb_sel, gw, gb, st);
    case DType::kBFloat16: return scatter<__nv_bfloat16>(s, row_pos, col_pos, gw_sel, gb_sel, gw, gb, st);
  }
}

}  // namespace cuda
}  // namespace loft_kernels
