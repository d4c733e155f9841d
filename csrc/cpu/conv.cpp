// Masked SPLoRA / SPPaRA convolutions (1-D, 2-D, 3-D) on the CPU.
//
// Forward, per output position m and active output channel o:
//   y[m, o] = b_o + sum_{c in S, taps} W[o, c, tap] x[patch(m, tap), c]
//           + s * sum_j B[o, j] t[m, j],      t = x_centre,S A_S^T   (SPLoRA)
//           + sum_{c in S} P[o, c] x[centre(m), c]                   (SPPaRA)
// as an implicit GEMM whose depth runs over (active channel, tap) with the
// centre taps first, so the adapter's rank-r product reads only the first |S|
// depth entries (LowRankTerm::inner_depth) and P is added while packing the
// centre taps.  The input gradient is the same GEMM over input positions with
// strided taps (PatchGeometry::div); the parameter gradients are GEMMs summed
// over output positions.  Only active channels are gathered or multiplied.
//
// Compact activations: with compact_input x (and dx) holds the |S| active
// channels only, read and written without an index while W, A and P keep S;
// with compact_output y (and dy) holds the |O| active channels, written
// densely (no cleared planes).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <type_traits>
#include <vector>

#include "conv_geometry.h"
#include "conv_operands.h"
#include "isa.h"
#include "kernels.h"
#include "masked_gemm.h"
#include "padded_patches.h"
#include "scatter_rows.h"
#include "small_problems.h"

namespace spa_kernels::cpu {
namespace {

// Shapes of one call, spatial dimensions padded to three.
struct ConvShapes {
  int64_t N, C_in, C_out, rank;
  int64_t in[3] = {1, 1, 1}, out[3] = {1, 1, 1}, k[3] = {1, 1, 1};
  int64_t stride[3] = {1, 1, 1}, pad[3] = {0, 0, 0}, dil[3] = {1, 1, 1};
  int64_t taps = 1, centre = 0;
  IndexList S, O;
  // Channels of the activations: x_channels planes in x (and dx), the active
  // ones at x_list; likewise y (and dy).  S and O at full width, identity
  // lists over |S| and |O| when compact.
  int64_t x_channels = 0, y_channels = 0;
  IndexList x_list, y_list;

  int64_t in_plane() const { return in[0] * in[1] * in[2]; }
  int64_t out_plane() const { return out[0] * out[1] * out[2]; }
  // Tap t's offset along dimension d, in input coordinates.
  int64_t tap_offset(int64_t t, int d) const {
    const int64_t coord[3] = {t / (k[1] * k[2]), (t / k[2]) % k[1], t % k[2]};
    return coord[d] * dil[d] - pad[d];
  }
};

void check_tensor(const at::Tensor& t, const char* name, const at::Tensor& x, int64_t dim) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must be ", dim, "-D, got ", t.dim(), "-D");
  TORCH_CHECK_VALUE(t.is_contiguous() && t.device().is_cpu(), name, " must be a contiguous CPU tensor");
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), name, " must have the dtype of x");
}

bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

ConvShapes check_conv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& lora_a,
                      const std::optional<at::Tensor>& lora_b, const std::optional<at::Tensor>& adapter,
                      const std::optional<at::Tensor>& in_idx, const std::optional<at::Tensor>& out_idx,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                      bool compact_input, bool compact_output) {
  const int64_t d = x.dim() - 2;
  TORCH_CHECK_VALUE(d >= 1 && d <= 3, "x must be 3-, 4- or 5-D, got ", x.dim(), "-D");
  check_tensor(x, "x", x, d + 2);
  check_tensor(weight, "weight", x, d + 2);
  TORCH_CHECK_VALUE(static_cast<int64_t>(stride.size()) == d && static_cast<int64_t>(padding.size()) == d &&
                        static_cast<int64_t>(dilation.size()) == d,
                    "stride, padding and dilation must have ", d, " entries");
  ConvShapes s{x.size(0), weight.size(1), weight.size(0), 0};
  for (int64_t i = 0; i < d; ++i) {
    const int64_t j = 3 - d + i;
    s.in[j] = x.size(2 + i);
    s.k[j] = weight.size(2 + i);
    s.stride[j] = stride[i];
    s.pad[j] = padding[i];
    s.dil[j] = dilation[i];
    TORCH_CHECK_VALUE(s.k[j] % 2 == 1, "kernel sizes must be odd, got ", weight.sizes());
    TORCH_CHECK_VALUE(s.stride[j] >= 1 && s.dil[j] >= 1 && s.pad[j] >= 0, "invalid stride/padding/dilation");
    s.out[j] = conv_output_size(s.in[j], s.k[j], s.stride[j], s.pad[j], s.dil[j]);
    TORCH_CHECK_VALUE(s.out[j] >= 1, "input is too small for the kernel");
  }
  s.taps = s.k[0] * s.k[1] * s.k[2];
  s.centre = ((s.k[0] / 2) * s.k[1] + s.k[1] / 2) * s.k[2] + s.k[2] / 2;
  TORCH_CHECK_VALUE(present(lora_a) == present(lora_b), "lora_a and lora_b must be given together");
  if (present(lora_a)) {
    check_tensor(*lora_a, "lora_a", x, 2);
    check_tensor(*lora_b, "lora_b", x, 2);
    s.rank = lora_a->size(0);
    TORCH_CHECK_VALUE(s.rank > 0 && lora_a->size(1) == s.C_in, "lora_a must be (r, C_in) with r >= 1");
    TORCH_CHECK_VALUE(lora_b->size(0) == s.C_out && lora_b->size(1) == s.rank, "lora_b must be (C_out, r)");
  }
  if (present(adapter)) {
    check_tensor(*adapter, "adapter", x, 2);
    TORCH_CHECK_VALUE(adapter->size(0) == s.C_out && adapter->size(1) == s.C_in, "adapter must be (C_out, C_in)");
  }
  s.S = index_list(in_idx, s.C_in, "in_idx");
  s.O = index_list(out_idx, s.C_out, "out_idx");
  s.x_channels = compact_input ? s.S.count : s.C_in;
  s.x_list = compact_input ? IndexList{nullptr, s.S.count} : s.S;
  s.y_channels = compact_output ? s.O.count : s.C_out;
  s.y_list = compact_output ? IndexList{nullptr, s.O.count} : s.O;
  TORCH_CHECK_VALUE(x.size(1) == s.x_channels, "x must have ", s.x_channels, " channels",
                    compact_input ? " (compact_input: one per active input)" : " (groups = 1)", ", got ",
                    x.size(1));
  return s;
}

