// filter_norms / filter_stats: per-row statistics of a whole list of tensors in one pass.
//
// All rows of all tensors form one table; threads take contiguous ranges of it
// balanced by element count. Each row is reduced in its accumulation type
// (float for half/bfloat16/float32, double for float64) over blocks whose sums
// are added in double, so long rows keep float32 accuracy.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "convert.h"
#include "loft_kernels/filter_stats.h"
#include "ops.h"
#include "parallel.h"

namespace loft_kernels {
namespace cpu {
namespace {

constexpr int64_t kBlock = 1024;   // elements reduced in the accumulation type before adding to the double total
constexpr int64_t kGrain = 1 << 18;  // elements per thread before going parallel (~60 us of work)

struct RowTable {
  std::vector<int64_t> tensor_of_row;  // tensor holding each row
  std::vector<int64_t> first;          // first element of each row (within its tensor)
  std::vector<int64_t> length;         // elements per row
  std::vector<int64_t> elem_start;     // cumulative element count before each row (load balancing)
  std::vector<int64_t> out_row;        // row index within its tensor
};

RowTable row_table(const Tensors& tensors) {
  RowTable t;
  int64_t elems = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const int64_t n = tensors[i].size(0);
    const int64_t m = n == 0 ? 0 : tensors[i].numel() / n;
    for (int64_t r = 0; r < n; ++r) {
      t.tensor_of_row.push_back(static_cast<int64_t>(i));
      t.first.push_back(r * m);
      t.length.push_back(m);
      t.elem_start.push_back(elems);
      t.out_row.push_back(r);
      elems += m;
    }
  }
  t.elem_start.push_back(elems);
  return t;
}

// Rows whose first element falls in [begin, end) of the element range: each row to exactly one thread.
template <typename F>
void for_rows(const RowTable& t, const F& f) {
  const int64_t rows = static_cast<int64_t>(t.length.size());
  const int64_t elems = t.elem_start.back();
  auto first_row_at = [&](int64_t e) {
    return static_cast<int64_t>(std::lower_bound(t.elem_start.begin(), t.elem_start.end() - 1, e) -
                                t.elem_start.begin());
  };
  if (elems == 0) {  // only empty rows: nothing to balance
    for (int64_t r = 0; r < rows; ++r) f(r);
    return;
  }
  parallel_chunks(elems, kGrain, [&](int64_t begin, int64_t end) {
    // The first chunk also takes the empty rows that precede any element.
    const int64_t r0 = begin == 0 ? 0 : first_row_at(begin);
    const int64_t r1 = end == elems ? rows : first_row_at(end);
    for (int64_t r = r0; r < r1; ++r) f(r);
  });
}

template <typename scalar_t, typename acc_t>
void accumulate_row(const scalar_t* a, const scalar_t* b, int64_t m, float* out) {
  double total[kNumStats] = {0, 0, 0, 0};
  for (int64_t start = 0; start < m; start += kBlock) {
    const int64_t stop = std::min(m, start + kBlock);
    acc_t aa = 0, bb = 0, ab = 0, dd = 0;
#pragma omp simd reduction(+ : aa, bb, ab, dd)
    for (int64_t j = start; j < stop; ++j) {
      stats_step<acc_t>(load_acc<acc_t>(a[j]), load_acc<acc_t>(b[j]), aa, bb, ab, dd);
    }
    total[kAA] += aa;
    total[kBB] += bb;
    total[kAB] += ab;
    total[kDD] += dd;
  }
  for (int s = 0; s < kNumStats; ++s) out[s] = static_cast<float>(total[s]);
}

template <typename scalar_t, typename acc_t>
float row_norm(const scalar_t* a, int64_t m) {
  double total = 0;
  for (int64_t start = 0; start < m; start += kBlock) {
    const int64_t stop = std::min(m, start + kBlock);
    acc_t aa = 0;
#pragma omp simd reduction(+ : aa)
    for (int64_t j = start; j < stop; ++j) norm_step<acc_t>(load_acc<acc_t>(a[j]), aa);
    total += aa;
  }
  return static_cast<float>(std::sqrt(total));
}

Tensors float_outputs(const Tensors& tensors, int64_t cols) {
  Tensors out;
  for (const auto& t : tensors) {
    const auto opts = t.options().dtype(at::kFloat);
    out.push_back(cols == 1 ? at::empty({t.size(0)}, opts) : at::empty({t.size(0), cols}, opts));
  }
  return out;
}

Tensors contiguous(const Tensors& tensors, const char* name) {
  Tensors out;
  for (const auto& t : tensors) {
    TORCH_CHECK(t.dim() >= 1, name, ": every tensor needs a filter dimension");
    TORCH_CHECK(t.scalar_type() == tensors[0].scalar_type(), name, ": all tensors must share one dtype");
    out.push_back(t.contiguous());
  }
  return out;
}

}  // namespace

Tensors filter_norms(const Tensors& tensors_in) {
  TORCH_CHECK(!tensors_in.empty(), "filter_norms: tensors must not be empty");
  const Tensors tensors = contiguous(tensors_in, "filter_norms");
  Tensors out = float_outputs(tensors, 1);
  const RowTable table = row_table(tensors);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "filter_norms", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<const scalar_t*> src;
    std::vector<float*> dst;
    for (size_t i = 0; i < tensors.size(); ++i) {
      src.push_back(tensors[i].const_data_ptr<scalar_t>());
      dst.push_back(out[i].data_ptr<float>());
    }
    for_rows(table, [&](int64_t r) {
      const int64_t i = table.tensor_of_row[r];
      dst[i][table.out_row[r]] = row_norm<scalar_t, acc_t>(src[i] + table.first[r], table.length[r]);
    });
  });
  return out;
}

Tensors filter_stats(const Tensors& a_in, const Tensors& b_in) {
  TORCH_CHECK(!a_in.empty() && a_in.size() == b_in.size(), "filter_stats: a and b must be non-empty and of equal length");
  const Tensors a = contiguous(a_in, "filter_stats a"), b = contiguous(b_in, "filter_stats b");
  for (size_t i = 0; i < a.size(); ++i) {
    TORCH_CHECK(a[i].sizes() == b[i].sizes() && a[i].scalar_type() == b[i].scalar_type(),
                "filter_stats: a[", i, "] and b[", i, "] must have the same shape and dtype");
  }
  Tensors out = float_outputs(a, kNumStats);
  const RowTable table = row_table(a);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a[0].scalar_type(), "filter_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<const scalar_t*> pa, pb;
    std::vector<float*> dst;
    for (size_t i = 0; i < a.size(); ++i) {
      pa.push_back(a[i].const_data_ptr<scalar_t>());
      pb.push_back(b[i].const_data_ptr<scalar_t>());
      dst.push_back(out[i].data_ptr<float>());
    }
    for_rows(table, [&](int64_t r) {
      const int64_t i = table.tensor_of_row[r], off = table.first[r];
      accumulate_row<scalar_t, acc_t>(pa[i] + off, pb[i] + off, table.length[r],
                                      dst[i] + table.out_row[r] * kNumStats);
    });
  });
  return out;
}

}  // namespace cpu
}  // namespace loft_kernels
