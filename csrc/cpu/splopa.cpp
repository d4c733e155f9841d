// Block-SPA (SPLoPA) linear on the CPU: forward and backward over the active blocks.
//
//   Π_k = U_k V_k (p x q),  E_ij = W_ij + s Σ_k Φ[k,i,j] Π_k  for active (i, j)
//   forward   y_i = Σ_j x_j E_ij^T + b_i
//   backward  dx_j = Σ_i dy_i E_ij,   G_ij = dy_i^T x_j,   dW_ij = G_ij,
//             dΦ[k,i,j] = s <G_ij, Π_k>,  dΠ_k = s Σ_ij Φ[k,i,j] G_ij,
//             dU_k = dΠ_k V_k^T,  dV_k = U_k^T dΠ_k,  db = Σ_m dy
//
// Each E_ij is built while B is packed (block_sparse_gemm), so neither a
// full-size ΔW nor W + ΔW exists; pruned blocks of W and Φ are never read.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "block_sparse_gemm.h"
#include "isa.h"
#include "scatter_rows.h"

namespace spa_kernels::cpu {
namespace {

void check_operand(const at::Tensor& t, const char* name, int64_t dims, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.dim() == dims, name, " must be ", dims, "-D, got ", t.dim(), "-D");
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), name, " has dtype ", t.scalar_type(), " but x has ",
                   like.scalar_type());
}

struct SPLoPAShapes {
  int64_t M, in, out, K, rank, p, q;
  BlockRows blocks;
};

SPLoPAShapes check_splopa(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& rows,
                          const at::Tensor& cols, const at::Tensor& pos_weights,
                          const std::optional<at::Tensor>& block_mask) {
  check_operand(x, "x", 2, x);
  check_operand(weight, "weight", 2, x);
  check_operand(rows, "prototype_rows", 3, x);
  check_operand(cols, "prototype_cols", 3, x);
  check_operand(pos_weights, "pos_weights", 3, x);
  SPLoPAShapes s{x.size(0), x.size(1), weight.size(0), rows.size(0), rows.size(1), cols.size(1), rows.size(2), {}};
  TORCH_CHECK_VALUE(weight.size(1) == s.in, "weight must have ", s.in, " columns");
  TORCH_CHECK_VALUE(s.K > 0 && cols.size(0) == s.K && pos_weights.size(0) == s.K, "mismatched number of prototypes K");
  TORCH_CHECK_VALUE(s.rank > 0 && cols.size(2) == s.rank, "mismatched prototype rank");
  TORCH_CHECK_VALUE(s.p > 0 && s.q > 0 && s.out % s.p == 0 && s.in % s.q == 0,
                    "weight shape is not divisible by the block shape");
  const int64_t block_rows = s.out / s.p, block_cols = s.in / s.q;
  TORCH_CHECK_VALUE(pos_weights.size(1) == block_rows && pos_weights.size(2) == block_cols,
                    "pos_weights must be (K, out/p, in/q)");
  const bool* mask = nullptr;
  if (block_mask.has_value() && block_mask->defined()) {
    const at::Tensor& m = *block_mask;
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool, "block_mask must be bool");
    TORCH_CHECK_VALUE(m.dim() == 2 && m.size(0) == block_rows && m.size(1) == block_cols && m.is_contiguous() &&
                          m.device().is_cpu(),
                      "block_mask must be a contiguous (out/p, in/q) CPU tensor");
    mask = m.data_ptr<bool>();
  }
  s.blocks = block_rows_of(mask, block_rows, block_cols);
  return s;
}

// Π (K x p*q) in the accumulation type.
template <typename S, typename T>
std::vector<T> prototypes(const SPLoPAShapes& s, const S* rows, const S* cols) {
  std::vector<T> pi(s.K * s.p * s.q, T(0));
  for (int64_t k = 0; k < s.K; ++k) {
    for (int64_t a = 0; a < s.p; ++a) {
      T* out = pi.data() + (k * s.p + a) * s.q;
      for (int64_t t = 0; t < s.rank; ++t) {
        const T u = static_cast<T>(cols[(k * s.p + a) * s.rank + t]);
        const S* v = rows + (k * s.rank + t) * s.q;
        for (int64_t b = 0; b < s.q; ++b) out[b] += u * static_cast<T>(v[b]);
      }
    }
  }
  return pi;
}