// Depth entries (list index, tap) over `count` channels, centre taps first.
void centre_first(const ConvShapes& s, int64_t count, std::vector<int64_t>& index, std::vector<int64_t>& tap) {
  for (int64_t c = 0; c < count; ++c) index.push_back(c), tap.push_back(s.centre);
  for (int64_t c = 0; c < count; ++c) {
    for (int64_t t = 0; t < s.taps; ++t) {
      if (t != s.centre) index.push_back(c), tap.push_back(t);
    }
  }
}

// Clears the planes of channels outside `active` in an (N, C, plane) tensor.
template <typename S>
void clear_inactive_planes(S* out, int64_t N, int64_t C, int64_t plane, IndexList active) {
  if (!active.ptr) return;
  std::vector<bool> on(C, false);
  for (int64_t i = 0; i < active.count; ++i) on[active.ptr[i]] = true;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      if (!on[c]) std::fill(out + (n * C + c) * plane, out + (n * C + c + 1) * plane, S(0));
    }
  }
}

// Which positions a patch operand runs over (see PatchGeometry): output
// positions reading x (forward, weight gradient), or input positions reading
// dy (input gradient, which divides by the stride where the forward multiplies).
enum class PatchGrid { output, input };

// Patch operand over `data` (x, or dy for PatchGrid::input): the given depth entries.
template <typename S>
PatchOperand<S> patch_operand(const S* data, const ConvShapes& s, const PatchTaps& taps, PatchGrid grid) {
  const bool over_input = grid == PatchGrid::input;
  PatchOperand<S> op;
  op.data = data;
  op.g.batch = s.N;
  op.g.channels = over_input ? s.y_channels : s.x_channels;
  for (int d = 0; d < 3; ++d) {
    op.g.grid[d] = over_input ? s.in[d] : s.out[d];
    op.g.src[d] = over_input ? s.out[d] : s.in[d];
    (over_input ? op.g.div : op.g.mul)[d] = s.stride[d];
  }
  op.taps = &taps;
  op.depth = taps.size();
  return op;
}

PatchTaps input_taps(const ConvShapes& s, const std::vector<int64_t>& index, const std::vector<int64_t>& tap) {
  PatchTaps taps;
  for (size_t i = 0; i < index.size(); ++i) {
    const int64_t off[3] = {s.tap_offset(tap[i], 0), s.tap_offset(tap[i], 1), s.tap_offset(tap[i], 2)};
    taps.add(at_index(s.x_list, index[i]), off);
  }
  return taps;
}

// ------------------------------------------------------------------ small problems (small_problems.h)

bool is_small(const ConvShapes& s) {
  return s.N * s.out_plane() * s.O.count * s.S.count * s.taps <= small_problem_limit();
}

// Input offset within a plane of the tap t at output position p, or -1 where it
// falls in the padding.
int64_t tap_source(const ConvShapes& s, int64_t p, int64_t t) {
  const int64_t coord[3] = {p / (s.out[1] * s.out[2]), (p / s.out[2]) % s.out[1], p % s.out[2]};
  int64_t offset = 0;
  for (int d = 0; d < 3; ++d) {
    const int64_t i = coord[d] * s.stride[d] + s.tap_offset(t, d);
    if (i < 0 || i >= s.in[d]) return -1;
    offset = offset * s.in[d] + i;
  }
  return offset;
}

// The patch of sample n at output position p: (k, tap) over the active inputs, 0 in the padding.
template <typename S, typename T>
void gather_patch(const ConvShapes& s, const S* x, int64_t n, int64_t p, T* patch) {
  const int64_t plane = s.in_plane();
  for (int64_t t = 0; t < s.taps; ++t) {
    const int64_t src = tap_source(s, p, t);
    for (int64_t k = 0; k < s.S.count; ++k) {
      patch[k * s.taps + t] =
          src < 0 ? T(0) : static_cast<T>(x[(n * s.x_channels + at_index(s.x_list, k)) * plane + src]);
    }
  }
}

