// The GEMM tiles and the row expand, written once over a vector "traits" type so
// the AVX-512 and AVX2 kernels are the same code; included only by the ISA
// files, inside their own namespace and after their target pragma.
//
// Traits provide: vec, width, zero(), load(p), store(p, v), broadcast(x),
// fma(a, b, c) = a*b + c, add(a, b).

// The register tile over any way of reading A: `a_at(i, p)` is row i's entry
// at depth p.  c[i*ldc + j] (+)= sum_p a_at(i, p) * b[p*nr + j].
template <class V, int MR, int NV, class ReadA>
__attribute__((always_inline)) static inline void simd_tile_over(int64_t depth, ReadA a_at, const float* b,
                                                                 float* c, int64_t ldc, bool accumulate) {
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
      const typename V::vec av = V::broadcast(a_at(i, p));
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

// A from a packed micro-panel: entry (i, p) at a[p*MR + i].
template <class V, int MR, int NV>
static inline void simd_tile(int64_t depth, const float* a, const float* b, float* c, int64_t ldc,
                             bool accumulate) {
  simd_tile_over<V, MR, NV>(
      depth, [a](int i, int64_t p) { return a[p * MR + i]; }, b, c, ldc, accumulate);
}

// A read in place: entry (i, p) at rows[i][offsets[p]].
template <class V, int MR, int NV>
static inline void simd_tile_rows(int64_t depth, const float* const* rows, const int64_t* offsets, const float* b,
                                  float* c, int64_t ldc, bool accumulate) {
  const float* row[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) row[i] = rows[i];
  simd_tile_over<V, MR, NV>(
      depth, [&row, offsets](int i, int64_t p) { return row[i][offsets[p]]; }, b, c, ldc, accumulate);
}

// p[k*ldp + j] += sum_i a[k*MR + i] * t[i*NV*width + j]: t's MR x NV vectors
// live in registers, so each depth entry is NV loads, MR broadcasts, MR*NV
// FMAs and NV stores.  Successive entries are independent, which hides the
// FMA chain's latency.
template <class V, int MR, int NV>
static inline void simd_panel_outer(int64_t depth, const float* a, const float* t, float* p, int64_t ldp) {
  typename V::vec tv[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) tv[i][j] = V::load(t + (i * NV + j) * V::width);
  }
  for (int64_t k = 0; k < depth; ++k) {
    float* row = p + k * ldp;
    typename V::vec acc[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[j] = V::load(row + j * V::width);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const typename V::vec av = V::broadcast(a[k * MR + i]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[j] = V::fma(av, tv[i][j], acc[j]);
    }
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) V::store(row + j * V::width, acc[j]);
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
