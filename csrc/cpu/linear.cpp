// Masked SPLoRA linear on the CPU: forward and backward over active channels.
//
//   forward   y_O = [x_S | s t] [W_OS | B_O]^T + b_O,       t  = x_S A_S^T
//   backward  dx_S = [dy_O | s u] [W_OS ; A_S],              u  = dy_O B_O
//             dA_S = s u^T x_S,  [dB_O | db_O] = dy_O^T [s t | 1]  (summed from the
//             dy_O blocks the dx GEMM packs, so dy is read once),
//             dW_OS = dy_O^T x_S (only when the weight requires grad)
//
// The adapter never costs a second full-size product: masked_gemm either folds
// s B_O A_S into the packed panels of W_OS (|O| x |S| x r multiplies, once) or
// appends the rank-r product to the GEMM as r extra columns, whichever
// multiplies less; the backward keeps the columns where dA needs u.  Nothing
// of size out x in is ever built.  Inactive outputs are written as zeros by
// the same pass that writes the active ones (ScatterRows).
//
// Compact activations: with compact_input x (and dx) is M x |S|, read and
// written densely while W and A keep their index lists; with compact_output y
// (and dy) is M x |O|, written densely instead of scattered.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "isa.h"
#include "kernels.h"
#include "masked_gemm.h"
#include "packed_column_sums.h"
#include "scatter_rows.h"
#include "small_problems.h"

namespace spa_kernels::cpu {
namespace {

void check_matrix(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D, got ", t.dim(), "-D");
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), name, " has dtype ", t.scalar_type(),
                   " but x has ", like.scalar_type());
}

// Validated view of the arguments shared by forward and backward.  S and O
// index the parameters; x_cols and y_cols are the columns of the activations
// (x, dx and y, dy) that hold them: S and O at full width, identity lists
// (ptr null) over x_width = |S| and y_width = |O| when compact.
struct LinearShapes {
  int64_t M, in, out, rank;
  IndexList S, O;
  IndexList x_cols, y_cols;
  int64_t x_width = 0, y_width = 0;
};

IndexList dense(int64_t count) { return {nullptr, count}; }

LinearShapes check_linear(const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& lora_a, const std::optional<at::Tensor>& lora_b,
                          const std::optional<at::Tensor>& in_idx, const std::optional<at::Tensor>& out_idx,
                          bool compact_input, bool compact_output) {
  check_matrix(x, "x", x);
  check_matrix(weight, "weight", x);
  LinearShapes s{x.size(0), weight.size(1), weight.size(0), 0, {}, {}};
  const bool has_a = lora_a.has_value() && lora_a->defined();
  const bool has_b = lora_b.has_value() && lora_b->defined();
  TORCH_CHECK_VALUE(has_a == has_b, "lora_a and lora_b must be given together");
  if (has_a) {
    check_matrix(*lora_a, "lora_a", x);
    check_matrix(*lora_b, "lora_b", x);
    s.rank = lora_a->size(0);
    TORCH_CHECK_VALUE(s.rank > 0 && lora_a->size(1) == s.in, "lora_a must be (r, in) with r >= 1");
    TORCH_CHECK_VALUE(lora_b->size(0) == s.out && lora_b->size(1) == s.rank, "lora_b must be (out, r)");
  }
  s.S = index_list(in_idx, s.in, "in_idx");
  s.O = index_list(out_idx, s.out, "out_idx");
  s.x_cols = compact_input ? dense(s.S.count) : s.S;
  s.x_width = compact_input ? s.S.count : s.in;
  s.y_cols = compact_output ? dense(s.O.count) : s.O;
  s.y_width = compact_output ? s.O.count : s.out;
  TORCH_CHECK_VALUE(x.size(1) == s.x_width, "x must have ", s.x_width, " columns",
                    compact_input ? " (compact_input: one per active input)" : "", ", got ", x.size(1));
  return s;
}

template <typename S>
Operand<S> rows_of(const S* data, int64_t ld, IndexList cols) {
  // Logical (m, k) = data[m, cols[k]]: an activation matrix read at active columns.
  return {{data, ld, nullptr, cols.ptr, false}, cols.count};
}

