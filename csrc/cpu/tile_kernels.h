// The instruction-set-specific part of the CPU kernels, behind a plain table.
//
// Everything that depends on the instruction set is a few small functions: the
// register-blocked GEMM tile (reading A packed, or in place), and the row
// "expand" that scatters a compact row of active outputs into a full-width row
// with zeros between.  Packing,
// gathering, threading and dtype conversion are shared code (masked_gemm.h),
// compiled once; each ISA file compiles only these two functions, with no
// library headers after its target pragma, so no inline library code is ever
// emitted twice with different instruction sets.
#pragma once

#include <cstdint>

namespace spa_kernels::cpu {

template <typename T>
struct TileKernels {
  const char* isa;
  int mr;  // rows of a tile (of the packed A micro-panel)
  int nr;  // columns of a tile (of the packed B micro-panel)
  // c[i*ldc + j] (+)= sum_p a[p*mr + i] * b[p*nr + j] for i < mr, j < nr.
  void (*tile)(int64_t depth, const T* a, const T* b, T* c, int64_t ldc, bool accumulate);
  // Writes out[p - lo] for p in [lo, hi): the next compact value where bit p of
  // `active_bits` is set, zero elsewhere; `compact` starts at the value of the
  // first active position at or after lo.  window_first[w] is the number of
  // active positions below 8w (see ActivePositions), so windows need not
  // count their way along the row.  `compact` may be read up to 16 elements
  // past the last value consumed (callers allocate that slack).  `stream`
  // asks for non-temporal stores: for outputs much larger than the caches,
  // which would otherwise be read into cache just to be overwritten.
  void (*expand)(const T* compact, const uint8_t* active_bits, const int64_t* window_first, int64_t lo,
                 int64_t hi, T* out, bool stream);
  // The tile with A read in place instead of from a packed micro-panel:
  // c[i*ldc + j] (+)= sum_p rows[i][offsets[p]] * b[p*nr + j] for i < mr, j < nr.
  // For operands whose element (i, p) is a row address plus a depth offset
  // (convolution patches of a zero-padded input), so A is never copied.
  void (*tile_rows)(int64_t depth, const T* const* rows, const int64_t* offsets, const T* b, T* c, int64_t ldc,
                    bool accumulate);
  // The transposed product of a packed A micro-panel with an (mr x nr) block t:
  // p[k*ldp + j] += sum_{i<mr} a[k*mr + i] * t[i*nr + j] for k < depth, j < nr.
  // Sums over A's rows (A^T T) from the panels another GEMM packed, without
  // transposing them first; t stays in registers for the whole panel.
  void (*panel_outer)(int64_t depth, const T* a, const T* t, T* p, int64_t ldp);
};

// Returns nullptr where the ISA was not compiled in (non-x86 builds).
const TileKernels<float>* avx512_float_kernels();
const TileKernels<float>* avx2_float_kernels();
const TileKernels<float>* generic_float_kernels();
const TileKernels<double>* generic_double_kernels();

}  // namespace spa_kernels::cpu
