// Definitions for op_problems.h: header-only, so that the nvcc build and the
// host tests compile the very same builders.

#pragma once

#include <climits>
#include <string>

namespace spa_cuda {
namespace detail {

inline AxisMap dense_axis(int64_t count, int64_t stride) {
  AxisMap axis;
  axis.count = count;
  axis.full_count = count;
  axis.outer_stride = stride;
  return axis;
}

// Outer part through `index` (null: every one of `full` values).
inline AxisMap channel_axis(const int32_t* index, int64_t active, int64_t full, int64_t stride) {
  AxisMap axis;
  axis.index = index;
  axis.index_count = index != nullptr ? active : full;
  axis.count = axis.index_count;
  axis.full_count = full;
  axis.outer_stride = stride;
  return axis;
}

inline void set_inner(AxisMap& axis, const int32_t box[kSpatialDims]) {
  for (int d = 0; d < kSpatialDims; ++d) axis.inner[d] = box[d];
  axis.count = axis.count * inner_points(axis);
}

// Inner strides of a dense row-major box (the last dimension contiguous), times `unit`.
inline void fold_inner(AxisMap& axis, int64_t unit) {
  axis.inner_stride[2] = unit;
  axis.inner_stride[1] = unit * axis.inner[2];
  axis.inner_stride[0] = unit * axis.inner[2] * axis.inner[1];
}

// A K axis of length `width` whose offset is (k mod period)·stride: the split
// [hi | lo] intermediate meets the same adapter factor twice.
inline AxisMap repeating_axis(int64_t width, int64_t period, int64_t stride) {
  AxisMap axis = dense_axis(width / period, 0);
  const int32_t box[kSpatialDims] = {1, 1, int32_t(period)};
  set_inner(axis, box);
  axis.inner_stride[2] = stride;
  return axis;
}

inline const void* advance(const void* base, int64_t elements, int element_bytes) {
  return static_cast<const char*>(base) + elements * element_bytes;
}

inline int64_t product(const int32_t v[kSpatialDims]) { return int64_t(v[0]) * v[1] * v[2]; }

inline void set_spatial(OperandMap& operand, const int32_t extent[kSpatialDims], int64_t unit) {
  operand.spatial = true;
  for (int d = 0; d < kSpatialDims; ++d) operand.extent[d] = extent[d];
  operand.spatial_stride[2] = unit;
  operand.spatial_stride[1] = unit * extent[2];
  operand.spatial_stride[0] = unit * extent[2] * extent[1];
}

// An output tensor seen as rows × cols through two axis maps.
inline OutputMap matrix_output(void* data, AxisMap rows, AxisMap cols) {
  OutputMap out;
  out.data = data;
  out.rows = rows;
  out.cols = cols;
  return out;
}

// Phase 2 of a reduction whose operand is a split intermediate: same maps, lo half.
inline void add_lo_phase(GemmProblem& p, bool a_is_intermediate, int64_t rank, int element_bytes) {
  p.phases = 2;
  p.k[1] = p.k[0];
  p.a[1] = p.a[0];
  p.b[1] = p.b[0];
  OperandMap& lo = a_is_intermediate ? p.a[1] : p.b[1];
  lo.data = advance(lo.data, rank, element_bytes);
}

inline std::string check_common(int64_t in, int64_t out, int64_t rank, int64_t active_in, int64_t active_out,
                                const int32_t* in_idx, const int32_t* out_idx, bool has_lora,
                                int element_bytes) {
  if (element_bytes != 2 && element_bytes != 4) return "element_bytes must be 2 or 4";
  if (in < 0 || out < 0) return "channel counts must be non-negative";
  if (in > INT32_MAX || out > INT32_MAX) return "channel counts must fit in 32 bits";
  if (active_in < 0 || active_in > in) return "in_idx has more entries than input channels";
  if (active_out < 0 || active_out > out) return "out_idx has more entries than output channels";
  if (in_idx == nullptr && active_in != in) return "without in_idx every input channel is active";
  if (out_idx == nullptr && active_out != out) return "without out_idx every output channel is active";
  if (has_lora && rank <= 0) return "rank must be positive when lora_a and lora_b are given";
  if (rank > (1 << 20)) return "rank is too large";
  return "";
}

}  // namespace detail

// ------------------------------------------------------------------ checks

inline std::string check_linear_args(const LinearArgs& a) {
  if (a.rows < 0) return "rows must be non-negative";
  if ((a.lora_a == nullptr) != (a.lora_b == nullptr)) return "lora_a and lora_b must be given together";
  return detail::check_common(a.in_features, a.out_features, a.rank, a.active_in, a.active_out, a.in_idx,
                              a.out_idx, a.lora_a != nullptr, a.element_bytes);
}

inline std::string check_conv_args(const ConvArgs& a) {
  if (a.batch < 0) return "batch must be non-negative";
  if ((a.lora_a == nullptr) != (a.lora_b == nullptr)) return "lora_a and lora_b must be given together";
  if (a.lora_a != nullptr && a.adapter != nullptr) return "SPLoRA (lora_a, lora_b) and SPPaRA (adapter) exclude each other";
  for (int d = 0; d < kSpatialDims; ++d) {
    if (a.kernel[d] < 1 || a.kernel[d] % 2 == 0) return "kernel sizes must be odd";
    if (a.stride[d] < 1 || a.dilation[d] < 1) return "stride and dilation must be positive";
    if (a.padding[d] < 0) return "padding must be non-negative";
    if (a.input[d] < 1 || a.output[d] < 1) return "spatial sizes must be positive";
    const int64_t reach = int64_t(a.input[d]) + 2 * a.padding[d] - int64_t(a.dilation[d]) * (a.kernel[d] - 1) - 1;
    if (reach < 0 || reach / a.stride[d] + 1 != a.output[d]) return "output size does not match the geometry";
    if (int64_t(a.dilation[d]) * a.kernel[d] + a.input[d] + a.padding[d] > (1 << 28))
      return "spatial geometry too large";
  }
  if (detail::product(a.kernel) > (1 << 20)) return "kernel has too many taps";
  return detail::check_common(a.in_channels, a.out_channels, a.rank, a.active_in, a.active_out, a.in_idx,
                              a.out_idx, a.lora_a != nullptr, a.element_bytes);
}

// ------------------------------------------------------------------ linear

inline ProblemList linear_forward_problems(const LinearArgs& a, void* y, void* intermediate) {
  using namespace detail;
  ProblemList list;
  const bool lora = a.lora_a != nullptr;
  const int64_t width = intermediate_width(a.rank, a.split_intermediate);
  // x and W are row-major with channels contiguous: both are gathered along K
  // (see gather_gemm.cuh for why the gather happens while staging tiles).
  const AxisMap active_in = channel_axis(a.in_idx, a.active_in, a.in_features, 1);
  OperandMap x;
  x.data = a.x;
  x.rows = dense_axis(a.rows, a.in_features);
  x.depth = active_in;

  if (lora) {  // T' = s·x_S A_Sᵀ
    GemmProblem& t = list.add();
    t.m = a.rows;
    t.n = a.rank;
    t.k[0] = a.active_in;
    t.a[0] = x;
    t.b[0].data = a.lora_a;
    t.b[0].rows = dense_axis(a.rank, a.in_features);
    t.b[0].depth = active_in;
    t.output = matrix_output(intermediate, dense_axis(a.rows, width), dense_axis(a.rank, 1));
    t.output.alpha = a.scale;
    t.output.split_offset = a.split_intermediate ? a.rank : 0;
  }
  GemmProblem& p = list.add();  // y_O = x_S W_OSᵀ + T' B_Oᵀ + b_O
  p.m = a.rows;
  p.n = a.active_out;
  p.k[0] = a.active_in;
  p.a[0] = x;
  p.b[0].data = a.weight;
  p.b[0].rows = channel_axis(a.out_idx, a.active_out, a.out_features, a.in_features);
  p.b[0].depth = active_in;
  if (lora) {
    p.phases = 2;
    p.k[1] = width;
    p.a[1].data = intermediate;
    p.a[1].rows = dense_axis(a.rows, width);
    p.a[1].depth = dense_axis(width, 1);
    p.b[1].data = a.lora_b;
    p.b[1].rows = channel_axis(a.out_idx, a.active_out, a.out_features, a.rank);
    p.b[1].depth = repeating_axis(width, a.rank, 1);
  }
  p.output = matrix_output(y, dense_axis(a.rows, a.out_features), channel_axis(a.out_idx, a.active_out, a.out_features, 1));
  p.output.bias = a.bias;
  return list;
}

inline ProblemList linear_backward_problems(const LinearArgs& a, const void* grad_out, const Gradients& g,
                                            void* intermediate_u, void* intermediate_t, const void* one) {
  using namespace detail;
  ProblemList list;
  const bool lora = a.lora_a != nullptr;
  const int64_t width = intermediate_width(a.rank, a.split_intermediate);
  const int64_t lo_shift = a.split_intermediate ? a.rank : 0;
  const AxisMap active_in = channel_axis(a.in_idx, a.active_in, a.in_features, 1);
  const AxisMap active_out = channel_axis(a.out_idx, a.active_out, a.out_features, 1);
  // dy_O as A of the dx GEMM (rows × O) and transposed (O × rows) for the reductions.
  OperandMap dy;
  dy.data = grad_out;
  dy.rows = dense_axis(a.rows, a.out_features);
  dy.depth = active_out;
  OperandMap dy_t;
  dy_t.data = grad_out;
  dy_t.rows = active_out;
  dy_t.depth = dense_axis(a.rows, a.out_features);
  dy_t.rows_contiguous = true;
  OperandMap x_t;  // x_Sᵀ as B of the reductions: rows = S, K = rows of x
  x_t.data = a.x;
  x_t.rows = active_in;
  x_t.depth = dense_axis(a.rows, a.in_features);
  x_t.rows_contiguous = true;

  const bool need_u = lora && (g.grad_x != nullptr || g.grad_lora_a != nullptr);
  if (need_u) {  // U' = s·dy_O B_O
    GemmProblem& u = list.add();
    u.m = a.rows;
    u.n = a.rank;
    u.k[0] = a.active_out;
    u.a[0] = dy;
    u.b[0].data = a.lora_b;
    u.b[0].rows = dense_axis(a.rank, 1);
    u.b[0].depth = channel_axis(a.out_idx, a.active_out, a.out_features, a.rank);
    u.b[0].rows_contiguous = true;
    u.output = matrix_output(intermediate_u, dense_axis(a.rows, width), dense_axis(a.rank, 1));
    u.output.alpha = a.scale;
    u.output.split_offset = lo_shift;
  }
  if (g.grad_x != nullptr) {  // dx_S = dy_O W_OS + U' A_S
    GemmProblem& p = list.add();
    p.m = a.rows;
    p.n = a.active_in;
    p.k[0] = a.active_out;
    p.a[0] = dy;
    p.b[0].data = a.weight;
    p.b[0].rows = active_in;
    p.b[0].depth = channel_axis(a.out_idx, a.active_out, a.out_features, a.in_features);
    p.b[0].rows_contiguous = true;
    if (lora) {
      p.phases = 2;
      p.k[1] = width;
      p.a[1].data = intermediate_u;
      p.a[1].rows = dense_axis(a.rows, width);
      p.a[1].depth = dense_axis(width, 1);
      p.b[1].data = a.lora_a;
      p.b[1].rows = active_in;
      p.b[1].depth = repeating_axis(width, a.rank, a.in_features);
      p.b[1].rows_contiguous = true;
    }
    p.output = matrix_output(g.grad_x, dense_axis(a.rows, a.in_features), active_in);
  }
  if (lora && g.grad_lora_a != nullptr) {  // dA_S = U'ᵀ x_S
    GemmProblem& p = list.add();
    p.m = a.rank;
    p.n = a.active_in;
    p.k[0] = a.rows;
    p.a[0].data = intermediate_u;
    p.a[0].rows = dense_axis(a.rank, 1);
    p.a[0].depth = dense_axis(a.rows, width);
    p.a[0].rows_contiguous = true;
    p.b[0] = x_t;
    if (a.split_intermediate) add_lo_phase(p, true, a.rank, a.element_bytes);
    p.output = matrix_output(g.grad_lora_a, dense_axis(a.rank, a.in_features), active_in);
  }
  if (lora && g.grad_lora_b != nullptr) {  // T' again, then dB_O = dy_Oᵀ T'
    GemmProblem& t = list.add();
    t.m = a.rows;
    t.n = a.rank;
    t.k[0] = a.active_in;
    t.a[0].data = a.x;
    t.a[0].rows = dense_axis(a.rows, a.in_features);
    t.a[0].depth = active_in;
    t.b[0].data = a.lora_a;
    t.b[0].rows = dense_axis(a.rank, a.in_features);
    t.b[0].depth = active_in;
    t.output = matrix_output(intermediate_t, dense_axis(a.rows, width), dense_axis(a.rank, 1));
    t.output.alpha = a.scale;
    t.output.split_offset = lo_shift;

    GemmProblem& p = list.add();
    p.m = a.active_out;
    p.n = a.rank;
    p.k[0] = a.rows;
    p.a[0] = dy_t;
    p.b[0].data = intermediate_t;
    p.b[0].rows = dense_axis(a.rank, 1);
    p.b[0].depth = dense_axis(a.rows, width);
    p.b[0].rows_contiguous = true;
    if (a.split_intermediate) add_lo_phase(p, false, a.rank, a.element_bytes);
    p.output = matrix_output(g.grad_lora_b, channel_axis(a.out_idx, a.active_out, a.out_features, a.rank),
                             dense_axis(a.rank, 1));
  }
  if (g.grad_bias != nullptr) {  // db_O = dy_Oᵀ 1
    GemmProblem& p = list.add();
    p.m = a.active_out;
    p.n = 1;
    p.k[0] = a.rows;
    p.a[0] = dy_t;
    p.b[0].data = one;
    p.b[0].rows = dense_axis(1, 0);
    p.b[0].depth = dense_axis(a.rows, 0);
    p.output = matrix_output(g.grad_bias, active_out, dense_axis(1, 0));
  }
  if (g.grad_weight != nullptr) {  // dW_OS = dy_Oᵀ x_S (only when W is trained)
    GemmProblem& p = list.add();
    p.m = a.active_out;
    p.n = a.active_in;
    p.k[0] = a.rows;
    p.a[0] = dy_t;
    p.b[0] = x_t;
    p.output = matrix_output(g.grad_weight, channel_axis(a.out_idx, a.active_out, a.out_features, a.in_features),
                             active_in);
  }
  return list;
}

}  // namespace spa_cuda

#include "op_problems_conv.h"
