// Writers for GEMM result rows (the `finalize` of masked_gemm).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "masked_gemm.h"

namespace spa_kernels::cpu {

// Accumulation type: float for float/bfloat16/half inputs, double for double.
template <typename S>
using acc_t = std::conditional_t<std::is_same_v<S, double>, double, float>;

// Active channels of a dimension: `ptr[0:count]`, or all `count` when ptr is null.
struct IndexList {
  const int64_t* ptr = nullptr;
  int64_t count = 0;
};

// Checks an index list against its dimension (sorted, unique, in range) so a
// direct call of the op can never read out of bounds.
inline IndexList index_list(const std::optional<at::Tensor>& idx, int64_t size, const char* name) {
  if (!idx.has_value() || !idx->defined()) return {nullptr, size};
  const at::Tensor& t = *idx;
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.is_contiguous() && t.device().is_cpu(), name,
                    " must be a contiguous 1-D CPU tensor");
  const int64_t n = t.numel();
  // An empty tensor may have no storage; a null ptr would read as "all active".
  static const int64_t kNone = 0;
  const int64_t* p = n > 0 ? t.data_ptr<int64_t>() : &kNone;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_INDEX(p[i] >= 0 && p[i] < size, name, "[", i, "] = ", p[i], " is outside [0, ", size, ")");
    TORCH_CHECK_VALUE(i == 0 || p[i] > p[i - 1], name, " must be strictly increasing");
  }
  return {p, n};
}

// Bit p set when position p is active; 8 bytes of slack for 16-wide reads.
inline std::vector<uint8_t> active_bits(IndexList idx, int64_t width) {
  std::vector<uint8_t> bits((width + 7) / 8 + 8, 0);
  for (int64_t n = 0; n < idx.count; ++n) {
    const int64_t p = idx.ptr ? idx.ptr[n] : n;
    bits[p >> 3] |= static_cast<uint8_t>(1u << (p & 7));
  }
  return bits;
}

// Stores C rows densely into a T matrix (the rank-r products), times `scale`.
template <typename T>
struct StoreDense {
  T* out;
  int64_t ld;
  T scale;
  void operator()(int64_t i, T* c, int64_t n0, int64_t n1, int) const {
    T* row = out + i * ld + n0;
    for (int64_t n = 0; n < n1 - n0; ++n) row[n] = scale * c[n];
  }
};

// Scatters C rows into full-width output rows of dtype S: GEMM row i goes to
// output row row_idx[i], column n to position positions[n]; every other
// position of that row segment is written as zero in the same pass, so the
// output needs no separate clearing.
template <typename S, typename T>
struct ScatterRows {
  const TileKernels<T>* kernels = nullptr;
  S* out = nullptr;
  int64_t ld = 0;
  const int64_t* row_idx = nullptr;
  IndexList positions;         // over `width`; null ptr = identity
  const uint8_t* bits = nullptr;
  int64_t width = 0;
  const T* bias = nullptr;     // per GEMM column, or null
  T scale = T(1);
  bool stream = false;         // non-temporal stores (outputs far larger than cache)
  T* scratch = nullptr;        // per thread, scratch_ld each; for S != T only
  int64_t scratch_ld = 0;

  void operator()(int64_t i, T* c, int64_t n0, int64_t n1, int thread) const {
    const int64_t count = n1 - n0;
    if (bias) {
      for (int64_t n = 0; n < count; ++n) c[n] += bias[n0 + n];
    }
    if (scale != T(1)) {
      for (int64_t n = 0; n < count; ++n) c[n] *= scale;
    }
    int64_t lo = n0, hi = n1;
    if (positions.ptr) {
      lo = n0 == 0 ? 0 : positions.ptr[n0];
      hi = n1 == positions.count ? width : positions.ptr[n1];
    }
    S* row = out + (row_idx ? row_idx[i] : i) * ld + lo;
    if constexpr (std::is_same_v<S, T>) {
      if (positions.ptr) {
        kernels->expand(c, bits, lo, hi, row, stream);
      } else {
        std::memcpy(row, c, sizeof(T) * count);
      }
    } else {
      const T* src = c;
      if (positions.ptr) {
        T* tmp = scratch + thread * scratch_ld;
        kernels->expand(c, bits, lo, hi, tmp, false);
        src = tmp;
      }
      for (int64_t p = 0; p < hi - lo; ++p) row[p] = static_cast<S>(src[p]);
    }
  }
};

}  // namespace spa_kernels::cpu
