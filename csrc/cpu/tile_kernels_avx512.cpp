// AVX-512 tile kernels: 12 x 32 GEMM tile (24 accumulators in 32 zmm
// registers), expand with the native masked expand-load over 16-position
// windows.  Same tile template as the AVX2 file (tile_kernels_simd.h).
#include "tile_kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,popcnt")

namespace spa_kernels::cpu {
namespace avx512 {

struct Vec {
  using vec = __m512;
  static constexpr int width = 16;
  static inline vec zero() { return _mm512_setzero_ps(); }
  static inline vec load(const float* p) { return _mm512_loadu_ps(p); }
  static inline void store(float* p, vec v) { _mm512_storeu_ps(p, v); }
  static inline vec broadcast(float x) { return _mm512_set1_ps(x); }
  static inline vec fma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
  static inline vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
};

#include "tile_kernels_simd.h"

constexpr int kMR = 12;
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

void expand(const float* compact, const uint8_t* bits, const int64_t* window_first, int64_t lo, int64_t hi,
            float* out, bool stream) {
  const int64_t aligned = (lo + 15) & ~int64_t(15);
  const int64_t head_end = hi < aligned ? hi : aligned;
  compact = expand_scalar(compact, bits, lo, head_end, out, lo);
  // The values of the window at 8w start window_first[w] - before past `compact`.
  const int64_t before = window_first[head_end >> 3];
  int64_t p = head_end;
  for (; p + 16 <= hi; p += 16) {
    const unsigned m = static_cast<unsigned>(bits[p >> 3]) | (static_cast<unsigned>(bits[(p >> 3) + 1]) << 8);
    const float* values = compact + (window_first[p >> 3] - before);
    const __m512 v = _mm512_maskz_expandloadu_ps(static_cast<__mmask16>(m), values);
    float* dst = out + (p - lo);
    if (stream && (reinterpret_cast<uintptr_t>(dst) & 63) == 0) {
      _mm512_stream_ps(dst, v);
    } else {
      _mm512_storeu_ps(dst, v);
    }
  }
  expand_scalar(compact + (window_first[p >> 3] - before), bits, p, hi, out, lo);
  if (stream) _mm_sfence();  // order the streamed stores before anyone reads them
}

}  // namespace avx512

const TileKernels<float>* avx512_float_kernels() {
  static const TileKernels<float> kernels{"avx512", avx512::kMR, avx512::kNV * avx512::Vec::width,
                                          &avx512::tile, &avx512::expand, &avx512::tile_rows, &avx512::panel_outer};
  return &kernels;
}

}  // namespace spa_kernels::cpu

#pragma GCC pop_options

#else

namespace spa_kernels::cpu {
const TileKernels<float>* avx512_float_kernels() { return nullptr; }
}  // namespace spa_kernels::cpu

#endif