// The effective blocks E = W_ij + s ΔW_ij of a run of blocks that
// block_sparse_gemm packs one after another (a block row for the forward, a
// block column for dx).  ΔW of a run is a GEMM, s Φ_run (n x K) Π (K x pq):
// it goes through the ISA's register tile, mr blocks by nr elements at a time,
// with Π packed into tile panels once per call, instead of K passes of a
// scalar loop over every block.
template <typename S, typename T>
class EffectiveBlocks {
 public:
  EffectiveBlocks(const TileKernels<T>& kernels, const SPLoPAShapes& s, const S* weight, const S* pos_weights,
                  const std::vector<T>& pi, T scale)
      : kern_(kernels), s_(s), weight_(weight), pos_weights_(pos_weights), scale_(scale),
        pq_(s.p * s.q), panels_((pq_ + kernels.nr - 1) / kernels.nr),
        packed_pi_(panels_ * s.K * kernels.nr + kSlack) {
    const int nr = kern_.nr;
    for (int64_t c = 0; c < panels_; ++c) {
      T* panel = packed_pi_.get() + c * s.K * nr;
      for (int64_t k = 0; k < s.K; ++k) {
        for (int n = 0; n < nr; ++n) {
          const int64_t e = c * nr + n;
          panel[k * nr + n] = e < pq_ ? pi[k * pq_ + e] : T(0);
        }
      }
    }
  }

  // Writes ΔW of the blocks at row-major positions[0..n) to run (n x pq).
  void adapter_run(const int64_t* positions, int64_t n, std::vector<T>& run) const {
    const int mr = kern_.mr, nr = kern_.nr;
    const int64_t n_blocks = s_.blocks.rows * s_.blocks.cols;
    run.resize(n * pq_);
    thread_local std::vector<T> packed_phi, tile;
    packed_phi.resize(s_.K * mr);
    tile.resize(static_cast<size_t>(mr) * nr);
    for (int64_t b0 = 0; b0 < n; b0 += mr) {
      const int64_t rows = std::min<int64_t>(mr, n - b0);
      for (int64_t k = 0; k < s_.K; ++k) {
        for (int b = 0; b < mr; ++b) {
          packed_phi[k * mr + b] =
              b < rows ? scale_ * static_cast<T>(pos_weights_[k * n_blocks + positions[b0 + b]]) : T(0);
        }
      }
      for (int64_t c = 0; c < panels_; ++c) {
        kern_.tile(s_.K, packed_phi.data(), packed_pi_.get() + c * s_.K * nr, tile.data(), nr, false);
        const int64_t width = std::min<int64_t>(nr, pq_ - c * nr);
        for (int64_t b = 0; b < rows; ++b) {
          std::copy(tile.data() + b * nr, tile.data() + b * nr + width, run.data() + (b0 + b) * pq_ + c * nr);
        }
      }
    }
  }

  // dst (p x q, row-major) = W_ij + delta for the block at row-major position
  // pos, delta its row of adapter_run.
  void effective(int64_t pos, const T* delta, T* dst) const {
    const int64_t i = pos / s_.blocks.cols, j = pos % s_.blocks.cols;
    for (int64_t a = 0; a < s_.p; ++a) {
      const S* w = weight_ + (i * s_.p + a) * s_.in + j * s_.q;
      for (int64_t b = 0; b < s_.q; ++b) dst[a * s_.q + b] = static_cast<T>(w[b]) + delta[a * s_.q + b];
    }
  }

  int64_t block_size() const { return pq_; }

 private:
  const TileKernels<T>& kern_;
  const SPLoPAShapes& s_;
  const S* weight_;
  const S* pos_weights_;
  T scale_;
  int64_t pq_, panels_;
  AlignedBuffer<T> packed_pi_;
};

