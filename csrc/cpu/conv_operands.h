// GEMM operands and writers for convolutions as implicit GEMMs.
//
// A convolution over active channels is a GEMM whose depth runs over
// (active channel, kernel tap) pairs.  The operands here gather straight from
// the NC(D)HW tensors while masked_gemm packs them, so no im2col buffer, no
// zero-filled weight and no masked copy of the input is ever built.  Spatial
// tensors are handled as 3-D (1-D and 2-D have leading extents of 1).
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include <c10/util/Exception.h>

#include "masked_gemm.h"

namespace spa_kernels::cpu {

// Positions of a grid (batch x g0 x g1 x g2) mapped onto a source tensor
// (batch x channels x s0 x s1 x s2): along each dimension the source
// coordinate of grid coordinate g and depth entry kk is
//     (g * mul + off[kk]) / div,  valid when divisible and inside the source.
// Forward: grid = output, mul = stride, div = 1, off = tap*dilation - padding.
// Input gradient: grid = input, mul = 1, div = stride, off = padding - tap*dilation.
struct PatchGeometry {
  int64_t batch = 0;
  int64_t grid[3] = {1, 1, 1};
  int64_t channels = 0;
  int64_t src[3] = {1, 1, 1};
  int64_t mul[3] = {1, 1, 1};
  int64_t div[3] = {1, 1, 1};

  int64_t grid_plane() const { return grid[0] * grid[1] * grid[2]; }
  int64_t src_plane() const { return src[0] * src[1] * src[2]; }
};

// Per depth entry: the source channel and which of the distinct tap offsets it uses.
// Depth entries share few taps (k^d of them), so what depends on the tap alone
// (where a position reads, and whether it reads padding) is worked out once per
// tap rather than once per depth entry.
struct PatchTaps {
  std::vector<int64_t> channel;
  std::vector<int32_t> tap;
  std::vector<std::array<int64_t, 3>> offsets;  // distinct tap offsets

  int64_t size() const { return static_cast<int64_t>(channel.size()); }
  int64_t tap_count() const { return static_cast<int64_t>(offsets.size()); }
  void add(int64_t c, const int64_t (&o)[3]) {
    const std::array<int64_t, 3> off{o[0], o[1], o[2]};
    const auto found = std::find(offsets.begin(), offsets.end(), off);
    tap.push_back(static_cast<int32_t>(found - offsets.begin()));
    if (found == offsets.end()) offsets.push_back(off);
    channel.push_back(c);
  }
};

// Source coordinate along one dimension, or -1 outside / between strides.
inline int64_t source_coordinate(int64_t g, int64_t mul, int64_t off, int64_t div, int64_t size) {
  const int64_t c = g * mul + off;
  if (div != 1 && c % div != 0) return -1;
  const int64_t s = div == 1 ? c : c / div;
  return (s >= 0 && s < size) ? s : -1;
}

// Where one (position, tap) pair reads: channel c is at ptr[c * stride].  A pair
// that falls on padding (or between strides) points at a zero with stride 0, so
// packing reads every element the same way, without a branch.
template <typename S>
struct PatchSource {
  const S* ptr;
  int64_t stride;
};

// The implicit im2col matrix: logical (position m, kk), or (kk, m) when
// `transposed` (then the GEMM's depth runs over positions).
template <typename S>
struct PatchOperand {
  const S* data = nullptr;
  PatchGeometry g;
  const PatchTaps* taps = nullptr;
  int64_t depth = 0;
  bool transposed = false;

  // Grid coordinates of position m.
  void locate(int64_t m, int64_t& n, int64_t (&p)[3]) const {
    p[2] = m % g.grid[2];
    m /= g.grid[2];
    p[1] = m % g.grid[1];
    m /= g.grid[1];
    p[0] = m % g.grid[0];
    n = m / g.grid[0];
  }

