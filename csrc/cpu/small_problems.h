// Small problems: plain loops over the merged active weight block.
//
// For a layer call of a few thousand multiply-adds, the GEMM engine's fixed
// cost (packing, scratch buffers, parallel regions, one engine call per
// product of the backward) is many times its arithmetic: an 8 -> 8 linear
// took 8 us forward and 20-50 us backward (bench `overhead`).  Below the
// limit, the kernels instead merge W_OS + s B_O A_S (or + P_OS, the centre
// tap) once, |O| x |S| x r, and run single-threaded loops over it, reading
// the activations in place.  The limit counts the multiply-adds of the main
// product; tests set it to 0 (engine always) or leave the default.
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <optional>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "scatter_rows.h"

namespace spa_kernels::cpu {

// The loops' accumulator: double for float.  They add products one by one
// without the tile kernels' fused multiply-adds (this file is built for the
// baseline ISA), and a short sum that cancels would lose the digits the tests
// (and the engine) keep; at these sizes double costs little.
template <typename S>
using small_acc_t = std::conditional_t<std::is_same_v<S, float>, double, acc_t<S>>;

// Multiply-adds of the main product at or below which a call takes the loops.
int64_t small_problem_limit();
void set_small_problem_limit(int64_t macs);

// An optional operand's data, or null when absent.
template <typename S>
const S* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<S>() : nullptr;
}

// The active block of W (rows O, columns S, `taps` entries per (row, column)),
// as T, with the adapter added at tap `centre`: s B_O A_S (B: out x r, A: r x in)
// or P_OS (P: out x in).  Layout [o][k][tap].
template <typename S, typename T>
std::vector<T> merged_block(const S* w, int64_t in, int64_t taps, int64_t centre, IndexList O, IndexList S_,
                            const S* lora_a, const S* lora_b, int64_t rank, T scale, const S* adapter) {
  std::vector<T> block(O.count * S_.count * taps);
  for (int64_t o = 0; o < O.count; ++o) {
    const int64_t row = at_index(O, o);
    for (int64_t k = 0; k < S_.count; ++k) {
      const int64_t col = at_index(S_, k);
      T* dst = block.data() + (o * S_.count + k) * taps;
      const S* src = w + (row * in + col) * taps;
      for (int64_t t = 0; t < taps; ++t) dst[t] = static_cast<T>(src[t]);
      T extra = T(0);
      for (int64_t j = 0; j < rank; ++j) {
        extra += static_cast<T>(lora_b[row * rank + j]) * static_cast<T>(lora_a[j * in + col]);
      }
      dst[centre] += scale * extra;
      if (adapter) dst[centre] += static_cast<T>(adapter[row * in + col]);
    }
  }
  return block;
}

// The adapter gradients from G = dy_O^T x_S at the centre tap (|O| x |S|):
// dA[j, S] = s B_O^T G, dB[O, j] = s G A_S^T, dP[O, S] = G, written into
// zeroed full-size outputs (a null pointer: not asked for).
template <typename S, typename T>
void adapter_gradients(const std::vector<T>& g, int64_t in, IndexList O, IndexList S_, const S* lora_a,
                       const S* lora_b, int64_t rank, T scale, S* grad_a, S* grad_b, S* grad_p) {
  std::vector<T> da(grad_a ? rank * S_.count : 0), db(grad_b ? O.count * rank : 0);
  for (int64_t o = 0; o < O.count; ++o) {
    const int64_t row = at_index(O, o);
    for (int64_t k = 0; k < S_.count; ++k) {
      const int64_t col = at_index(S_, k);
      const T gk = g[o * S_.count + k];
      if (grad_p) grad_p[row * in + col] = static_cast<S>(gk);
      for (int64_t j = 0; j < rank; ++j) {
        if (grad_a) da[j * S_.count + k] += static_cast<T>(lora_b[row * rank + j]) * gk;
        if (grad_b) db[o * rank + j] += gk * static_cast<T>(lora_a[j * in + col]);
      }
    }
  }
  for (int64_t j = 0; grad_a && j < rank; ++j) {
    for (int64_t k = 0; k < S_.count; ++k) grad_a[j * in + at_index(S_, k)] = static_cast<S>(scale * da[j * S_.count + k]);
  }
  for (int64_t o = 0; grad_b && o < O.count; ++o) {
    for (int64_t j = 0; j < rank; ++j) grad_b[at_index(O, o) * rank + j] = static_cast<S>(scale * db[o * rank + j]);
  }
}

}  // namespace spa_kernels::cpu
