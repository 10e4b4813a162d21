// pack_rows / unpack_rows on the GPU: one thread per flat element, all tensors in one launch.
// Elements are copied as opaque words of the dtype's size; the offset mapping is shared with the CPU.
#include <cuda_runtime.h>

#include "launchers.h"
#include "loft_kernels/packing.h"

namespace loft_kernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;

struct alignas(16) Word16 {
  unsigned long long lo, hi;
};

template <typename word_t, bool kPack>
__global__ void pack_kernel(int64_t n, int64_t total, const int64_t* starts, const PackView* views,
                            const int64_t* const* idx, void* const* data, word_t* flat) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < total; p += step) {
    int64_t offset;
    const int64_t s = pack_locate(starts, n, views, idx, p, offset);
    word_t* t = static_cast<word_t*>(data[s]) + offset;
    if (kPack) flat[p] = *t; else *t = flat[p];
  }
}

template <typename word_t>
void launch(bool pack, int64_t n, int64_t total, const int64_t* starts, const PackView* views,
            const int64_t* const* idx, void* const* data, void* flat, cudaStream_t stream) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 ? blocks : 65535);  // grid-stride beyond that
  word_t* f = static_cast<word_t*>(flat);
  if (pack) {
    pack_kernel<word_t, true><<<grid, kThreads, 0, stream>>>(n, total, starts, views, idx, data, f);
  } else {
    pack_kernel<word_t, false><<<grid, kThreads, 0, stream>>>(n, total, starts, views, idx, data, f);
  }
}

}  // namespace

bool launch_pack(bool pack, int64_t n, int64_t total, const int64_t* starts, const PackView* views,
                 const int64_t* const* idx, void* const* data, void* flat, int64_t element_size, void* stream) {
  if (total == 0) return true;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (element_size) {
    case 1: launch<unsigned char>(pack, n, total, starts, views, idx, data, flat, s); return true;
    case 2: launch<unsigned short>(pack, n, total, starts, views, idx, data, flat, s); return true;
    case 4: launch<unsigned int>(pack, n, total, starts, views, idx, data, flat, s); return true;
    case 8: launch<unsigned long long>(pack, n, total, starts, views, idx, data, flat, s); return true;
    case 16: launch<Word16>(pack, n, total, starts, views, idx, data, flat, s); return true;
    default: return false;
  }
}

}  // namespace cuda
}  // namespace loft_kernels