  // table[t * count + r]: the source of position m0 + r under tap t, for the
  // taps marked in `needed` (the others are left unset).
  void build_sources(int64_t m0, int64_t count, const std::vector<char>& needed,
                     std::vector<PatchSource<S>>& table) const {
    static const S zero = S(0);
    const int64_t tap_count = taps->tap_count(), src_plane = g.src_plane();
    table.resize(static_cast<size_t>(tap_count * count));
    const bool undivided = g.div[0] == 1 && g.div[1] == 1 && g.div[2] == 1;
    int64_t n, p[3];
    locate(m0, n, p);
    for (int64_t r = 0; r < count; ++r) {
      const S* image = data + n * g.channels * src_plane;
      const int64_t base[3] = {p[0] * g.mul[0], p[1] * g.mul[1], p[2] * g.mul[2]};
      for (int64_t t = 0; t < tap_count; ++t) {
        if (!needed[t]) continue;
        const auto& off = taps->offsets[t];
        int64_t s0, s1, s2;
        if (undivided) {  // the common case, without source_coordinate's divisions
          s0 = base[0] + off[0], s1 = base[1] + off[1], s2 = base[2] + off[2];
          const bool inside = static_cast<uint64_t>(s0) < static_cast<uint64_t>(g.src[0]) &&
                              static_cast<uint64_t>(s1) < static_cast<uint64_t>(g.src[1]) &&
                              static_cast<uint64_t>(s2) < static_cast<uint64_t>(g.src[2]);
          if (!inside) s0 = -1;
        } else {
          s0 = source_coordinate(p[0], g.mul[0], off[0], g.div[0], g.src[0]);
          s1 = source_coordinate(p[1], g.mul[1], off[1], g.div[1], g.src[1]);
          s2 = source_coordinate(p[2], g.mul[2], off[2], g.div[2], g.src[2]);
          if (s1 < 0 || s2 < 0) s0 = -1;
        }
        table[t * count + r] = s0 < 0 ? PatchSource<S>{&zero, 0}
                                      : PatchSource<S>{image + (s0 * g.src[1] + s1) * g.src[2] + s2, src_plane};
      }
      if (++p[2] == g.grid[2]) {
        p[2] = 0;
        if (++p[1] == g.grid[1]) {
          p[1] = 0;
          if (++p[0] == g.grid[0]) p[0] = 0, ++n;
        }
      }
    }
  }

  template <typename T>
  void pack(int64_t i0, int64_t ni, int64_t k0, int64_t kc, int lanes, T* dst) const {
    // Per thread: pack runs inside the GEMM's parallel region.
    thread_local std::vector<PatchSource<S>> table;
    thread_local std::vector<char> needed;
    const int64_t panel_stride = kc * lanes;
    needed.assign(static_cast<size_t>(taps->tap_count()), 0);
    if (transposed) {
      // Lanes are depth entries kk, the packed depth runs over positions.
      for (int64_t i = 0; i < ni; ++i) needed[taps->tap[i0 + i]] = 1;
      build_sources(k0, kc, needed, table);
      for (int64_t i = 0; i < ni; ++i) {
        const PatchSource<S>* src = table.data() + taps->tap[i0 + i] * kc;
        const int64_t channel = taps->channel[i0 + i];
        T* out = dst + (i / lanes) * panel_stride + i % lanes;
        for (int64_t j = 0; j < kc; ++j) out[j * lanes] = static_cast<T>(src[j].ptr[channel * src[j].stride]);
      }
      const int64_t tail = ni % lanes;
      if (tail != 0) {
        T* last = dst + (ni / lanes) * panel_stride;
        for (int64_t j = 0; j < kc; ++j) std::fill(last + j * lanes + tail, last + (j + 1) * lanes, T(0));
      }
      return;
    }
    // Lanes are positions: one source table for the block's rows, then each
    // depth entry copies `lanes` elements through it.
    for (int64_t kk = k0; kk < k0 + kc; ++kk) needed[taps->tap[kk]] = 1;
    build_sources(i0, ni, needed, table);
    const bool packed = with_lanes(lanes, [&](auto l) { pack_positions<l.value>(i0, ni, k0, kc, table, dst); });
    TORCH_CHECK(packed, "PatchOperand: unsupported lane count ", lanes);
  }

