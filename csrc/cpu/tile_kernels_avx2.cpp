// AVX2 + FMA tile kernels: 6 x 16 GEMM tile (12 accumulators in 16 ymm
// registers), expand by a permutation table over 8-position windows.
#include "tile_kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma,popcnt")

namespace spa_kernels::cpu {
namespace avx2 {

struct Vec {
  using vec = __m256;
  static constexpr int width = 8;
  static inline vec zero() { return _mm256_setzero_ps(); }
  static inline vec load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, vec v) { _mm256_storeu_ps(p, v); }
  static inline vec broadcast(float x) { return _mm256_set1_ps(x); }
  static inline vec fma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
  static inline vec add(vec a, vec b) { return _mm256_add_ps(a, b); }
};

#include "tile_kernels_simd.h"

constexpr int kMR = 6;
constexpr int kNV = 2;

void tile(int64_t depth, const float* a, const float* b, float* c, int64_t ldc, bool accumulate) {
  simd_tile<Vec, kMR, kNV>(depth, a, b, c, ldc, accumulate);
}

void tile_rows(int64_t depth, const float* const* rows, const int64_t* offsets, const float* b, float* c,
               int64_t ldc, bool accumulate) {
  simd_tile_rows<Vec, kMR, kNV>(depth, rows, offsets, b, c, ldc, accumulate);
}

void panel_outer(int64_t depth, const float* a, const float* t, float* p, int64_t ldp) {
  simd_panel_outer<Vec, kMR, kNV>(depth, a, t, p, ldp);
}

// For a window whose active lanes are the set bits of m: perm[m][j] is the
// compact element that lands in lane j (the count of active lanes below j),
// and keep[m][j] is all ones where lane j is active, zero elsewhere.
struct ExpandTable {
  alignas(32) int32_t perm[256][8];
  alignas(32) int32_t keep[256][8];
  ExpandTable() {
    for (int m = 0; m < 256; ++m) {
      int next = 0;
      for (int j = 0; j < 8; ++j) {
        const bool active = (m >> j) & 1;
        perm[m][j] = active ? next++ : 0;
        keep[m][j] = active ? -1 : 0;
      }
    }
  }
};

inline __m256 expand_window(const ExpandTable& table, const float* values, unsigned m) {
  const __m256i index = _mm256_load_si256(reinterpret_cast<const __m256i*>(table.perm[m]));
  const __m256 keep = _mm256_load_ps(reinterpret_cast<const float*>(table.keep[m]));
  return _mm256_and_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(values), index), keep);
}

template <bool kStream>
inline void store_window(float* dst, __m256 v) {
  if constexpr (kStream) {
    _mm256_stream_ps(dst, v);
  } else {
    _mm256_storeu_ps(dst, v);
  }
}

// Whole windows from position p (a multiple of 8) up to `end`, with
// `compact` at the values of position p: the window at 8w finds its values
// first[w] - first[p / 8] further on.  Every window takes the same path, with
// no branch on its bits (at low keep ratios they vary from window to window,
// and a mispredicted branch costs more than the permutation it would skip),
// and no window waits for the count of the one before; two cache lines are
// written at a time.
template <bool kStream>
void expand_windows(const ExpandTable& table, const float* compact, const uint8_t* bits, const int64_t* first,
                    int64_t p, int64_t end, float* dst) {
  const int64_t before = first[p >> 3];
  for (; p + 32 <= end; p += 32, dst += 32) {
    const int64_t w = p >> 3;
    const __m256 v0 = expand_window(table, compact + (first[w] - before), bits[w]);
    const __m256 v1 = expand_window(table, compact + (first[w + 1] - before), bits[w + 1]);
    const __m256 v2 = expand_window(table, compact + (first[w + 2] - before), bits[w + 2]);
    const __m256 v3 = expand_window(table, compact + (first[w + 3] - before), bits[w + 3]);
    store_window<kStream>(dst, v0);
    store_window<kStream>(dst + 8, v1);
    store_window<kStream>(dst + 16, v2);
    store_window<kStream>(dst + 24, v3);
  }
  for (; p + 8 <= end; p += 8, dst += 8) {
    store_window<kStream>(dst, expand_window(table, compact + (first[p >> 3] - before), bits[p >> 3]));
  }
}

void expand(const float* compact, const uint8_t* bits, const int64_t* window_first, int64_t lo, int64_t hi,
            float* out, bool stream) {
  static const ExpandTable table;
  const int64_t head_end = hi < ((lo + 7) & ~int64_t(7)) ? hi : ((lo + 7) & ~int64_t(7));
  compact = expand_scalar(compact, bits, lo, head_end, out, lo);
  float* dst = out + (head_end - lo);
  const int64_t tail = head_end + (hi - head_end) / 8 * 8;
  // Streaming stores need 32-byte alignment; a row that starts misaligned is
  // misaligned in every window.
  if (stream && (reinterpret_cast<uintptr_t>(dst) & 31) == 0) {
    expand_windows<true>(table, compact, bits, window_first, head_end, tail, dst);
    _mm_sfence();  // order the streamed stores before anyone reads them
  } else {
    expand_windows<false>(table, compact, bits, window_first, head_end, tail, dst);
  }
  compact += window_first[tail >> 3] - window_first[head_end >> 3];
  expand_scalar(compact, bits, tail, hi, out, lo);
}

}  // namespace avx2

const TileKernels<float>* avx2_float_kernels() {
  static const TileKernels<float> kernels{"avx2", avx2::kMR, avx2::kNV * avx2::Vec::width,
                                          &avx2::tile, &avx2::expand, &avx2::tile_rows, &avx2::panel_outer};
  return &kernels;
}

}  // namespace spa_kernels::cpu

#pragma GCC pop_options

#else

namespace spa_kernels::cpu {
const TileKernels<float>* avx2_float_kernels() { return nullptr; }
}  // namespace spa_kernels::cpu

#endif
