// footrule_matrix / mask_distance_matrix on the GPU: one block per (layer, a, b) pair.
// Ranks come precomputed (bindings.cpp sorts with ATen); the terms are shared with the CPU.
#include <cuda_runtime.h>

#include "launchers.h"
#include "loft_kernels/ranking.h"

namespace loft_kernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// Sum of v over the block (blockDim.x == kThreads), valid in thread 0.
template <typename acc_t>
__device__ inline acc_t block_sum(acc_t v) {
  __shared__ acc_t partial[kThreads];
  partial[threadIdx.x] = v;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) partial[threadIdx.x] += partial[threadIdx.x + width];
    __syncthreads();
  }
  return partial[0];
}

// Pair index of this block -> layer l and the two snapshots' rank rows.
__device__ inline int64_t pair_rows(int64_t T, const int64_t* n, const int64_t* offset, const int32_t* rank,
                                    const int32_t*& ra, const int32_t*& rb) {
  const int64_t pair = blockIdx.x, l = pair / (T * T), a = (pair / T) % T, b = pair % T;
  ra = rank + offset[l] + a * n[l];
  rb = rank + offset[l] + b * n[l];
  return l;
}

__global__ void footrule_kernel(int64_t T, const int64_t* n, const int64_t* offset, const int32_t* rank, float* out) {
  const int32_t *ra, *rb;
  const int64_t l = pair_rows(T, n, offset, rank, ra, rb);
  double sum = 0;
  for (int64_t f = threadIdx.x; f < n[l]; f += blockDim.x) sum += footrule_term(ra[f], rb[f]);
  sum = block_sum(sum);
  if (threadIdx.x == 0) out[blockIdx.x] = static_cast<float>(sum);
}

__global__ void mask_distance_kernel(int64_t T, const int64_t* n, const int64_t* offset, const int32_t* rank,
                                     const int64_t* keep, float* out) {
  const int32_t *ra, *rb;
  const int64_t l = pair_rows(T, n, offset, rank, ra, rb);
  long long differ = 0;
  for (int64_t f = threadIdx.x; f < n[l]; f += blockDim.x) differ += mask_disagree(ra[f], rb[f], keep[l]);
  differ = block_sum(differ);
  if (threadIdx.x == 0) out[blockIdx.x] = static_cast<float>(static_cast<double>(differ) / static_cast<double>(n[l]));
}

}  // namespace

void launch_footrule(int64_t L, int64_t T, const int64_t* n, const int64_t* offset, const int32_t* rank, float* out,
                     void* stream) {
  if (L * T * T == 0) return;
  footrule_kernel<<<static_cast<unsigned>(L * T * T), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      T, n, offset, rank, out);
}

void launch_mask_distance(int64_t L, int64_t T, const int64_t* n, const int64_t* offset, const int32_t* rank,
                          const int64_t* keep, float* out, void* stream) {
  if (L * T * T == 0) return;
  mask_distance_kernel<<<static_cast<unsigned>(L * T * T), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      T, n, offset, rank, keep, out);
}

}  // namespace cuda
}  // namespace loft_kernels