template <typename S, typename T>
std::vector<T> merged_conv_block(const ConvShapes& s, const at::Tensor& weight, const std::optional<at::Tensor>& lora_a,
                                 const std::optional<at::Tensor>& lora_b, const std::optional<at::Tensor>& adapter,
                                 double scale) {
  return merged_block<S, T>(weight.data_ptr<S>(), s.C_in, s.taps, s.centre, s.O, s.S, data_or_null<S>(lora_a),
                            data_or_null<S>(lora_b), s.rank, T(scale), data_or_null<S>(adapter));
}

// y_O at each position = the patch of x_S times the merged block, + b_O.
template <typename S>
void small_conv_forward(const ConvShapes& s, const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& lora_a, const std::optional<at::Tensor>& lora_b,
                        const std::optional<at::Tensor>& adapter, const std::optional<at::Tensor>& bias, double scale,
                        at::Tensor& y) {
  using T = small_acc_t<S>;
  const std::vector<T> merged = merged_conv_block<S, T>(s, weight, lora_a, lora_b, adapter, scale);
  const int64_t depth = s.S.count * s.taps, plane = s.out_plane();
  // Transposed, so that the inner loop runs over contiguous outputs (vectorised
  // without reordering a sum).
  std::vector<T> by_depth(merged.size());
  for (int64_t o = 0; o < s.O.count; ++o) {
    for (int64_t e = 0; e < depth; ++e) by_depth[e * s.O.count + o] = merged[o * depth + e];
  }
  const S* bp = data_or_null<S>(bias);
  std::vector<T> bias_active(s.O.count, T(0));
  for (int64_t o = 0; bp && o < s.O.count; ++o) bias_active[o] = static_cast<T>(bp[at_index(s.O, o)]);
  if (s.y_list.ptr) y.zero_();
  S* yp = y.data_ptr<S>();
  std::vector<T> patch(depth), out(s.O.count);
  for (int64_t n = 0; n < s.N; ++n) {
    for (int64_t p = 0; p < plane; ++p) {
      gather_patch(s, x.data_ptr<S>(), n, p, patch.data());
      T* __restrict acc = out.data();
      std::copy(bias_active.begin(), bias_active.end(), acc);
      for (int64_t e = 0; e < depth; ++e) {
        const T v = patch[e];
        const T* __restrict w = by_depth.data() + e * s.O.count;
        for (int64_t o = 0; o < s.O.count; ++o) acc[o] += v * w[o];
      }
      for (int64_t o = 0; o < s.O.count; ++o) {
        yp[(n * s.y_channels + at_index(s.y_list, o)) * plane + p] = static_cast<S>(acc[o]);
      }
    }
  }
}

// Per position: dpatch = dy_O . merged block, spread back onto dx; G = dy_O^T
// patch (every tap: dW; the centre: the adapters') and db_O = sum dy_O summed on the way.
template <typename S>
void small_conv_backward(const ConvShapes& s, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& lora_a, const std::optional<at::Tensor>& lora_b,
                         const std::optional<at::Tensor>& adapter, double scale, std::array<bool, 6> need,
                         std::array<at::Tensor, 6>& grads) {
  using T = small_acc_t<S>;
  const auto [need_x, need_w, need_a, need_b, need_p, need_bias] = need;
  const bool need_g = need_w || need_a || need_b || need_p;
  const int64_t depth = s.S.count * s.taps, plane = s.out_plane(), in_plane = s.in_plane();
  const std::vector<T> merged =
      need_x ? merged_conv_block<S, T>(s, weight, lora_a, lora_b, adapter, scale) : std::vector<T>();
  std::vector<T> g(need_g ? s.O.count * depth : 0), bias_sum(s.O.count), patch(depth), dpatch(depth);
  std::vector<T> dx(need_x ? s.N * s.S.count * in_plane : 0);
  const S* dy = grad_out.data_ptr<S>();
  for (int64_t n = 0; n < s.N; ++n) {
    for (int64_t p = 0; p < plane; ++p) {
      if (need_g) gather_patch(s, x.data_ptr<S>(), n, p, patch.data());
      std::fill(dpatch.begin(), dpatch.end(), T(0));
      for (int64_t o = 0; o < s.O.count; ++o) {
        const T d = static_cast<T>(dy[(n * s.y_channels + at_index(s.y_list, o)) * plane + p]);
        bias_sum[o] += d;
        if (need_g) {
          T* __restrict g_row = g.data() + o * depth;
          for (int64_t e = 0; e < depth; ++e) g_row[e] += d * patch[e];
        }
        if (need_x) {
          const T* __restrict w = merged.data() + o * depth;
          for (int64_t e = 0; e < depth; ++e) dpatch[e] += d * w[e];
        }
      }
      for (int64_t t = 0; need_x && t < s.taps; ++t) {
        const int64_t src = tap_source(s, p, t);
        if (src < 0) continue;
        for (int64_t k = 0; k < s.S.count; ++k) dx[(n * s.S.count + k) * in_plane + src] += dpatch[k * s.taps + t];
      }
    }
  }
  if (need_x) {
    at::Tensor& grad_x = grads[0];
    grad_x = at::zeros(x.sizes(), x.options());
    S* gx = grad_x.data_ptr<S>();
    for (int64_t n = 0; n < s.N; ++n) {
      for (int64_t k = 0; k < s.S.count; ++k) {
        S* dst = gx + (n * s.x_channels + at_index(s.x_list, k)) * in_plane;
        const T* src = dx.data() + (n * s.S.count + k) * in_plane;
        for (int64_t i = 0; i < in_plane; ++i) dst[i] = static_cast<S>(src[i]);
      }
    }
  }
  if (need_w) {
    grads[1] = at::zeros(weight.sizes(), x.options());
    S* gw = grads[1].data_ptr<S>();
    for (int64_t o = 0; o < s.O.count; ++o) {
      for (int64_t k = 0; k < s.S.count; ++k) {
        S* dst = gw + (at_index(s.O, o) * s.C_in + at_index(s.S, k)) * s.taps;
        for (int64_t t = 0; t < s.taps; ++t) dst[t] = static_cast<S>(g[o * depth + k * s.taps + t]);
      }
    }
  }
  if (need_a || need_b || need_p) {
    std::vector<T> centre(s.O.count * s.S.count);
    for (int64_t e = 0; e < s.O.count * s.S.count; ++e) centre[e] = g[e * s.taps + s.centre];
    if (need_a) grads[2] = at::zeros({s.rank, s.C_in}, x.options());
    if (need_b) grads[3] = at::zeros({s.C_out, s.rank}, x.options());
    if (need_p) grads[4] = at::zeros({s.C_out, s.C_in}, x.options());
    adapter_gradients<S, T>(centre, s.C_in, s.O, s.S, data_or_null<S>(lora_a), data_or_null<S>(lora_b), s.rank,
                            T(scale), need_a ? grads[2].data_ptr<S>() : nullptr,
                            need_b ? grads[3].data_ptr<S>() : nullptr, need_p ? grads[4].data_ptr<S>() : nullptr);
  }
  if (need_bias) {
    grads[5] = at::zeros({s.C_out}, x.options());
    S* gb = grads[5].data_ptr<S>();
    for (int64_t o = 0; o < s.O.count; ++o) gb[at_index(s.O, o)] = static_cast<S>(bias_sum[o]);
  }
}

}  // namespace

