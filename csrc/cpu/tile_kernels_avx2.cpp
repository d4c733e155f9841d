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

// perm[m][j]: which compact element lands in lane j of a window whose active
// lanes are the set bits of m (the count of active lanes below j).
struct ExpandTable {
  alignas(32) int32_t perm[256][8];
  ExpandTable() {
    for (int m = 0; m < 256; ++m) {
      int next = 0;
      for (int j = 0; j < 8; ++j) perm[m][j] = ((m >> j) & 1) ? next++ : 0;
    }
  }
};

void expand(const float* compact, const uint8_t* bits, int64_t lo, int64_t hi, float* out, bool stream) {
  static const ExpandTable table;
  int64_t p = lo;
  const int64_t head_end = hi < ((lo + 7) & ~int64_t(7)) ? hi : ((lo + 7) & ~int64_t(7));
  compact = expand_scalar(compact, bits, p, head_end, out, lo);
  p = head_end;
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  for (; p + 8 <= hi; p += 8) {
    const unsigned m = bits[p >> 3];
    __m256 v;
    if (m == 0xFFu) {
      v = _mm256_loadu_ps(compact);
    } else {
      const __m256i index = _mm256_load_si256(reinterpret_cast<const __m256i*>(table.perm[m]));
      const __m256i lanes = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(m)), lane_bit);
      const __m256 keep = _mm256_castsi256_ps(_mm256_cmpeq_epi32(lanes, lane_bit));
      v = _mm256_and_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(compact), index), keep);
    }
    float* dst = out + (p - lo);
    if (stream && (reinterpret_cast<uintptr_t>(dst) & 31) == 0) {
      _mm256_stream_ps(dst, v);
    } else {
      _mm256_storeu_ps(dst, v);
    }
    compact += __builtin_popcount(m);
  }
  expand_scalar(compact, bits, p, hi, out, lo);
  if (stream) _mm_sfence();  // order the streamed stores before anyone reads them
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
