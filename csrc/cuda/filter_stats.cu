// filter_norms / filter_stats on the GPU: one warp per row, rows of all tensors in one launch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launchers.h"
#include "loft_kernels/filter_stats.h"

namespace loft_kernels {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ inline float load(const float* p) { return *p; }
__device__ inline double load(const double* p) { return *p; }
__device__ inline float load(const __half* p) { return __half2float(*p); }
__device__ inline float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }

template <typename acc_t>
__device__ inline acc_t warp_sum(acc_t v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

template <typename scalar_t>
__global__ void filter_stats_kernel(int64_t n, int64_t total_rows, const int64_t* row_start, const int64_t* row_len,
                                 const void* const* a, const void* const* b, float* const* out) {
  using acc_t = typename Acc<scalar_t>::type;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  for (int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp; row < total_rows;
       row += warps) {
    const int64_t s = segment_of(row_start, n, row);
    const int64_t local = row - row_start[s], m = row_len[s];
    const scalar_t* pa = static_cast<const scalar_t*>(a[s]) + local * m;
    acc_t aa = 0, bb = 0, ab = 0, dd = 0;
    if (b == nullptr) {
      for (int64_t j = lane; j < m; j += kWarp) norm_step<acc_t>(load(pa + j), aa);
      aa = warp_sum(aa);
      if (lane == 0) out[s][local] = static_cast<float>(sqrt(aa));
    } else {
      const scalar_t* pb = static_cast<const scalar_t*>(b[s]) + local * m;
      for (int64_t j = lane; j < m; j += kWarp) stats_step<acc_t>(load(pa + j), load(pb + j), aa, bb, ab, dd);
      aa = warp_sum(aa);
      bb = warp_sum(bb);
      ab = warp_sum(ab);
      dd = warp_sum(dd);
      if (lane == 0) {
        float* o = out[s] + local * kNumStats;
        o[kAA] = static_cast<float>(aa);
        o[kBB] = static_cast<float>(bb);
        o[kAB] = static_cast<float>(ab);
        o[kDD] = static_cast<float>(dd);
      }
    }
  }
}

template <typename scalar_t>
void launch(int64_t n, int64_t total_rows, const int64_t* row_start, const int64_t* row_len, const void* const* a,
            const void* const* b, float* const* out, cudaStream_t stream) {
  const int64_t rows_per_block = kThreads / kWarp;
  const int64_t blocks = (total_rows + rows_per_block - 1) / rows_per_block;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 ? blocks : 65535);  // grid-stride beyond that
  filter_stats_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(n, total_rows, row_start, row_len, a, b, out);
}

}  // namespace

void launch_filter_stats(DType dtype, int64_t n, int64_t total_rows, const int64_t* row_start,
                         const int64_t* row_len, const void* const* a, const void* const* b, float* const* out,
                         void* stream) {
  if (total_rows == 0) return;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32: return launch<float>(n, total_rows, row_start, row_len, a, b, out, s);
    case DType::kFloat64: return launch<double>(n, total_rows, row_start, row_len, a, b, out, s);
    case DType::kFloat16: return launch<__half>(n, total_rows, row_start, row_len, a, b, out, s);
    case DType::kBFloat16: return launch<__nv_bfloat16>(n, total_rows, row_start, row_len, a, b, out, s);
  }
}

}  // namespace cuda
}  // namespace loft_kernels