at::Tensor conv_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& lora_a,
                        const std::optional<at::Tensor>& lora_b, const std::optional<at::Tensor>& adapter,
                        const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& in_idx,
                        const std::optional<at::Tensor>& out_idx, at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, double scale, bool compact_input, bool compact_output) {
  const ConvShapes s = check_conv(x, weight, lora_a, lora_b, adapter, in_idx, out_idx, stride, padding, dilation,
                                  compact_input, compact_output);
  if (present(bias)) {
    check_tensor(*bias, "bias", x, 1);
    TORCH_CHECK_VALUE(bias->size(0) == s.C_out, "bias must have ", s.C_out, " entries");
  }
  std::vector<int64_t> out_shape{s.N, s.y_channels};
  for (int64_t i = 0; i < x.dim() - 2; ++i) out_shape.push_back(s.out[3 - (x.dim() - 2) + i]);
  at::Tensor y = at::empty(out_shape, x.options());
  if (s.N == 0) return y;
  if (s.O.count == 0) return y.zero_();
  if (is_small(s)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "conv_forward", [&] {
      small_conv_forward<scalar_t>(s, x, weight, lora_a, lora_b, adapter, bias, scale, y);
    });
    return y;
  }
  const int threads = gemm_threads();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "conv_forward", [&] {
    using S = scalar_t;
    using T = acc_t<S>;
    std::vector<int64_t> kk_index, kk_tap;
    centre_first(s, s.S.count, kk_index, kk_tap);
    // The patches are read in place from a zero-padded copy of x_S (padded_patches.h).
    PaddedGeometry geometry;
    geometry.batch = s.N;
    for (int d = 0; d < 3; ++d) {
      geometry.grid[d] = s.out[d];
      geometry.src[d] = s.in[d];
      geometry.mul[d] = s.stride[d];
    }
    std::vector<std::array<int64_t, 3>> kk_offset;
    for (const int64_t t : kk_tap) kk_offset.push_back({s.tap_offset(t, 0), s.tap_offset(t, 1), s.tap_offset(t, 2)});
    const PaddedPatches<T> a(x.data_ptr<S>(), geometry, s.x_channels, s.x_list.ptr, s.S.count, kk_index, kk_offset,
                             threads);
    TapWeights<S> b;
    b.w = weight.data_ptr<S>();
    b.in_channels = s.C_in;
    b.taps = s.taps;
    b.centre = s.centre;
    b.out_idx = s.O.ptr;
    b.in_idx = s.S.ptr;
    b.kk_index = kk_index.data();
    b.kk_tap = kk_tap.data();
    b.centre_add = present(adapter) ? adapter->data_ptr<S>() : nullptr;
    b.depth = a.depth;
    LowRankTerm<S, T> low_rank;
    if (s.rank > 0) {
      low_rank.inner = {lora_a->data_ptr<S>(), s.C_in, nullptr, s.S.ptr, false};  // (j, kk<|S|) = A[j, S[kk]]
      low_rank.outer = {lora_b->data_ptr<S>(), s.rank, s.O.ptr, nullptr, false};  // (o, j) = B[O[o], j]
      low_rank.rank = s.rank;
      low_rank.inner_depth = s.S.count;
      low_rank.scale = T(scale);
    }
    std::vector<T> bias_active;
    if (present(bias)) {
      for (int64_t o = 0; o < s.O.count; ++o) bias_active.push_back(static_cast<T>(bias->data_ptr<S>()[at_index(s.O, o)]));
    }
    S* yp = y.data_ptr<S>();
    clear_inactive_planes(yp, s.N, s.y_channels, s.out_plane(), s.y_list);
    const PlaneWriter<S, T> writer{yp, s.y_channels, s.out_plane(), s.y_list.ptr,
                                   bias_active.empty() ? nullptr : bias_active.data()};
    masked_gemm<T>(kernels_for<T>(), s.N * s.out_plane(), s.O.count, a, b, writer, threads,
                   s.rank > 0 ? &low_rank : nullptr);
  });
  return y;
}

