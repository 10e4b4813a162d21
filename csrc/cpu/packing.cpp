// pack_rows / unpack_rows: selected rows of many tensors <-> one flat buffer, in one parallel pass.
//
// Each thread takes a contiguous range of the flat buffer, locates its first
// element once (tensor, outer, row, inner) and then walks runs of the inner
// dimension in nested loops, copying elements as opaque words of the dtype's
// size, so every dtype of that size (floats, ints, bool, complex) takes the same path.
#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <vector>

#include "host/packing.h"
#include "loft_kernels/packing.h"
#include "ops.h"
#include "parallel.h"

namespace loft_kernels {
namespace cpu {
namespace {

constexpr int64_t kGrain = 1 << 17;  // elements per thread before going parallel
constexpr int64_t kShortRun = 16;    // runs shorter than this are copied inline, not by memmove
constexpr int64_t kPrefetchRuns = 8;  // how many selected rows ahead a short-run copy prefetches

struct Word16 {
  uint64_t lo, hi;
};

// Copy between flat[begin, end) and the planned tensors; kPack: tensors -> flat.
template <typename word_t, bool kPack>
void run_plan(const host::PackPlan& plan, word_t* flat) {
  const int64_t n = static_cast<int64_t>(plan.data.size());
  const PackView* views = plan.views.data();
  std::vector<word_t*> base;
  std::vector<const int64_t*> idx;
  for (int64_t s = 0; s < n; ++s) {
    base.push_back(static_cast<word_t*>(plan.data[s].data_ptr()));
    idx.push_back(plan.index[s].const_data_ptr<int64_t>());
  }
  parallel_chunks(plan.total, kGrain, [&](int64_t begin, int64_t end) {
    int64_t p = begin;
    int64_t s = segment_of(plan.starts.data(), n, p);
    int64_t o, r, j;  // where this chunk starts: outer slice, selected row, inner offset
    pack_coords(p - plan.starts[s], views[s].k, views[s].inner, o, r, j);
    for (; s < n; ++s, o = r = j = 0) {
      const PackView v = views[s];
      if (v.outer * v.k * v.inner == 0) continue;  // an empty tensor holds no part of the buffer
      const int64_t* const rows = idx[s];
      for (; o < v.outer; ++o, r = 0) {
        for (; r < v.k; ++r, j = 0) {
          const int64_t run = std::min(v.inner - j, end - p);
          word_t* const t = base[s] + pack_source_offset(v, rows, o, r, j);
          word_t* const f = flat + p;
          if (v.si == 1 && run >= kShortRun) {
            if (kPack) std::copy_n(t, run, f); else std::copy_n(f, run, t);
          } else {
            // Short runs (e.g. the 3x3 kernel of one input channel) sit at scattered
            // rows: fetch a few rows ahead, as the hardware prefetcher cannot guess them.
            if (r + kPrefetchRuns < v.k) {
              __builtin_prefetch(base[s] + pack_source_offset(v, rows, o, r + kPrefetchRuns, 0), kPack ? 0 : 1);
            }
            for (int64_t q = 0; q < run; ++q) {
              if (kPack) f[q] = t[q * v.si]; else t[q * v.si] = f[q];
            }
          }
          p += run;
          if (p == end) return;
        }
      }
    }
  });
}

template <bool kPack>
void run_plan_bytes(const host::PackPlan& plan, void* flat, int64_t element_size) {
  switch (element_size) {
    case 1: return run_plan<uint8_t, kPack>(plan, static_cast<uint8_t*>(flat));
    case 2: return run_plan<uint16_t, kPack>(plan, static_cast<uint16_t*>(flat));
    case 4: return run_plan<uint32_t, kPack>(plan, static_cast<uint32_t*>(flat));
    case 8: return run_plan<uint64_t, kPack>(plan, static_cast<uint64_t*>(flat));
    case 16: return run_plan<Word16, kPack>(plan, static_cast<Word16*>(flat));
    default: TORCH_CHECK(false, "pack_rows/unpack_rows: unsupported element size ", element_size);
  }
}

}  // namespace

at::Tensor pack_rows(const Tensors& tensors, const Tensors& indices, const Ints& dims) {
  const host::PackPlan plan = host::make_pack_plan(tensors, indices, dims);
  at::Tensor flat = at::empty({plan.total}, tensors[0].options());
  run_plan_bytes<true>(plan, flat.data_ptr(), flat.element_size());
  return flat;
}

void unpack_rows(const at::Tensor& flat_in, const Tensors& tensors, const Tensors& indices, const Ints& dims) {
  // A destination whose elements share memory would keep one arbitrary write per location.
  for (const auto& t : tensors) at::assert_no_internal_overlap(t);
  const host::PackPlan plan = host::make_pack_plan(tensors, indices, dims);
  const at::Tensor flat = flat_in.contiguous();
  TORCH_CHECK(flat.numel() == plan.total && flat.scalar_type() == tensors[0].scalar_type(),
              "flat must hold the packed rows: ", plan.total, " elements of ", tensors[0].scalar_type());
  run_plan_bytes<false>(plan, const_cast<void*>(flat.const_data_ptr()), flat.element_size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (!plan.data[i].is_same(tensors[i])) tensors[i].copy_(plan.data[i]);  // written into a contiguous copy
  }
}

}  // namespace cpu
}  // namespace loft_kernels
