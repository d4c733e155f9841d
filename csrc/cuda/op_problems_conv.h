// Convolution builders for op_problems.h: implicit GEMMs over (channel × tap).
//
// Positions: an output position p = (n, od, oh, ow) reads input coordinate
// o·stride − padding + tap·dilation; the centre tap alone carries the adapter.
// The input gradient runs the same maps backwards: input position i receives
// from output (i + padding − tap·dilation) / stride where that divides exactly.

#pragma once

namespace spa_cuda {
namespace detail {

struct ConvShape {
  int64_t in_points, out_points, taps;
  int32_t centre[kSpatialDims];
};

inline ConvShape conv_shape(const ConvArgs& a) {
  ConvShape s;
  s.in_points = product(a.input);
  s.out_points = product(a.output);
  s.taps = product(a.kernel);
  for (int d = 0; d < kSpatialDims; ++d) s.centre[d] = (a.kernel[d] / 2) * a.dilation[d];
  return s;
}

// Output positions (n, o) as the rows of an operand that reads x: coordinate o·stride − padding.
inline AxisMap output_positions_reading_input(const ConvArgs& a, const ConvShape& s) {
  AxisMap axis = dense_axis(a.batch, a.in_channels * s.in_points);
  set_inner(axis, a.output);
  for (int d = 0; d < kSpatialDims; ++d) {
    axis.coordinate_scale[d] = a.stride[d];
    axis.coordinate_shift[d] = -a.padding[d];
  }
  return axis;
}

// Output positions as plain offsets into a (N, C_out, *out) tensor (dy, y).
inline AxisMap output_positions(const ConvArgs& a, const ConvShape& s, int64_t channels) {
  AxisMap axis = dense_axis(a.batch, channels * s.out_points);
  set_inner(axis, a.output);
  fold_inner(axis, 1);
  return axis;
}

// Input channels × taps of x: offset in_idx[c]·points, coordinate tap·dilation (centre_only: one tap).
inline AxisMap input_channel_taps(const ConvArgs& a, const ConvShape& s, bool centre_only) {
  AxisMap axis = channel_axis(a.in_idx, a.active_in, a.in_channels, s.in_points);
  if (centre_only) {
    for (int d = 0; d < kSpatialDims; ++d) axis.coordinate_shift[d] = s.centre[d];
  } else {
    set_inner(axis, a.kernel);
    for (int d = 0; d < kSpatialDims; ++d) axis.coordinate_scale[d] = a.dilation[d];
  }
  return axis;
}

// The centre-tap input x_c as an operand: `positions` (output positions) × `channels`.
inline OperandMap centre_input(const ConvArgs& a, const ConvShape& s, bool positions_are_rows) {
  OperandMap op;
  op.data = a.x;
  AxisMap positions = output_positions_reading_input(a, s);
  AxisMap channels = input_channel_taps(a, s, true);
  op.rows = positions_are_rows ? positions : channels;
  op.depth = positions_are_rows ? channels : positions;
  op.rows_contiguous = positions_are_rows;
  set_spatial(op, a.input, 1);
  return op;
}

// dy as (O × positions): the reductions over positions.
inline OperandMap grad_out_by_channel(const ConvArgs& a, const ConvShape& s, const void* grad_out) {
  OperandMap op;
  op.data = grad_out;
  op.rows = channel_axis(a.out_idx, a.active_out, a.out_channels, s.out_points);
  op.depth = output_positions(a, s, a.out_channels);
  return op;
}

// The split intermediate (positions × width) transposed: rows = rank, K = positions.
inline OperandMap intermediate_by_rank(const ConvArgs& a, const ConvShape& s, const void* data, int64_t width) {
  OperandMap op;
  op.data = data;
  op.rows = dense_axis(a.rank, 1);
  op.depth = dense_axis(a.batch * s.out_points, width);
  op.rows_contiguous = true;
  return op;
}

inline GemmProblem conv_rank_product(const ConvArgs& a, const ConvShape& s, void* intermediate, int64_t width) {
  GemmProblem t;  // T' = s·x_c A_Sᵀ, per output position
  t.m = a.batch * s.out_points;
  t.n = a.rank;
  t.k[0] = a.active_in;
  t.a[0] = centre_input(a, s, true);
  t.b[0].data = a.lora_a;
  t.b[0].rows = dense_axis(a.rank, a.in_channels);
  t.b[0].depth = channel_axis(a.in_idx, a.active_in, a.in_channels, 1);
  t.output = matrix_output(intermediate, dense_axis(a.batch * s.out_points, width), dense_axis(a.rank, 1));
  t.output.alpha = a.scale;
  t.output.split_offset = a.split_intermediate ? a.rank : 0;
  return t;
}

}  // namespace detail

inline ProblemList conv_forward_problems(const ConvArgs& a, void* y, void* intermediate) {
  using namespace detail;
  ProblemList list;
  const ConvShape s = conv_shape(a);
  const bool lora = a.lora_a != nullptr;
  const int64_t width = intermediate_width(a.rank, a.split_intermediate);
  if (lora) list.add() = conv_rank_product(a, s, intermediate, width);

  GemmProblem& p = list.add();  // y_O = W_OS ⋆ x_S + (centre) adapter + b_O
  p.m = a.batch * s.out_points;
  p.n = a.active_out;
  p.k[0] = a.active_in * s.taps;
  p.a[0].data = a.x;
  p.a[0].rows = output_positions_reading_input(a, s);
  p.a[0].depth = input_channel_taps(a, s, false);
  p.a[0].rows_contiguous = true;
  set_spatial(p.a[0], a.input, 1);
  p.b[0].data = a.weight;
  p.b[0].rows = channel_axis(a.out_idx, a.active_out, a.out_channels, a.in_channels * s.taps);
  p.b[0].depth = channel_axis(a.in_idx, a.active_in, a.in_channels, s.taps);
  set_inner(p.b[0].depth, a.kernel);
  fold_inner(p.b[0].depth, 1);
  if (lora) {
    p.phases = 2;
    p.k[1] = width;
    p.a[1].data = intermediate;
    p.a[1].rows = dense_axis(p.m, width);
    p.a[1].depth = dense_axis(width, 1);
    p.b[1].data = a.lora_b;
    p.b[1].rows = channel_axis(a.out_idx, a.active_out, a.out_channels, a.rank);
    p.b[1].depth = repeating_axis(width, a.rank, 1);
  } else if (a.adapter != nullptr) {  // SPPaRA: P_OS on the centre-tap input
    p.phases = 2;
    p.k[1] = a.active_in;
    p.a[1] = centre_input(a, s, true);
    p.b[1].data = a.adapter;
    p.b[1].rows = channel_axis(a.out_idx, a.active_out, a.out_channels, a.in_channels);
    p.b[1].depth = channel_axis(a.in_idx, a.active_in, a.in_channels, 1);
  }
  p.output = matrix_output(y, output_positions(a, s, a.out_channels),
                           channel_axis(a.out_idx, a.active_out, a.out_channels, s.out_points));
  p.output.bias = a.bias;
  return list;
}

inline ProblemList conv_backward_problems(const ConvArgs& a, const void* grad_out, const Gradients& g,
                                          void* intermediate_u, void* intermediate_t, const void* one) {
  using namespace detail;
  ProblemList list;
  const ConvShape s = conv_shape(a);
  const bool lora = a.lora_a != nullptr;
  const bool sppara = a.adapter != nullptr;
  const int64_t width = intermediate_width(a.rank, a.split_intermediate);
  const int64_t positions = a.batch * s.out_points;
  const AxisMap active_in = channel_axis(a.in_idx, a.active_in, a.in_channels, 1);

  if (lora && (g.grad_x != nullptr || g.grad_lora_a != nullptr)) {  // U' = s·dy_O B_O per output position
    GemmProblem& u = list.add();
    u.m = positions;
    u.n = a.rank;
    u.k[0] = a.active_out;
    u.a[0].data = grad_out;
    u.a[0].rows = output_positions(a, s, a.out_channels);
    u.a[0].depth = channel_axis(a.out_idx, a.active_out, a.out_channels, s.out_points);
    u.a[0].rows_contiguous = true;
    u.b[0].data = a.lora_b;
    u.b[0].rows = dense_axis(a.rank, 1);
    u.b[0].depth = channel_axis(a.out_idx, a.active_out, a.out_channels, a.rank);
    u.b[0].rows_contiguous = true;
    u.output = matrix_output(intermediate_u, dense_axis(positions, width), dense_axis(a.rank, 1));
    u.output.alpha = a.scale;
    u.output.split_offset = a.split_intermediate ? a.rank : 0;
  }
  if (g.grad_x != nullptr) {  // dx_S = W_OSᵀ ⋆ᵀ dy_O + centre adapter
    GemmProblem& p = list.add();
    p.m = a.batch * s.in_points;
    p.n = a.active_in;
    p.k[0] = a.active_out * s.taps;
    // Rows: input positions i, coordinate i + padding; K: (o, tap), coordinate −tap·dilation.
    AxisMap input_positions = dense_axis(a.batch, a.out_channels * s.out_points);
    set_inner(input_positions, a.input);
    for (int d = 0; d < kSpatialDims; ++d) {
      input_positions.coordinate_scale[d] = 1;
      input_positions.coordinate_shift[d] = a.padding[d];
    }
    p.a[0].data = grad_out;
    p.a[0].rows = input_positions;
    p.a[0].depth = channel_axis(a.out_idx, a.active_out, a.out_channels, s.out_points);
    set_inner(p.a[0].depth, a.kernel);
    for (int d = 0; d < kSpatialDims; ++d) p.a[0].depth.coordinate_scale[d] = -a.dilation[d];
    p.a[0].rows_contiguous = true;
    set_spatial(p.a[0], a.output, 1);
    for (int d = 0; d < kSpatialDims; ++d) p.a[0].divisor[d] = a.stride[d];
    p.b[0].data = a.weight;
    p.b[0].rows = channel_axis(a.in_idx, a.active_in, a.in_channels, s.taps);
    p.b[0].depth = channel_axis(a.out_idx, a.active_out, a.out_channels, a.in_channels * s.taps);
    set_inner(p.b[0].depth, a.kernel);
    fold_inner(p.b[0].depth, 1);
    if (lora || sppara) {
      p.phases = 2;
      // The centre tap's source: the same rows, one tap at −centre.
      OperandMap centre = p.a[0];
      if (lora) {
        p.k[1] = width;
        centre.data = intermediate_u;
        centre.rows.outer_stride = s.out_points * width;
        centre.depth = dense_axis(width, 1);
        set_spatial(centre, a.output, width);
        centre.rows_contiguous = false;
        p.b[1].data = a.lora_a;
        p.b[1].rows = active_in;
        p.b[1].depth = repeating_axis(width, a.rank, a.in_channels);
        p.b[1].rows_contiguous = true;
      } else {
        p.k[1] = a.active_out;
        centre.depth = channel_axis(a.out_idx, a.active_out, a.out_channels, s.out_points);
        p.b[1].data = a.adapter;
        p.b[1].rows = active_in;
        p.b[1].depth = channel_axis(a.out_idx, a.active_out, a.out_channels, a.in_channels);
        p.b[1].rows_contiguous = true;
      }
      for (int d = 0; d < kSpatialDims; ++d) centre.depth.coordinate_shift[d] = -s.centre[d];
      for (int d = 0; d < kSpatialDims; ++d) centre.divisor[d] = a.stride[d];
      p.a[1] = centre;
    }
    AxisMap dx_rows = dense_axis(a.batch, a.in_channels * s.in_points);
    set_inner(dx_rows, a.input);
    fold_inner(dx_rows, 1);
    p.output = matrix_output(g.grad_x, dx_rows, channel_axis(a.in_idx, a.active_in, a.in_channels, s.in_points));
  }
  if (lora && g.grad_lora_a != nullptr) {  // dA_S = U'ᵀ x_c
    GemmProblem& p = list.add();
    p.m = a.rank;
    p.n = a.active_in;
    p.k[0] = positions;
    p.a[0] = intermediate_by_rank(a, s, intermediate_u, width);
    p.b[0] = centre_input(a, s, false);
    if (a.split_intermediate) add_lo_phase(p, true, a.rank, a.element_bytes);
    p.output = matrix_output(g.grad_lora_a, dense_axis(a.rank, a.in_channels), active_in);
  }
  if (lora && g.grad_lora_b != nullptr) {  // T' again, then dB_O = dy_Oᵀ T'
    list.add() = conv_rank_product(a, s, intermediate_t, width);
    GemmProblem& p = list.add();
    p.m = a.active_out;
    p.n = a.rank;
    p.k[0] = positions;
    p.a[0] = grad_out_by_channel(a, s, grad_out);
    p.b[0] = intermediate_by_rank(a, s, intermediate_t, width);
    if (a.split_intermediate) add_lo_phase(p, false, a.rank, a.element_bytes);
    p.output = matrix_output(g.grad_lora_b, channel_axis(a.out_idx, a.active_out, a.out_channels, a.rank),
                             dense_axis(a.rank, 1));
  }
  if (sppara && g.grad_adapter != nullptr) {  // dP_OS = dy_Oᵀ x_c
    GemmProblem& p = list.add();
    p.m = a.active_out;
    p.n = a.active_in;
    p.k[0] = positions;
    p.a[0] = grad_out_by_channel(a, s, grad_out);
    p.b[0] = centre_input(a, s, false);
    p.output = matrix_output(g.grad_adapter, channel_axis(a.out_idx, a.active_out, a.out_channels, a.in_channels),
                             active_in);
  }
  if (g.grad_bias != nullptr) {  // db_O = dy_Oᵀ 1
    GemmProblem& p = list.add();
    p.m = a.active_out;
    p.n = 1;
    p.k[0] = positions;
    p.a[0] = grad_out_by_channel(a, s, grad_out);
    p.b[0].data = one;
    p.b[0].rows = dense_axis(1, 0);
    p.b[0].depth = dense_axis(positions, 0);
    p.output = matrix_output(g.grad_bias, channel_axis(a.out_idx, a.active_out, a.out_channels, 1),
                             dense_axis(1, 0));
  }
  if (g.grad_weight != nullptr) {  // dW_OS = dy_Oᵀ ⋆ x_S over every tap
    GemmProblem& p = list.add();
    p.m = a.active_out;
    p.n = a.active_in * s.taps;
    p.k[0] = positions;
    p.a[0] = grad_out_by_channel(a, s, grad_out);
    p.b[0].data = a.x;
    p.b[0].rows = input_channel_taps(a, s, false);
    p.b[0].depth = output_positions_reading_input(a, s);
    set_spatial(p.b[0], a.input, 1);
    AxisMap cols = channel_axis(a.in_idx, a.active_in, a.in_channels, s.taps);
    set_inner(cols, a.kernel);
    fold_inner(cols, 1);
    p.output = matrix_output(g.grad_weight,
                             channel_axis(a.out_idx, a.active_out, a.out_channels, a.in_channels * s.taps), cols);
  }
  return list;
}

}  // namespace spa_cuda