namespace {

// An index list as a tensor over its own storage (index_select only reads it).
at::Tensor index_tensor(IndexList list) {
  return at::from_blob(const_cast<int64_t*>(list.ptr), {list.count}, at::TensorOptions().dtype(at::kLong));
}

// The entries of `t` at `list` along `dim` (t itself when the list is all of them).
at::Tensor gather(const at::Tensor& t, int64_t dim, IndexList list) {
  return list.ptr ? t.index_select(dim, index_tensor(list)) : t;
}

// W_OS: the active block of a (C_out, C_in, taps...) weight as a contiguous
// (|O|, |S|, taps...) tensor, in one pass (two index_selects would write the
// |O| x C_in intermediate too).
at::Tensor active_weight_block(const at::Tensor& weight, IndexList O, IndexList S_) {
  std::vector<int64_t> sizes(weight.sizes().begin(), weight.sizes().end());
  sizes[0] = O.count, sizes[1] = S_.count;
  at::Tensor block = at::empty(sizes, weight.options());
  const int64_t in = weight.size(1), taps = weight[0][0].numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "active_weight_block", [&] {
    const scalar_t* src = weight.data_ptr<scalar_t>();
    scalar_t* dst = block.data_ptr<scalar_t>();
    at::parallel_for(0, O.count, 1, [&](int64_t begin, int64_t end) {
      for (int64_t o = begin; o < end; ++o) {
        const scalar_t* row = src + at_index(O, o) * in * taps;
        scalar_t* out = dst + o * S_.count * taps;
        for (int64_t k = 0; k < S_.count; ++k) std::copy_n(row + at_index(S_, k) * taps, taps, out + k * taps);
      }
    });
  });
  return block;
}

// `active` placed at `list` along `dim` of a zero tensor `width` long there.
at::Tensor spread(const at::Tensor& active, int64_t dim, IndexList list, int64_t width) {
  if (!list.ptr) return active.contiguous();
  std::vector<int64_t> sizes = active.sizes().vec();
  sizes[dim] = width;
  return at::zeros(sizes, active.options()).index_copy_(dim, index_tensor(list), active);
}

// x at the centre tap of every output position, (N, |S|, output positions),
// for an x holding exactly the active channels: a strided view of x when every
// centre lies inside x, else undefined (a centre in the padding; the GEMM path
// handles that).
at::Tensor centre_taps_view(const at::Tensor& x, const ConvShapes& s) {
  at::Tensor v = x;
  const int64_t d = x.dim() - 2;
  for (int64_t i = 0; i < d; ++i) {
    const int j = static_cast<int>(3 - d + i);
    const int64_t first = s.tap_offset(s.centre, j), last = first + (s.out[j] - 1) * s.stride[j];
    if (first < 0 || last >= s.in[j]) return {};
    v = v.slice(2 + i, first, last + 1, s.stride[j]);
  }
  return v.reshape({s.N, s.S.count, s.out_plane()});
}