 private:
  // How a panel of positions reads one tap: through the general table (some
  // lanes on padding), from valid sources, or from one contiguous run.
  enum class PanelRead : char { general, valid, contiguous };

  template <int L, typename T>
  void pack_positions(int64_t i0, int64_t ni, int64_t k0, int64_t kc, const std::vector<PatchSource<S>>& table,
                      T* dst) const {
    (void)i0;
    const int64_t tap_count = taps->tap_count(), src_plane = g.src_plane();
    const int64_t panels = (ni + L - 1) / L;
    thread_local std::vector<PanelRead> reads;
    reads.assign(static_cast<size_t>(tap_count * panels), PanelRead::general);
    for (int64_t t = 0; t < tap_count; ++t) {
      for (int64_t p = 0; p < panels; ++p) {
        const int64_t rows = std::min<int64_t>(L, ni - p * L);
        const PatchSource<S>* src = table.data() + t * ni + p * L;
        if (src[0].stride == 0) continue;  // unset (tap not needed) or padding
        bool valid = true, contiguous = rows == L;
        for (int64_t r = 1; r < rows; ++r) {
          valid = valid && src[r].stride != 0;
          contiguous = contiguous && src[r].ptr == src[0].ptr + r;
        }
        if (valid) reads[t * panels + p] = contiguous ? PanelRead::contiguous : PanelRead::valid;
      }
    }
    for (int64_t p = 0; p < panels; ++p) {
      T* panel = dst + p * kc * L;
      const int64_t rows = std::min<int64_t>(L, ni - p * L);
      for (int64_t kk = k0; kk < k0 + kc; ++kk) {
        const int64_t t = taps->tap[kk], channel = taps->channel[kk];
        const PatchSource<S>* src = table.data() + t * ni + p * L;
        T* out = panel + (kk - k0) * L;
        switch (reads[t * panels + p]) {
          case PanelRead::contiguous: {
            const S* run = src[0].ptr + channel * src_plane;
            for (int r = 0; r < L; ++r) out[r] = static_cast<T>(run[r]);
            break;
          }
          case PanelRead::valid: {
            const int64_t offset = channel * src_plane;
            for (int64_t r = 0; r < rows; ++r) out[r] = static_cast<T>(src[r].ptr[offset]);
            for (int64_t r = rows; r < L; ++r) out[r] = T(0);
            break;
          }
          case PanelRead::general:
            for (int64_t r = 0; r < rows; ++r) out[r] = static_cast<T>(src[r].ptr[channel * src[r].stride]);
            for (int64_t r = rows; r < L; ++r) out[r] = T(0);
            break;
        }
      }
    }
  }
};

// Channel planes as rows: logical (o, m) = data[n(m), channel[o], position(m)],
// with m running over batch x plane (the depth of the gradient GEMMs).
template <typename S>
struct ChannelRows {
  const S* data = nullptr;
  int64_t channels = 0;  // of the tensor
  int64_t plane = 0;
  const int64_t* channel = nullptr;  // null: identity
  int64_t depth = 0;

