// The GEMM tiles and the row expand, written once over a vector "traits" type so
// the AVX-512 and AVX2 kernels are the same code; included only by the ISA
// files, inside their own namespace and after their target pragma.
//
// Traits provide: vec, width, zero(), load(p), store(p, v), broadcast(x),
// fma(a, b, c) = a*b + c, add(a, b).

template <class V, int MR, int NV>
static inline void simd_tile(int64_t depth, const float* a, const float* b, float* c, int64_t ldc,
                             bool accumulate) {
  typename V::vec acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[i][j] = V::zero();
  }
  for (int64_t p = 0; p < depth; ++p) {
    typename V::vec bv[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) bv[j] = V::load(b + j * V::width);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const typename V::vec av = V::broadcast(a[i]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[i][j] = V::fma(av, bv[j], acc[i][j]);
    }
    a += MR;
    b += NV * V::width;
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      float* dst = c + i * ldc + j * V::width;
      V::store(dst, accumulate ? V::add(acc[i][j], V::load(dst)) : acc[i][j]);
    }
  }
}

// simd_tile with row i of A at rows[i] + offsets[p] instead of a packed panel.
template <class V, int MR, int NV>
static inline void simd_tile_rows(int64_t depth, const float* const* rows, const int64_t* offsets, const float* b,
                                  float* c, int64_t ldc, bool accumulate) {
  const float* row[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) row[i] = rows[i];
  typename V::vec acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[i][j] = V::zero();
  }
  for (int64_t p = 0; p < depth; ++p) {
    const int64_t offset = offsets[p];
    typename V::vec bv[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) bv[j] = V::load(b + j * V::width);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const typename V::vec av = V::broadcast(row[i][offset]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[i][j] = V::fma(av, bv[j], acc[i][j]);
    }
    b += NV * V::width;
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      float* dst = c + i * ldc + j * V::width;
      V::store(dst, accumulate ? V::add(acc[i][j], V::load(dst)) : acc[i][j]);
    }
  }
}

// Scalar expand for the unaligned head and tail of a row.
// `out` points at position `base`.
static inline const float* expand_scalar(const float* compact, const uint8_t* bits, int64_t lo,
                                         int64_t hi, float* out, int64_t base) {
  for (int64_t p = lo; p < hi; ++p) {
    const bool active = (bits[p >> 3] >> (p & 7)) & 1;
    out[p - base] = active ? *compact++ : 0.0f;
  }
  return compact;
}