// dx_S of a strided convolution wider than 1x1, by oneDNN's convolution
// backward on W_OS with the adapter merged at the centre tap.  Over the input
// grid, our GEMM would multiply the taps that fall between strides as zeros
// (3/4 of the work at stride 2); oneDNN splits the transposed convolution by
// stride phase instead.  The copy is the active weight block, |O| x |S| x
// taps, built per call (nothing cached across calls).  Everything stays in the
// layout it comes in (contiguous): converting dy, the weight block and dx to
// channels-last and back cost more than oneDNN gained from it on ResNet-50's
// small maps.
at::Tensor strided_input_gradient(const at::Tensor& grad_out, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& lora_a, const std::optional<at::Tensor>& lora_b,
                                  const std::optional<at::Tensor>& adapter, const ConvShapes& s,
                                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                  double scale) {
  at::Tensor w = active_weight_block(weight.contiguous(), s.O, s.S);
  at::Tensor centre = w.view({s.O.count, s.S.count, s.taps}).select(2, s.centre);
  if (s.rank > 0) centre.add_(at::matmul(gather(*lora_b, 0, s.O), gather(*lora_a, 1, s.S)), scale);
  if (present(adapter)) centre.add_(gather(gather(*adapter, 0, s.O), 1, s.S));
  const at::Tensor dy = gather(grad_out, 1, s.y_list).contiguous();
  std::vector<int64_t> x_sizes{s.N, s.S.count};
  for (int64_t i = 2; i < weight.dim(); ++i) x_sizes.push_back(s.in[3 - (weight.dim() - 2) + (i - 2)]);
  // Only its shape is read: the input gradient does not depend on x.
  const at::Tensor x_shape = at::empty(x_sizes, grad_out.options());
  const std::vector<int64_t> no_output_padding(stride.size(), 0);
  return std::get<0>(at::convolution_backward(dy, x_shape, w, std::nullopt, stride, padding, dilation, false,
                                              no_output_padding, 1, {true, false, false}));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& lora_a, const std::optional<at::Tensor>& lora_b,
    const std::optional<at::Tensor>& adapter, const std::optional<at::Tensor>& in_idx,
    const std::optional<at::Tensor>& out_idx, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, double scale, std::array<bool, 6> output_mask, bool compact_input,
    bool compact_output) {
  const ConvShapes s = check_conv(x, weight, lora_a, lora_b, adapter, in_idx, out_idx, stride, padding, dilation,
                                  compact_input, compact_output);
  TORCH_CHECK_VALUE(grad_out.dim() == x.dim() && grad_out.size(0) == s.N && grad_out.size(1) == s.y_channels &&
                        grad_out.numel() == s.N * s.y_channels * s.out_plane() && grad_out.is_contiguous() &&
                        grad_out.scalar_type() == x.scalar_type(),
                    "grad_out must be a contiguous tensor shaped like the output");
  const auto [need_x, need_w, need_a_asked, need_b_asked, need_p_asked, need_bias] = output_mask;
  const bool need_a = need_a_asked && s.rank > 0, need_b = need_b_asked && s.rank > 0;
  const bool need_p = need_p_asked && present(adapter);
  if (is_small(s)) {
    std::array<at::Tensor, 6> grads;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "conv_backward", [&] {
      small_conv_backward<scalar_t>(s, grad_out, x, weight, lora_a, lora_b, adapter, scale,
                                    {need_x, need_w, need_a, need_b, need_p, need_bias}, grads);
    });
    return {grads[0], grads[1], grads[2], grads[3], grads[4], grads[5]};
  }
  const int threads = gemm_threads();
  const int64_t M = s.N * s.out_plane();
  at::Tensor grad_x, grad_w, grad_a, grad_b, grad_p, grad_bias;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "conv_backward", [&] {
    using S = scalar_t;
    using T = acc_t<S>;
    const auto& kernels = kernels_for<T>();
    const S* dy = grad_out.data_ptr<S>();
    const S* xp = x.data_ptr<S>();
    const ActivePositions inputs = active_positions(s.S, s.C_in);
    std::vector<T> scratch;
    // dy as rows of active output channels over all output positions.
    const ChannelRows<S> dy_rows{dy, s.y_channels, s.out_plane(), s.y_list.ptr, M};
    // x at the centre tap of every output position, one depth entry per active input channel.
    std::vector<int64_t> centre_index, centre_tap;
    for (int64_t c = 0; c < s.S.count; ++c) centre_index.push_back(c), centre_tap.push_back(s.centre);
    const PatchTaps centre_taps = input_taps(s, centre_index, centre_tap);
    PatchOperand<S> x_centre_columns = patch_operand(xp, s, centre_taps, PatchGrid::output);  // (c, m)
    x_centre_columns.transposed = true;
    x_centre_columns.depth = M;

    if (need_x) {
      grad_x = at::empty(x.sizes(), x.options());
      S* gx = grad_x.data_ptr<S>();
      clear_inactive_planes(gx, s.N, s.x_channels, s.in_plane(), s.x_list);
      if (s.S.count > 0) {
        // Rows: input positions; depth: (active output channel, tap), centre first.
        std::vector<int64_t> kk_index, kk_tap;
        centre_first(s, s.O.count, kk_index, kk_tap);
        TapWeights<S> b;
        b.w = weight.data_ptr<S>();
        b.in_channels = s.C_in;
        b.taps = s.taps;
        b.centre = s.centre;
        b.out_idx = s.O.ptr;
        b.in_idx = s.S.ptr;
        b.kk_index = kk_index.data();
        b.kk_tap = kk_tap.data();
        b.centre_add = present(adapter) ? adapter->data_ptr<S>() : nullptr;
        b.by_input = true;
        b.depth = static_cast<int64_t>(kk_index.size());
        LowRankTerm<S, T> low_rank;
        if (s.rank > 0) {
          low_rank.inner = {lora_b->data_ptr<S>(), s.rank, s.O.ptr, nullptr, true};  // (j, kk<|O|) = B[O[kk], j]
          low_rank.outer = {lora_a->data_ptr<S>(), s.C_in, nullptr, s.S.ptr, true};  // (c, j) = A[j, S[c]]
          low_rank.rank = s.rank;
          low_rank.inner_depth = s.O.count;
          low_rank.scale = T(scale);
        }
        const PlaneWriter<S, T> writer{gx, s.x_channels, s.in_plane(), s.x_list.ptr, nullptr};
        auto run = [&](const auto& a) {
          masked_gemm<T>(kernels, s.N * s.in_plane(), s.S.count, a, b, writer, threads,
                         s.rank > 0 ? &low_rank : nullptr);
        };
        // Source coordinate of input position i under tap t: i - tap offset,
        // divided by the stride when it divides.
        auto mirrored = [&](int64_t t) -> std::array<int64_t, 3> {
          return {-s.tap_offset(t, 0), -s.tap_offset(t, 1), -s.tap_offset(t, 2)};
        };
        const bool pointwise = s.taps == 1 && s.pad[0] == 0 && s.pad[1] == 0 && s.pad[2] == 0;
        if (pointwise && (s.stride[0] > 1 || s.stride[1] > 1 || s.stride[2] > 1)) {
          // A strided 1x1 convolution: output position g reads input g * stride
          // alone, so dx is dy_O W_OS on the output grid (dy read in place),
          // scattered onto every stride-th input position; the rest is zero.
          // Over the input grid instead, most rows would be zero rows multiplied.
          grad_x.zero_();
          PaddedGeometry geometry;
          geometry.batch = s.N;
          for (int d = 0; d < 3; ++d) geometry.grid[d] = s.out[d], geometry.src[d] = s.out[d];
          const std::vector<std::array<int64_t, 3>> kk_offset(kk_index.size(), {0, 0, 0});
          const PaddedPatches<T> dy_positions(dy, geometry, s.y_channels, s.y_list.ptr, s.O.count, kk_index,
                                              kk_offset, threads);
          StridedPlaneWriter<S, T> strided{gx, s.x_channels, s.x_list.ptr};
          for (int d = 0; d < 3; ++d) {
            strided.grid[d] = s.out[d], strided.fine[d] = s.in[d], strided.step[d] = s.stride[d];
          }
          masked_gemm<T>(kernels, s.N * s.out_plane(), s.S.count, dy_positions, b, strided, threads,
                         s.rank > 0 ? &low_rank : nullptr);
        } else if (s.stride[0] == 1 && s.stride[1] == 1 && s.stride[2] == 1) {
          // Unit stride: a forward convolution of dy_O with the taps mirrored,
          // read in place from a padded copy like the forward reads x.
          PaddedGeometry geometry;
          geometry.batch = s.N;
          for (int d = 0; d < 3; ++d) geometry.grid[d] = s.in[d], geometry.src[d] = s.out[d];
          std::vector<std::array<int64_t, 3>> kk_offset;
          for (const int64_t t : kk_tap) kk_offset.push_back(mirrored(t));
          run(PaddedPatches<T>(dy, geometry, s.y_channels, s.y_list.ptr, s.O.count, kk_index, kk_offset, threads));
        } else if (std::is_same_v<S, T> && s.O.count > 0) {
          const at::Tensor dx = strided_input_gradient(grad_out, weight, lora_a, lora_b, adapter, s, stride, padding,
                                                       dilation, scale);
          if (s.x_list.ptr) {
            grad_x.index_copy_(1, index_tensor(s.x_list), dx);
          } else {
            grad_x.copy_(dx);
          }
        } else {
          PatchTaps taps;
          for (size_t i = 0; i < kk_index.size(); ++i) {
            const auto off = mirrored(kk_tap[i]);
            taps.add(at_index(s.y_list, kk_index[i]), {off[0], off[1], off[2]});
          }
          run(patch_operand(dy, s, taps, PatchGrid::input));
        }
      }
    }
    // The centre-tap adapter's gradients by BLAS on the active channels, when
    // every centre lies inside x (the usual padding): with u = s dy_O B_O and
    // t = x_centre,S A_S^T,  dA_S = u^T x_centre,S,  dB_O = s dy_O^T t,  db_O =
    // the sum of dy_O.  Rank-r GEMMs over all positions, bound by reading x and
    // dy; the GEMM engine below packs every position for them instead.  Only
    // where x and dy hold exactly the active channels (compact, or nothing
    // pruned): at full width with channels pruned, BLAS would need gathered
    // copies of x_S and dy_O, which cost more than the engine's own gather.
    bool adapter_done = false;
    const bool activations_are_active = !s.x_list.ptr && !s.y_list.ptr;
    if ((need_a || need_b || need_bias) && std::is_same_v<S, T> && s.S.count > 0 && s.O.count > 0 &&
        activations_are_active) {
      const at::Tensor x_centre = need_a || need_b ? centre_taps_view(x, s) : at::Tensor();
      if (x_centre.defined() || !(need_a || need_b)) {
        adapter_done = true;
        const at::Tensor dy_active = grad_out.view({s.N, s.O.count, s.out_plane()});
        if (need_bias) grad_bias = spread(dy_active.sum({0, 2}), 0, s.O, s.C_out);
        // bmm with the small factor broadcast over the batch: at::matmul would
        // fold a 2-D @ 3-D product by transposing (copying) the activation.
        auto batched = [&](const at::Tensor& factor) { return factor.unsqueeze(0).expand({s.N, -1, -1}); };
        if (need_a) {
          const at::Tensor u = at::bmm(batched(gather(*lora_b, 0, s.O).t()), dy_active).mul_(scale);  // (N, r, P)
          grad_a = spread(at::bmm(u, x_centre.transpose(1, 2)).sum(0), 1, s.S, s.C_in);
        }
        if (need_b) {
          const at::Tensor t = at::bmm(batched(gather(*lora_a, 1, s.S)), x_centre);  // (N, r, P)
          // As dB^T = t dy^T: the long side of the product is then its output's
          // width, which BLAS handles far better than an 8-wide output.
          grad_b = spread(at::bmm(t, dy_active.transpose(1, 2)).sum(0).mul_(scale).t(), 0, s.O, s.C_out);
        }
      }
    }
    if (need_a && !adapter_done) {
      grad_a = at::empty({s.rank, s.C_in}, x.options());
      if (s.S.count == 0 || s.O.count == 0) {
        grad_a.zero_();
      } else {
        // u = s * dy_O B_O over output positions, then dA_S = u^T x_centre,S.
        AlignedBuffer<T> u(M * s.rank + kSlack);
        PatchTaps identity;
        for (int64_t o = 0; o < s.O.count; ++o) identity.add(at_index(s.y_list, o), {0, 0, 0});
        PatchOperand<S> dy_positions;
        dy_positions.data = dy;
        dy_positions.g.batch = s.N;
        dy_positions.g.channels = s.y_channels;
        for (int d = 0; d < 3; ++d) dy_positions.g.grid[d] = dy_positions.g.src[d] = s.out[d];
        dy_positions.taps = &identity;
        dy_positions.depth = s.O.count;
        const Operand<S> b_active{{lora_b->data_ptr<S>(), s.rank, s.O.ptr, nullptr, true}, s.O.count};
        masked_gemm<T>(kernels, M, s.rank, dy_positions, b_active, StoreDense<T>{u.get(), s.rank, T(scale)}, threads);
        const Operand<T> u_columns{{u.get(), s.rank, nullptr, nullptr, true}, M};  // (j, m) = u[m, j]
        auto writer = scatter_into(grad_a.data_ptr<S>(), s.C_in, inputs, s.rank, scratch, threads);
        masked_gemm<T>(kernels, s.rank, s.S.count, u_columns, x_centre_columns, writer, threads);
      }
    }
    if ((need_b || need_bias) && !adapter_done) {
      // [dB_O | db_O] = dy_O^T [s t | 1] summed over output positions.
      if (need_b) grad_b = at::zeros({s.C_out, s.rank}, x.options());
      if (need_bias) grad_bias = at::zeros({s.C_out}, x.options());
      const int64_t rank_b = need_b ? s.rank : 0, q = rank_b + (need_bias ? 1 : 0);
      if (s.O.count > 0) {
        AlignedBuffer<T> t_ones(M * q + kSlack);
        if (need_b) {
          PatchOperand<S> x_centre = x_centre_columns;
          x_centre.transposed = false;
          x_centre.depth = s.S.count;
          const Operand<S> a_active{{lora_a->data_ptr<S>(), s.C_in, nullptr, s.S.ptr, false}, s.S.count};
          masked_gemm<T>(kernels, M, s.rank, x_centre, a_active, StoreDense<T>{t_ones.get(), q, T(scale)}, threads);
        }
        if (need_bias) {
          for (int64_t m = 0; m < M; ++m) t_ones.get()[m * q + rank_b] = T(1);
        }
        const Operand<T> b{{t_ones.get(), q, nullptr, nullptr, true}, M};
        S* gb = need_b ? grad_b.data_ptr<S>() : nullptr;
        S* gbias = need_bias ? grad_bias.data_ptr<S>() : nullptr;
        auto writer = [&](int64_t o, T* c, int64_t n0, int64_t n1, int) {
          const int64_t channel = at_index(s.O, o);
          for (int64_t n = n0; n < n1; ++n) {
            if (n < rank_b) {
              gb[channel * s.rank + n] = static_cast<S>(c[n - n0]);
            } else {
              gbias[channel] = static_cast<S>(c[n - n0]);
            }
          }
        };
        masked_gemm<T>(kernels, s.O.count, q, dy_rows, b, writer, threads);
      }
    }
    auto gradient_rows = [&](at::Tensor& grad, const ActivePositions& positions, const auto& columns) {
      // grad[O[o], positions] = dy_O^T columns; rows outside O stay zero.
      if (s.O.count == 0 || positions.list.count == 0) return;
      auto writer = scatter_into(grad.data_ptr<S>(), positions.width, positions, s.O.count, scratch, threads);
      writer.row_idx = s.O.ptr;
      masked_gemm<T>(kernels, s.O.count, positions.list.count, dy_rows, columns, writer, threads);
    };
    if (need_p) {
      grad_p = at::zeros({s.C_out, s.C_in}, x.options());
      gradient_rows(grad_p, inputs, x_centre_columns);
    }
    if (need_w) {
      grad_w = at::zeros(weight.sizes(), x.options());
      // Natural (channel, tap) order, so weight columns S[c] * taps + tap increase.
      std::vector<int64_t> kk_index, kk_tap, columns;
      for (int64_t c = 0; c < s.S.count; ++c) {
        for (int64_t t = 0; t < s.taps; ++t) {
          kk_index.push_back(c), kk_tap.push_back(t), columns.push_back(at_index(s.S, c) * s.taps + t);
        }
      }
      const PatchTaps taps = input_taps(s, kk_index, kk_tap);
      PatchOperand<S> patches = patch_operand(xp, s, taps, PatchGrid::output);
      patches.transposed = true;
      patches.depth = M;
      const IndexList positions{columns.data(), static_cast<int64_t>(columns.size())};
      gradient_rows(grad_w, active_positions(positions, s.C_in * s.taps), patches);
    }
  });
  return {grad_x, grad_w, grad_a, grad_b, grad_p, grad_bias};
}

TORCH_LIBRARY_FRAGMENT(spa_kernels_cpu, m) {
  m.def(
      "conv_forward(Tensor x, Tensor weight, Tensor? lora_a, Tensor? lora_b, Tensor? adapter, Tensor? bias, "
      "Tensor? in_idx, Tensor? out_idx, int[] stride, int[] padding, int[] dilation, float scale, "
      "bool compact_input=False, bool compact_output=False) -> Tensor");
  m.def(
      "conv_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? lora_a, Tensor? lora_b, Tensor? adapter, "
      "Tensor? in_idx, Tensor? out_idx, int[] stride, int[] padding, int[] dilation, float scale, "
      "bool[6] output_mask, bool compact_input=False, bool compact_output=False) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(spa_kernels_cpu, CPU, m) {
  m.impl("conv_forward", &conv_forward);
  m.impl("conv_backward", &conv_backward);
}

}  // namespace spa_kernels::cpu
