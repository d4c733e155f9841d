// Portable tile kernels: any CPU, float and double.  The double kernels serve
// float64 inputs (gradcheck), the float ones CPUs without AVX2.
#include "tile_kernels.h"

namespace spa_kernels::cpu {
namespace generic {

template <typename T, int MR, int NR>
void tile(int64_t depth, const T* a, const T* b, T* c, int64_t ldc, bool accumulate) {
  T acc[MR][NR] = {};
  for (int64_t p = 0; p < depth; ++p) {
    for (int i = 0; i < MR; ++i) {
      const T av = a[i];
      for (int j = 0; j < NR; ++j) acc[i][j] += av * b[j];
    }
    a += MR;
    b += NR;
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) c[i * ldc + j] = accumulate ? c[i * ldc + j] + acc[i][j] : acc[i][j];
  }
}

template <typename T, int MR, int NR>
void tile_rows(int64_t depth, const T* const* rows, const int64_t* offsets, const T* b, T* c, int64_t ldc,
               bool accumulate) {
  T acc[MR][NR] = {};
  for (int64_t p = 0; p < depth; ++p) {
    for (int i = 0; i < MR; ++i) {
      const T av = rows[i][offsets[p]];
      for (int j = 0; j < NR; ++j) acc[i][j] += av * b[j];
    }
    b += NR;
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) c[i * ldc + j] = accumulate ? c[i * ldc + j] + acc[i][j] : acc[i][j];
  }
}

template <typename T, int MR, int NR>
void panel_outer(int64_t depth, const T* a, const T* t, T* p, int64_t ldp) {
  for (int64_t k = 0; k < depth; ++k) {
    for (int i = 0; i < MR; ++i) {
      const T av = a[k * MR + i];
      for (int j = 0; j < NR; ++j) p[k * ldp + j] += av * t[i * NR + j];
    }
  }
}

template <typename T>
void expand(const T* compact, const uint8_t* bits, const int64_t* /*window_first*/, int64_t lo, int64_t hi, T* out,
            bool /*stream*/) {
  for (int64_t p = lo; p < hi; ++p) {
    const bool active = (bits[p >> 3] >> (p & 7)) & 1;
    out[p - lo] = active ? *compact++ : T(0);
  }
}

}  // namespace generic

const TileKernels<float>* generic_float_kernels() {
  static const TileKernels<float> kernels{"generic", 4, 16, &generic::tile<float, 4, 16>,
                                          &generic::expand<float>, &generic::tile_rows<float, 4, 16>,
                                          &generic::panel_outer<float, 4, 16>};
  return &kernels;
}

const TileKernels<double>* generic_double_kernels() {
  static const TileKernels<double> kernels{"generic", 4, 8, &generic::tile<double, 4, 8>,
                                           &generic::expand<double>, &generic::tile_rows<double, 4, 8>,
                                           &generic::panel_outer<double, 4, 8>};
  return &kernels;
}

}  // namespace spa_kernels::cpu