  template <typename T>
  void pack(int64_t i0, int64_t ni, int64_t k0, int64_t kc, int lanes, T* dst) const {
    const int64_t panel_stride = kc * lanes;
    for (int64_t i = 0; i < ni; ++i) {
      const int64_t c = channel ? channel[i0 + i] : i0 + i;
      T* out = dst + (i / lanes) * panel_stride + i % lanes;
      int64_t n = k0 / plane, p = k0 % plane;
      for (int64_t j = 0; j < kc; ++n, p = 0) {
        const int64_t run = std::min(kc - j, plane - p);
        const S* src = data + (n * channels + c) * plane + p;
        for (int64_t r = 0; r < run; ++r) out[(j + r) * lanes] = static_cast<T>(src[r]);
        j += run;
      }
    }
    const int64_t tail = ni % lanes;
    if (tail != 0) {
      T* last = dst + (ni / lanes) * panel_stride;
      for (int64_t j = 0; j < kc; ++j) std::fill(last + j * lanes + tail, last + (j + 1) * lanes, T(0));
    }
  }
};

// Convolution weights (out x in x taps) at active channels, optionally plus a
// full-rank adapter P (out x in) at the centre tap (SPPaRA), added while
// packing so W + P never exists.  Depth entry kk = (list index, tap) through
// `kk_index`/`kk_tap`; lanes run over the other channel list.
//   by_input = false: logical (o, kk) = W[out[o], in[kk_index], tap]  (forward)
//   by_input = true:  logical (c, kk) = W[out[kk_index], in[c], tap]  (input gradient)
template <typename S>
struct TapWeights {
  // Depth entries packed lane by lane at a time (see pack).
  static constexpr int64_t kDepthChunk = 128;

  const S* w = nullptr;
  int64_t in_channels = 0, taps = 0, centre = 0;
  const int64_t* out_idx = nullptr;  // null: identity
  const int64_t* in_idx = nullptr;
  const int64_t* kk_index = nullptr;
  const int64_t* kk_tap = nullptr;
  const S* centre_add = nullptr;  // P, or null
  bool by_input = false;
  int64_t depth = 0;

  // The weight offset of element (lane, kk) splits into a part of the lane and
  // a part of the depth entry, so both are worked out once per panel.
  template <typename T>
  void pack(int64_t i0, int64_t ni, int64_t k0, int64_t kc, int lanes, T* dst) const {
    TORCH_CHECK(ni <= lanes, "TapWeights packs one micro-panel at a time");
    thread_local std::vector<int64_t> lane_w, lane_p, depth_w, depth_p;
    const int64_t row = in_channels * taps;  // one output channel's weights
    auto out_channel = [&](int64_t list) { return out_idx ? out_idx[list] : list; };
    auto in_channel = [&](int64_t list) { return in_idx ? in_idx[list] : list; };
    lane_w.resize(ni), lane_p.resize(ni), depth_w.resize(kc), depth_p.resize(kc);
    for (int64_t i = 0; i < ni; ++i) {
      const int64_t lane = i0 + i;
      lane_w[i] = by_input ? in_channel(lane) * taps : out_channel(lane) * row;
      lane_p[i] = by_input ? in_channel(lane) : out_channel(lane) * in_channels;
    }
    for (int64_t j = 0; j < kc; ++j) {
      const int64_t kk = k0 + j, list = kk_index[kk], tap = kk_tap[kk];
      depth_w[j] = (by_input ? out_channel(list) * row : in_channel(list) * taps) + tap;
      // P's offset at the centre tap, -1 elsewhere.
      depth_p[j] = centre_add && tap == centre ? (by_input ? out_channel(list) * in_channels : in_channel(list)) : -1;
    }
    // Lane by lane within chunks of depth: each lane's weight row is read in
    // runs of kDepthChunk entries (a run of cache lines the hardware prefetcher
    // follows), while the chunk of the panel being written stays in L1.  Depth
    // entry by depth entry, the lanes' rows would be as many interleaved
    // streams, more than the prefetchers follow, and every line would wait on
    // memory (a ResNet's last stage: M small, the weight the whole cost).
    for (int64_t j0 = 0; j0 < kc; j0 += kDepthChunk) {
      const int64_t j1 = std::min(kc, j0 + kDepthChunk);
      for (int64_t i = 0; i < ni; ++i) {
        const S* w_lane = w + lane_w[i];
        T* out = dst + i;
        for (int64_t j = j0; j < j1; ++j) out[j * lanes] = static_cast<T>(w_lane[depth_w[j]]);
        if (centre_add) {
          const S* p_lane = centre_add + lane_p[i];
          for (int64_t j = j0; j < j1; ++j) {
            if (depth_p[j] >= 0) out[j * lanes] += static_cast<T>(p_lane[depth_p[j]]);
          }
        }
      }
      for (int64_t j = j0; j < j1; ++j) {
        for (int64_t i = ni; i < lanes; ++i) dst[j * lanes + i] = T(0);
      }
    }
  }
};

// Writes GEMM rows that are positions into channel planes:
// out[n, channel[c], p] = C[m, c] (+ bias[c]) for m = n * plane + p.
// Planes of inactive channels are cleared separately, once.
template <typename S, typename T>
struct PlaneWriter {
  S* out = nullptr;
  int64_t channels = 0, plane = 0;
  const int64_t* channel = nullptr;  // null: identity
  const T* bias = nullptr;