template <typename S>
Operand<S> columns_of(const S* data, int64_t ld, IndexList cols, int64_t depth) {
  // Logical (c, m) = data[m, cols[c]]: the transpose, for products summed over rows m.
  return {{data, ld, nullptr, cols.ptr, true}, depth};
}

template <typename S>
void rank_product(const Operand<S>& activations, const GatherMatrix<S>& factor, int64_t M, int64_t rank,
                  acc_t<S> scale, acc_t<S>* out, int threads, int64_t ld_out = 0) {
  // out[:, :rank] (M x rank, row stride ld_out) = scale * activations . factor^T
  using T = acc_t<S>;
  const Operand<S> f{factor, activations.depth};
  masked_gemm<T>(kernels_for<T>(), M, rank, activations, f, StoreDense<T>{out, ld_out ? ld_out : rank, scale},
                 threads);
}

// ------------------------------------------------------------------ small problems (small_problems.h)

// Row m of an activation at its active columns, as T.
template <typename S, typename T>
void gather_row(const S* data, int64_t ld, int64_t m, IndexList cols, T* row) {
  const S* src = data + m * ld;
  for (int64_t k = 0; k < cols.count; ++k) row[k] = static_cast<T>(src[at_index(cols, k)]);
}

// Row m of an activation from its active columns (zero elsewhere).
template <typename S, typename T>
void scatter_row(const T* row, IndexList cols, int64_t width, int64_t m, S* data) {
  S* dst = data + m * width;
  if (cols.ptr) std::fill(dst, dst + width, S(0));
  for (int64_t k = 0; k < cols.count; ++k) dst[at_index(cols, k)] = static_cast<S>(row[k]);
}

// y_O = x_S (W_OS + s B_O A_S)^T + b_O, row by row.
template <typename S>
void small_linear_forward(const LinearShapes& s, const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& lora_a, const std::optional<at::Tensor>& lora_b,
                          const std::optional<at::Tensor>& bias, double scale, at::Tensor& y) {
  using T = small_acc_t<S>;
  const std::vector<T> merged = merged_block<S, T>(weight.data_ptr<S>(), s.in, 1, 0, s.O, s.S,
                                                   data_or_null<S>(lora_a), data_or_null<S>(lora_b), s.rank,
                                                   T(scale), nullptr);
  // Transposed, so that the inner loop runs over contiguous outputs (vectorised).
  std::vector<T> by_input(merged.size());
  for (int64_t o = 0; o < s.O.count; ++o) {
    for (int64_t k = 0; k < s.S.count; ++k) by_input[k * s.O.count + o] = merged[o * s.S.count + k];
  }
  const S* bp = data_or_null<S>(bias);
  std::vector<T> bias_active(s.O.count, T(0));
  for (int64_t o = 0; bp && o < s.O.count; ++o) bias_active[o] = static_cast<T>(bp[at_index(s.O, o)]);
  std::vector<T> in_row(s.S.count), out_row(s.O.count);
  for (int64_t m = 0; m < s.M; ++m) {
    gather_row(x.data_ptr<S>(), s.x_width, m, s.x_cols, in_row.data());
    T* __restrict out = out_row.data();
    std::copy(bias_active.begin(), bias_active.end(), out);
    for (int64_t k = 0; k < s.S.count; ++k) {
      const T xk = in_row[k];
      const T* __restrict w = by_input.data() + k * s.O.count;
      for (int64_t o = 0; o < s.O.count; ++o) out[o] += xk * w[o];
    }
    scatter_row(out_row.data(), s.y_cols, s.y_width, m, y.data_ptr<S>());
  }
}