// The fill callback of block_sparse_gemm over `blocks` (by block row for the
// forward, by block column for dx): on the first block of a run it forms the
// whole run's ΔW, then hands out each block's E.  block_sparse_gemm fills a
// run's blocks in order on one thread, so the run lives in thread-local memory.
// position(run, a) is block a's row-major position, and (i, j) its coordinates.
template <typename S, typename T, typename Position>
auto run_filler(const EffectiveBlocks<S, T>& effective, const BlockRows& blocks, Position position) {
  return [&effective, &blocks, position](int64_t run, int64_t a, T* dst) {
    thread_local std::vector<T> delta;
    thread_local std::vector<int64_t> positions;
    const int64_t first = blocks.begin[run];
    if (a == first) {
      positions.clear();
      for (int64_t b = first; b < blocks.begin[run + 1]; ++b) positions.push_back(position(run, b));
      effective.adapter_run(positions.data(), static_cast<int64_t>(positions.size()), delta);
    }
    effective.effective(position(run, a), delta.data() + (a - first) * effective.block_size(), dst);
  };
}

// The active blocks' outer sums G (count x pq) and the prototypes Π (K x pq)
// as tensors of the accumulation type over their own storage.
template <typename T>
at::Tensor as_matrix_view(const T* data, int64_t rows, int64_t cols) {
  return at::from_blob(const_cast<T*>(data), {rows, cols}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// dΦ[k, block a] = s <G_a, Π_k> at each active block's row-major position:
// one GEMM, G Π^T (count x K).
template <typename S, typename T>
void phi_gradient(const SPLoPAShapes& s, const T* g, const T* pi, const at::Tensor& position, T scale,
                  at::Tensor& grad_phi) {
  const int64_t pq = s.p * s.q, count = s.blocks.count();
  const at::Tensor dots = at::mm(as_matrix_view(g, count, pq), as_matrix_view(pi, s.K, pq).t());
  grad_phi.view({s.K, s.blocks.rows * s.blocks.cols})
      .index_copy_(1, position, dots.t().mul(scale).to(grad_phi.scalar_type()));
}

// dΠ_k = s Σ_a Φ[k, block a] G_a: one GEMM, Φ_active G (K x pq), into grad_pi.
template <typename S, typename T>
void prototype_gradient(const SPLoPAShapes& s, const T* g, const at::Tensor& pos_weights, const at::Tensor& position,
                        T scale, T* grad_pi) {
  const int64_t pq = s.p * s.q, count = s.blocks.count();
  const at::Tensor active_phi =
      pos_weights.view({s.K, s.blocks.rows * s.blocks.cols}).index_select(1, position).to(c10::CppTypeToScalarType<T>::value);
  at::Tensor out = as_matrix_view(grad_pi, s.K, pq);
  at::mm_out(out, active_phi, as_matrix_view(g, count, pq));
  out.mul_(scale);
}

// out[o] = Σ_m y[m, o]: each thread sums a share of the rows, then the shares are added.
template <typename S, typename T>
void column_sums(const S* y, int64_t M, int64_t width, S* out, int threads) {
  std::vector<T> partial(static_cast<size_t>(threads) * width, T(0));
#pragma omp parallel num_threads(threads)
  {
    const int nthreads = omp_get_num_threads(), tid = omp_get_thread_num();
    T* mine = partial.data() + tid * width;
    for (int64_t m = M * tid / nthreads; m < M * (tid + 1) / nthreads; ++m) {
      for (int64_t o = 0; o < width; ++o) mine[o] += static_cast<T>(y[m * width + o]);
    }
  }
  for (int64_t o = 0; o < width; ++o) {
    T sum = 0;
    for (int t = 0; t < threads; ++t) sum += partial[t * width + o];
    out[o] = static_cast<S>(sum);
  }
}

at::Tensor splopa_linear_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& rows,
                                 const at::Tensor& cols, const at::Tensor& pos_weights,
                                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& block_mask,
                                 double scale) {
  const SPLoPAShapes s = check_splopa(x, weight, rows, cols, pos_weights, block_mask);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_operand(*bias, "bias", 1, x);
    TORCH_CHECK_VALUE(bias->size(0) == s.out, "bias must have shape (", s.out, ",)");
  }
  at::Tensor y = at::empty({s.M, s.out}, x.options());
  if (s.M == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "splopa_linear_forward", [&] {
    using S = scalar_t;
    using T = acc_t<S>;
    const std::vector<T> pi = prototypes<S, T>(s, rows.data_ptr<S>(), cols.data_ptr<S>());
    const EffectiveBlocks<S, T> effective(kernels_for<T>(), s, weight.data_ptr<S>(), pos_weights.data_ptr<S>(), pi,
                                          T(scale));
    std::vector<T> bias_t;
    if (has_bias) {
      const S* b = bias->data_ptr<S>();
      bias_t.assign(s.out, T(0));
      for (int64_t o = 0; o < s.out; ++o) bias_t[o] = static_cast<T>(b[o]);
    }
    const auto fill = run_filler(effective, s.blocks,
                                 [&](int64_t i, int64_t a) { return i * s.blocks.cols + s.blocks.col[a]; });
    block_sparse_gemm<S, T>(kernels_for<T>(), x.data_ptr<S>(), s.M, s.blocks, s.p, s.q, fill,
                            has_bias ? bias_t.data() : nullptr, y.data_ptr<S>(), gemm_threads());
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> splopa_linear_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& rows,
    const at::Tensor& cols, const at::Tensor& pos_weights, const std::optional<at::Tensor>& block_mask, double scale,
    std::array<bool, 6> output_mask) {
  const SPLoPAShapes s = check_splopa(x, weight, rows, cols, pos_weights, block_mask);
  check_operand(grad_out, "grad_out", 2, x);
  TORCH_CHECK_VALUE(grad_out.size(0) == s.M && grad_out.size(1) == s.out, "grad_out must be (", s.M, ", ", s.out,
                    ")");
  const auto [need_x, need_w, need_rows, need_cols, need_phi, need_bias] = output_mask;
  const int threads = gemm_threads();
  at::Tensor grad_x, grad_w, grad_rows, grad_cols, grad_phi, grad_bias;
  const int64_t count = s.blocks.count(), pq = s.p * s.q;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "splopa_linear_backward", [&] {
    using S = scalar_t;
    using T = acc_t<S>;
    const S* dy = grad_out.data_ptr<S>();
    const S* phi = pos_weights.data_ptr<S>();
    const std::vector<T> pi = prototypes<S, T>(s, rows.data_ptr<S>(), cols.data_ptr<S>());
    if (need_x) {
      // dx_j = Σ_i dy_i E_ij: the forward's engine over the transposed structure, blocks E_ij^T (q x p).
      grad_x = at::empty({s.M, s.in}, x.options());
      const BlockRows by_column = transposed(s.blocks);
      const EffectiveBlocks<S, T> effective(kernels_for<T>(), s, weight.data_ptr<S>(), phi, pi, T(scale));
      const auto effective_block = run_filler(
          effective, by_column, [&](int64_t j, int64_t a) { return by_column.col[a] * s.blocks.cols + j; });
      auto fill = [&](int64_t j, int64_t a, T* dst) {
        thread_local std::vector<T> block;
        block.resize(pq);
        effective_block(j, a, block.data());
        for (int64_t r = 0; r < s.p; ++r) {
          for (int64_t c = 0; c < s.q; ++c) dst[c * s.p + r] = block[r * s.q + c];
        }
      };
      block_sparse_gemm<S, T>(kernels_for<T>(), dy, s.M, by_column, s.q, s.p, fill, nullptr, grad_x.data_ptr<S>(),
                              threads);
    }
    if (need_w || need_rows || need_cols || need_phi) {
      std::vector<T> g(count * pq + 1);
      if (count > 0) block_outer_sums<S, T>(kernels_for<T>(), dy, x.data_ptr<S>(), s.M, s.blocks, s.p, s.q, g.data(),
                                            threads);
      std::vector<int64_t> row_of(count);
      for (int64_t i = 0; i < s.blocks.rows; ++i) {
        for (int64_t a = s.blocks.begin[i]; a < s.blocks.begin[i + 1]; ++a) row_of[a] = i;
      }
      at::Tensor position = at::empty({count}, at::kLong);  // row-major position of each active block
      int64_t* positions = position.data_ptr<int64_t>();
      for (int64_t a = 0; a < count; ++a) positions[a] = row_of[a] * s.blocks.cols + s.blocks.col[a];
      if (need_w) {
        grad_w = at::zeros({s.out, s.in}, x.options());
        S* gw = grad_w.data_ptr<S>();
        for (int64_t a = 0; a < count; ++a) {
          for (int64_t r = 0; r < s.p; ++r) {
            S* dst = gw + (row_of[a] * s.p + r) * s.in + s.blocks.col[a] * s.q;
            for (int64_t c = 0; c < s.q; ++c) dst[c] = static_cast<S>(g[a * pq + r * s.q + c]);
          }
        }
      }
      if (need_phi) {
        grad_phi = at::zeros({s.K, s.blocks.rows, s.blocks.cols}, x.options());
        if (count > 0) phi_gradient<S, T>(s, g.data(), pi.data(), position, T(scale), grad_phi);
      }
      if (need_rows || need_cols) {
        std::vector<T> grad_pi(s.K * pq, T(0));
        if (count > 0) prototype_gradient<S, T>(s, g.data(), pos_weights, position, T(scale), grad_pi.data());
        const S* u = cols.data_ptr<S>();
        const S* v = rows.data_ptr<S>();
        if (need_rows) {  // dV_k (r x q) = U_k^T dΠ_k
          grad_rows = at::empty({s.K, s.rank, s.q}, x.options());
          S* out = grad_rows.data_ptr<S>();
          for (int64_t k = 0; k < s.K; ++k) {
            for (int64_t t = 0; t < s.rank; ++t) {
              for (int64_t b = 0; b < s.q; ++b) {
                T sum = 0;
                for (int64_t a = 0; a < s.p; ++a) sum += static_cast<T>(u[(k * s.p + a) * s.rank + t]) * grad_pi[k * pq + a * s.q + b];
                out[(k * s.rank + t) * s.q + b] = static_cast<S>(sum);
              }
            }
          }
        }
        if (need_cols) {  // dU_k (p x r) = dΠ_k V_k^T
          grad_cols = at::empty({s.K, s.p, s.rank}, x.options());
          S* out = grad_cols.data_ptr<S>();
          for (int64_t k = 0; k < s.K; ++k) {
            for (int64_t a = 0; a < s.p; ++a) {
              for (int64_t t = 0; t < s.rank; ++t) {
                T sum = 0;
                for (int64_t b = 0; b < s.q; ++b) sum += grad_pi[k * pq + a * s.q + b] * static_cast<T>(v[(k * s.rank + t) * s.q + b]);
                out[(k * s.p + a) * s.rank + t] = static_cast<S>(sum);
              }
            }
          }
        }
      }
    }
    if (need_bias) {
      grad_bias = at::empty({s.out}, x.options());
      column_sums<S, T>(dy, s.M, s.out, grad_bias.data_ptr<S>(), threads);
    }
  });
  return {grad_x, grad_w, grad_rows, grad_cols, grad_phi, grad_bias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(spa_kernels_cpu, m) {
  m.def(
      "splopa_linear_forward(Tensor x, Tensor weight, Tensor prototype_rows, Tensor prototype_cols, "
      "Tensor pos_weights, Tensor? bias, Tensor? block_mask, float scale) -> Tensor");
  m.def(
      "splopa_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor prototype_rows, "
      "Tensor prototype_cols, Tensor pos_weights, Tensor? block_mask, float scale, bool[6] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(spa_kernels_cpu, CPU, m) {
  m.impl("splopa_linear_forward", &splopa_linear_forward);
  m.impl("splopa_linear_backward", &splopa_linear_backward);
}

}  // namespace spa_kernels::cpu