  void operator()(int64_t m, T* c, int64_t n0, int64_t n1, int) const { write_block(m, 1, c, 0, n0, n1); }

  // Rows [m0, m0 + rows) at once (row i at c + i * ldc): channel by channel,
  // so each plane gets one contiguous run per image instead of one scattered
  // element per row; the block of C stays in cache while it is read by columns.
  void write_block(int64_t m0, int64_t rows, const T* c, int64_t ldc, int64_t n0, int64_t n1) const {
    for (int64_t i = 0; i < rows;) {
      const int64_t m = m0 + i, n = m / plane, p = m % plane;
      const int64_t run = std::min(rows - i, plane - p);  // rows in one image
      S* base = out + n * channels * plane + p;
      for (int64_t k = n0; k < n1; ++k) {
        S* dst = base + (channel ? channel[k] : k) * plane;
        const T* src = c + i * ldc + (k - n0);
        const T add = bias ? bias[k] : T(0);
        for (int64_t r = 0; r < run; ++r) dst[r] = static_cast<S>(src[r * ldc] + add);
      }
      i += run;
    }
  }
};

// Rows of C over the positions of a coarse grid (batch x grid) into the planes
// of a finer one (batch x channels x fine), grid coordinate g landing on fine
// coordinate g * step: the input gradient of a strided 1x1 convolution, whose
// output position g reads input g * stride alone.  The fine positions between
// are never written (the caller zeroes them).
template <typename S, typename T>
struct StridedPlaneWriter {
  S* out = nullptr;
  int64_t channels = 0;
  const int64_t* channel = nullptr;  // null: identity
  int64_t grid[3] = {1, 1, 1};
  int64_t fine[3] = {1, 1, 1};
  int64_t step[3] = {1, 1, 1};

  void operator()(int64_t m, T* c, int64_t n0, int64_t n1, int) const { write_block(m, 1, c, 0, n0, n1); }

  void write_block(int64_t m0, int64_t rows, const T* c, int64_t ldc, int64_t n0, int64_t n1) const {
    const int64_t plane = fine[0] * fine[1] * fine[2];
    int64_t m = m0, p[3];
    p[2] = m % grid[2];
    m /= grid[2];
    p[1] = m % grid[1];
    m /= grid[1];
    p[0] = m % grid[0];
    int64_t n = m / grid[0];
    for (int64_t i = 0; i < rows; ++i) {
      S* base = out + n * channels * plane + ((p[0] * step[0]) * fine[1] + p[1] * step[1]) * fine[2] + p[2] * step[2];
      const T* src = c + i * ldc;
      for (int64_t k = n0; k < n1; ++k) base[(channel ? channel[k] : k) * plane] = static_cast<S>(src[k - n0]);
      if (++p[2] == grid[2]) {
        p[2] = 0;
        if (++p[1] == grid[1]) {
          p[1] = 0;
          if (++p[0] == grid[0]) p[0] = 0, ++n;
        }
      }
    }
  }
};

}  // namespace spa_kernels::cpu