// dx_S = dy_O (W_OS + s B_O A_S) row by row; G = dy_O^T x_S and db_O = sum dy_O
// summed on the way, and dW, dA, dB from G.  Outputs are allocated here.
template <typename S>
void small_linear_backward(const LinearShapes& s, const at::Tensor& grad_out, const at::Tensor& x,
                           const at::Tensor& weight, const std::optional<at::Tensor>& lora_a,
                           const std::optional<at::Tensor>& lora_b, double scale, bool need_x, bool need_w,
                           bool need_a, bool need_b, bool need_bias, at::Tensor& grad_x, at::Tensor& grad_w,
                           at::Tensor& grad_a, at::Tensor& grad_b, at::Tensor& grad_bias) {
  using T = small_acc_t<S>;
  const S* a = data_or_null<S>(lora_a);
  const S* b = data_or_null<S>(lora_b);
  const bool need_g = need_w || need_a || need_b;
  const std::vector<T> merged = need_x ? merged_block<S, T>(weight.data_ptr<S>(), s.in, 1, 0, s.O, s.S, a, b, s.rank,
                                                            T(scale), nullptr)
                                       : std::vector<T>();
  std::vector<T> g(need_g ? s.O.count * s.S.count : 0), bias_sum(s.O.count);
  std::vector<T> dy_row(s.O.count), x_row(s.S.count), dx_row(s.S.count);
  if (need_x) grad_x = at::empty({s.M, s.x_width}, x.options());
  for (int64_t m = 0; m < s.M; ++m) {
    gather_row(grad_out.data_ptr<S>(), s.y_width, m, s.y_cols, dy_row.data());
    for (int64_t o = 0; o < s.O.count; ++o) bias_sum[o] += dy_row[o];
    if (need_g) {
      gather_row(x.data_ptr<S>(), s.x_width, m, s.x_cols, x_row.data());
      const T* __restrict xr = x_row.data();
      for (int64_t o = 0; o < s.O.count; ++o) {
        T* __restrict g_row = g.data() + o * s.S.count;
        const T d = dy_row[o];
        for (int64_t k = 0; k < s.S.count; ++k) g_row[k] += d * xr[k];
      }
    }
    if (need_x) {
      T* __restrict dx = dx_row.data();
      std::fill(dx, dx + s.S.count, T(0));
      for (int64_t o = 0; o < s.O.count; ++o) {
        const T* __restrict w = merged.data() + o * s.S.count;
        const T d = dy_row[o];
        for (int64_t k = 0; k < s.S.count; ++k) dx[k] += d * w[k];
      }
      scatter_row(dx_row.data(), s.x_cols, s.x_width, m, grad_x.data_ptr<S>());
    }
  }
  if (need_w) {
    grad_w = at::zeros({s.out, s.in}, x.options());
    S* gw = grad_w.data_ptr<S>();
    for (int64_t o = 0; o < s.O.count; ++o) {
      for (int64_t k = 0; k < s.S.count; ++k) gw[at_index(s.O, o) * s.in + at_index(s.S, k)] = static_cast<S>(g[o * s.S.count + k]);
    }
  }
  if (need_a) grad_a = at::zeros({s.rank, s.in}, x.options());
  if (need_b) grad_b = at::zeros({s.out, s.rank}, x.options());
  if (need_a || need_b) {
    adapter_gradients<S, T>(g, s.in, s.O, s.S, a, b, s.rank, T(scale), need_a ? grad_a.data_ptr<S>() : nullptr,
                            need_b ? grad_b.data_ptr<S>() : nullptr, nullptr);
  }
  if (need_bias) {
    grad_bias = at::zeros({s.out}, x.options());
    S* gb = grad_bias.data_ptr<S>();
    for (int64_t o = 0; o < s.O.count; ++o) gb[at_index(s.O, o)] = static_cast<S>(bias_sum[o]);
  }
}

}  // namespace

