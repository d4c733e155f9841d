// Writers for GEMM result rows (the `finalize` of masked_gemm).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "isa.h"
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

// Entry i of an index list (i itself when the list is all).
inline int64_t at_index(IndexList list, int64_t i) { return list.ptr ? list.ptr[i] : i; }

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

// The active positions of a row in the form `expand` reads them: bit p of
// `bits` is set when position p is active (8 bytes of slack for 16-wide
// reads), and first[w] counts the active positions below 8w, so each window of
// eight finds its values in the compact row without counting the ones before.
struct ActivePositions {
  IndexList list;
  int64_t width = 0;
  std::vector<uint8_t> bits;
  std::vector<int64_t> first;
};

inline ActivePositions active_positions(IndexList idx, int64_t width) {
  ActivePositions a{idx, width, std::vector<uint8_t>((width + 7) / 8 + 8, 0), {}};
  for (int64_t n = 0; n < idx.count; ++n) {
    const int64_t p = idx.ptr ? idx.ptr[n] : n;
    a.bits[p >> 3] |= static_cast<uint8_t>(1u << (p & 7));
  }
  a.first.resize((width + 7) / 8 + 1);
  int64_t below = 0;
  for (size_t w = 0; w < a.first.size(); ++w) {
    a.first[w] = below;
    below += __builtin_popcount(a.bits[w]);
  }
  return a;
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
// output row row_idx[i], column n to the n-th active position; every other
// position of that row segment is written as zero in the same pass, so the
// output needs no separate clearing.
template <typename S, typename T>
struct ScatterRows {
  const TileKernels<T>* kernels = nullptr;
  S* out = nullptr;
  int64_t ld = 0;
  const int64_t* row_idx = nullptr;
  const ActivePositions* active = nullptr;  // over the row's width; a null list = identity
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
    const IndexList& positions = active->list;
    int64_t lo = n0, hi = n1;
    if (positions.ptr) {
      lo = n0 == 0 ? 0 : positions.ptr[n0];
      hi = n1 == positions.count ? active->width : positions.ptr[n1];
    }
    S* row = out + (row_idx ? row_idx[i] : i) * ld + lo;
    if constexpr (std::is_same_v<S, T>) {
      if (positions.ptr) {
        kernels->expand(c, active->bits.data(), active->first.data(), lo, hi, row, stream);
      } else {
        std::memcpy(row, c, sizeof(T) * count);
      }
    } else {
      const T* src = c;
      if (positions.ptr) {
        T* tmp = scratch + thread * scratch_ld;
        kernels->expand(c, active->bits.data(), active->first.data(), lo, hi, tmp, false);
        src = tmp;
      }
      for (int64_t p = 0; p < hi - lo; ++p) row[p] = static_cast<S>(src[p]);
    }
  }
};

// Outputs at least this large are written with non-temporal stores.
constexpr int64_t kStreamingBytes = int64_t(16) << 20;

// A ScatterRows into `rows` rows of `out` (row stride ld) at `active`'s
// positions; `scratch` holds the per-thread rows that dtypes other than the
// accumulation type convert through.
template <typename S>
ScatterRows<S, acc_t<S>> scatter_into(S* out, int64_t ld, const ActivePositions& active, int64_t rows,
                                      std::vector<acc_t<S>>& scratch, int threads) {
  ScatterRows<S, acc_t<S>> w;
  w.kernels = &kernels_for<acc_t<S>>();
  w.out = out;
  w.ld = ld;
  w.active = &active;
  // Stream stores only when the output dwarfs the last-level cache share.
  w.stream = static_cast<int64_t>(sizeof(S)) * active.width * rows >= kStreamingBytes;
  if constexpr (!std::is_same_v<S, acc_t<S>>) {
    w.scratch_ld = active.width + kSlack;
    scratch.assign(static_cast<size_t>(threads) * w.scratch_ld, acc_t<S>(0));
    w.scratch = scratch.data();
  }
  return w;
}

}  // namespace spa_kernels::cpu