at::Tensor splora_linear_forward(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& lora_a, const std::optional<at::Tensor>& lora_b,
                                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& in_idx,
                                 const std::optional<at::Tensor>& out_idx, double scale, bool compact_input,
                                 bool compact_output) {
  const LinearShapes s = check_linear(x, weight, lora_a, lora_b, in_idx, out_idx, compact_input, compact_output);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == s.out && bias->is_contiguous(),
                      "bias must be contiguous with shape (", s.out, ",)");
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "bias must have the dtype of x");
  }
  at::Tensor y = at::empty({s.M, s.y_width}, x.options());
  if (s.M == 0) return y;
  if (s.O.count == 0) return y.zero_();
  if (s.M * s.O.count * s.S.count <= small_problem_limit()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "splora_linear_forward", [&] {
      small_linear_forward<scalar_t>(s, x, weight, lora_a, lora_b, bias, scale, y);
    });
    return y;
  }
  const int threads = gemm_threads();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "splora_linear_forward", [&] {
    using S = scalar_t;
    using T = acc_t<S>;
    const Operand<S> a = rows_of(x.data_ptr<S>(), s.x_width, s.x_cols);
    const Operand<S> b{{weight.data_ptr<S>(), s.in, s.O.ptr, s.S.ptr, false}, s.S.count};  // (o, k) = W[O[o], S[k]]
    LowRankTerm<S, T> adapter;
    if (s.rank > 0) {
      adapter.inner = {lora_a->data_ptr<S>(), s.in, nullptr, s.S.ptr, false};  // (j, k) = A[j, S[k]]
      adapter.outer = {lora_b->data_ptr<S>(), s.rank, s.O.ptr, nullptr, false};  // (o, j) = B[O[o], j]
      adapter.rank = s.rank;
      adapter.scale = T(scale);
    }
    std::vector<T> bias_active;
    if (has_bias) {
      const S* bp = bias->data_ptr<S>();
      bias_active.resize(s.O.count);
      for (int64_t o = 0; o < s.O.count; ++o) bias_active[o] = static_cast<T>(bp[s.O.ptr ? s.O.ptr[o] : o]);
    }
    const ActivePositions outputs = active_positions(s.y_cols, s.y_width);
    std::vector<T> scratch;
    auto writer = scatter_into(y.data_ptr<S>(), s.y_width, outputs, s.M, scratch, threads);
    writer.bias = has_bias ? bias_active.data() : nullptr;
    masked_gemm<T>(kernels_for<T>(), s.M, s.O.count, a, b, writer, threads, s.rank > 0 ? &adapter : nullptr);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> splora_linear_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& lora_a, const std::optional<at::Tensor>& lora_b,
    const std::optional<at::Tensor>& in_idx, const std::optional<at::Tensor>& out_idx, double scale,
    std::array<bool, 5> output_mask, bool compact_input, bool compact_output) {
  const LinearShapes s = check_linear(x, weight, lora_a, lora_b, in_idx, out_idx, compact_input, compact_output);
  check_matrix(grad_out, "grad_out", x);
  TORCH_CHECK_VALUE(grad_out.size(0) == s.M && grad_out.size(1) == s.y_width, "grad_out must be (", s.M, ", ",
                    s.y_width, ")");
  const auto [need_x, need_w, need_a_asked, need_b_asked, need_bias] = output_mask;
  const bool need_a = need_a_asked && s.rank > 0, need_b = need_b_asked && s.rank > 0;
  at::Tensor grad_x, grad_w, grad_a, grad_b, grad_bias;
  if (s.M * s.O.count * s.S.count <= small_problem_limit()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "splora_linear_backward", [&] {
      small_linear_backward<scalar_t>(s, grad_out, x, weight, lora_a, lora_b, scale, need_x, need_w, need_a, need_b,
                                      need_bias, grad_x, grad_w, grad_a, grad_b, grad_bias);
    });
    return {grad_x, grad_w, grad_a, grad_b, grad_bias};
  }
  const int threads = gemm_threads();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "splora_linear_backward", [&] {
    using S = scalar_t;
    using T = acc_t<S>;
    const S* dy = grad_out.data_ptr<S>();
    const S* xp = x.data_ptr<S>();
    const S* wp = weight.data_ptr<S>();
    const ActivePositions inputs = active_positions(s.S, s.in);
    std::vector<T> scratch;
    const Operand<S> dy_active = rows_of(dy, s.y_width, s.y_cols);  // (m, o) = dy[m, O[o]]
    const Operand<S> dy_columns = columns_of(dy, s.y_width, s.y_cols, s.M);  // (o, m) = dy[m, O[o]]
    const Operand<S> x_columns = columns_of(xp, s.x_width, s.x_cols, s.M);  // (k, m) = x[m, S[k]]
    const GatherMatrix<S> b_active{s.rank > 0 ? lora_b->data_ptr<S>() : nullptr, s.rank, s.O.ptr, nullptr,
                                   true};  // (j, o) = B[O[o], j]

    // u = s dy_O B_O (M x r): dA needs it; dx computes it on the way.
    AlignedBuffer<T> u(s.M * s.rank + kSlack);
    const bool dx_computes_u = need_x && s.S.count > 0;
    if (need_a && !dx_computes_u) rank_product<S>(dy_active, b_active, s.M, s.rank, T(scale), u.get(), threads);
    // [dB_O | db_O] = dy_O^T [s t | 1] (t = x_S A_S^T): summed from the dy blocks
    // that the dx GEMM packs when there is one, else in a pass of their own.
    if (need_b) grad_b = at::zeros({s.out, s.rank}, x.options());
    if (need_bias) grad_bias = at::zeros({s.out}, x.options());
    const bool adapter_sums = (need_b || need_bias) && s.O.count > 0;
    const bool dx_sums = adapter_sums && dx_computes_u;
    const int64_t rank_b = need_b ? s.rank : 0;
    AlignedBuffer<T> t(dx_sums ? s.M * rank_b + kSlack : 1);
    if (dx_sums && need_b) {
      const GatherMatrix<S> a_active{lora_a->data_ptr<S>(), s.in, nullptr, s.S.ptr, false};  // (j, k) = A[j, S[k]]
      rank_product<S>(rows_of(xp, s.x_width, s.x_cols), a_active, s.M, s.rank, T(1), t.get(), threads);
    }
    PackedColumnSums<T> dy_sums(kernels_for<T>(), t.get(), dx_sums ? rank_b : 0, dx_sums ? s.O.count : 0,
                                dx_sums ? threads : 0);
    const PackedBlockHook<T> sum_dy_blocks = std::ref(dy_sums);
    if (need_x) {
      grad_x = at::empty({s.M, s.x_width}, x.options());
      if (s.S.count == 0) {
        grad_x.zero_();
      } else {
        const Operand<S> b{{wp, s.in, s.O.ptr, s.S.ptr, true}, s.O.count};  // (k, o) = W[O[o], S[k]]
        LowRankTerm<S, T> adapter;
        if (s.rank > 0) {
          adapter.inner = b_active;
          adapter.outer = {lora_a->data_ptr<S>(), s.in, nullptr, s.S.ptr, true};  // (k, j) = A[j, S[k]]
          adapter.rank = s.rank;
          adapter.scale = T(scale);
          adapter.save = need_a ? u.get() : nullptr;
        }
        const ActivePositions x_positions = active_positions(s.x_cols, s.x_width);
        auto writer = scatter_into(grad_x.data_ptr<S>(), s.x_width, x_positions, s.M, scratch, threads);
        masked_gemm<T>(kernels_for<T>(), s.M, s.S.count, dy_active, b, writer, threads,
                       s.rank > 0 ? &adapter : nullptr, dx_sums ? &sum_dy_blocks : nullptr);
      }
    }
    if (dx_sums) {
      S* gb = need_b ? grad_b.data_ptr<S>() : nullptr;
      S* gbias = need_bias ? grad_bias.data_ptr<S>() : nullptr;
      for (int64_t o = 0; o < s.O.count; ++o) {
        const int64_t channel = s.O.ptr ? s.O.ptr[o] : o;
        for (int64_t j = 0; j < rank_b; ++j) gb[channel * s.rank + j] = static_cast<S>(T(scale) * dy_sums.product(o, j));
        if (gbias) gbias[channel] = static_cast<S>(dy_sums.colsum(o));
      }
    }
    if (need_a) {
      grad_a = at::empty({s.rank, s.in}, x.options());
      if (s.S.count == 0) {
        grad_a.zero_();
      } else {
        const Operand<T> a{{u.get(), s.rank, nullptr, nullptr, true}, s.M};  // (j, m) = u[m, j]
        auto writer = scatter_into(grad_a.data_ptr<S>(), s.in, inputs, s.rank, scratch, threads);
        masked_gemm<T>(kernels_for<T>(), s.rank, s.S.count, a, x_columns, writer, threads);
      }
    }
    if (adapter_sums && !dx_sums) {
      // One pass over dy_O^T for both: dB_O = s dy_O^T t and db_O = dy_O^T 1,
      // as the product of dy_O^T with [t | 1] (M x q).
      const int64_t q = rank_b + (need_bias ? 1 : 0);
      AlignedBuffer<T> t_ones(s.M * q + kSlack);
      if (need_b) {
        const GatherMatrix<S> a_active{lora_a->data_ptr<S>(), s.in, nullptr, s.S.ptr, false};  // (j, k) = A[j, S[k]]
        rank_product<S>(rows_of(xp, s.x_width, s.x_cols), a_active, s.M, s.rank, T(1), t_ones.get(), threads, q);
      }
      if (need_bias) {
        for (int64_t m = 0; m < s.M; ++m) t_ones.get()[m * q + rank_b] = T(1);
      }
      const Operand<T> b{{t_ones.get(), q, nullptr, nullptr, true}, s.M};  // (j, m) = [t | 1][m, j]
      S* gb = need_b ? grad_b.data_ptr<S>() : nullptr;
      S* gbias = need_bias ? grad_bias.data_ptr<S>() : nullptr;
      const T adapter_scale = T(scale);
      auto writer = [&](int64_t o, T* c, int64_t n0, int64_t n1, int) {
        const int64_t channel = s.O.ptr ? s.O.ptr[o] : o;
        for (int64_t n = n0; n < n1; ++n) {
          if (n < rank_b) {
            gb[channel * s.rank + n] = static_cast<S>(adapter_scale * c[n - n0]);
          } else {
            gbias[channel] = static_cast<S>(c[n - n0]);
          }
        }
      };
      masked_gemm<T>(kernels_for<T>(), s.O.count, q, dy_columns, b, writer, threads);
    }
    if (need_w) {
      grad_w = at::empty({s.out, s.in}, x.options());
      S* gw = grad_w.data_ptr<S>();
      // Rows outside O are never touched by the GEMM: clear just those.
      int64_t next = 0;
      for (int64_t o = 0; o < s.out; ++o) {
        const bool active = s.S.count > 0 && next < s.O.count && (s.O.ptr ? s.O.ptr[next] : next) == o;
        if (active) {
          ++next;
        } else {
          std::fill(gw + o * s.in, gw + (o + 1) * s.in, S(0));
        }
      }
      if (s.S.count > 0 && s.O.count > 0) {
        auto writer = scatter_into(gw, s.in, inputs, s.O.count, scratch, threads);
        writer.row_idx = s.O.ptr;
        masked_gemm<T>(kernels_for<T>(), s.O.count, s.S.count, dy_columns, x_columns, writer, threads);
      }
    }
  });
  return {grad_x, grad_w, grad_a, grad_b, grad_bias};
}

TORCH_LIBRARY(spa_kernels_cpu, m) {
  m.def(
      "splora_linear_forward(Tensor x, Tensor weight, Tensor? lora_a, Tensor? lora_b, Tensor? bias, "
      "Tensor? in_idx, Tensor? out_idx, float scale, bool compact_input=False, bool compact_output=False) "
      "-> Tensor");
  m.def(
      "splora_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? lora_a, Tensor? lora_b, "
      "Tensor? in_idx, Tensor? out_idx, float scale, bool[5] output_mask, bool compact_input=False, "
      "bool compact_output=False) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(spa_kernels_cpu, CPU, m) {
  m.impl("splora_linear_forward", &splora_linear_forward);
  m.impl("splora_linear_backward", &splora_linear_backward);
}

}  // namespace spa_kernels::cpu
