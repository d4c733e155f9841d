// GEMM operands and writers for convolutions as implicit GEMMs.
//
// A convolution over active channels is a GEMM whose depth runs over
// (active channel, kernel tap) pairs.  The operands here gather straight from
// the NC(D)HW tensors while masked_gemm packs them, so no im2col buffer, no
// zero-filled weight and no masked copy of the input is ever built.  Spatial
// tensors are handled as 3-D (1-D and 2-D have leading extents of 1).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

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

// Per depth entry: the source channel and the offsets of its tap.
struct PatchTaps {
  std::vector<int64_t> channel;
  std::vector<int64_t> off[3];

  int64_t size() const { return static_cast<int64_t>(channel.size()); }
  void add(int64_t c, const int64_t (&o)[3]) {
    channel.push_back(c);
    for (int d = 0; d < 3; ++d) off[d].push_back(o[d]);
  }
};

// Source coordinate along one dimension, or -1 outside / between strides.
inline int64_t source_coordinate(int64_t g, int64_t mul, int64_t off, int64_t div, int64_t size) {
  const int64_t c = g * mul + off;
  if (div != 1 && c % div != 0) return -1;
  const int64_t s = div == 1 ? c : c / div;
  return (s >= 0 && s < size) ? s : -1;
}

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

  template <typename T>
  T value(int64_t n, const int64_t (&p)[3], int64_t kk) const {
    int64_t s[3];
    for (int d = 0; d < 3; ++d) {
      s[d] = source_coordinate(p[d], g.mul[d], taps->off[d][kk], g.div[d], g.src[d]);
      if (s[d] < 0) return T(0);
    }
    const int64_t channel = taps->channel[kk];
    return static_cast<T>(data[((n * g.channels + channel) * g.src[0] + s[0]) * g.src[1] * g.src[2] +
                               s[1] * g.src[2] + s[2]]);
  }

  template <typename T>
  void pack(int64_t i0, int64_t ni, int64_t k0, int64_t kc, int lanes, T* dst) const {
    const int64_t panel_stride = kc * lanes;
    if (transposed) {
      // Lanes are depth entries kk, the packed depth runs over positions.
      for (int64_t j = 0; j < kc; ++j) {
        int64_t n, p[3];
        locate(k0 + j, n, p);
        for (int64_t i = 0; i < ni; ++i) {
          dst[(i / lanes) * panel_stride + j * lanes + i % lanes] = value<T>(n, p, i0 + i);
        }
      }
    } else {
      // Lanes are positions; within a lane group, runs along the last grid
      // dimension share everything but the last coordinate.
      for (int64_t p0 = 0; p0 < ni; p0 += lanes) {
        T* panel = dst + (p0 / lanes) * panel_stride;
        const int64_t rows = std::min<int64_t>(lanes, ni - p0);
        int64_t n, p[3];
        locate(i0 + p0, n, p);
        for (int64_t i = 0; i < rows;) {
          const int64_t run = std::min(rows - i, g.grid[2] - p[2]);
          const S* image = data + n * g.channels * g.src_plane();
          const bool plain = g.div[0] == 1 && g.div[1] == 1 && g.div[2] == 1;
          const int64_t base0 = p[0] * g.mul[0], base1 = p[1] * g.mul[1], base2 = p[2] * g.mul[2];
          const int64_t step = g.mul[2];
          for (int64_t kk = k0; kk < k0 + kc; ++kk) {
            T* out = panel + (kk - k0) * lanes + i;
            if (plain) {
              // Forward patches: coordinates are affine in the run, so an
              // interior run is a strided copy with no per-element checks.
              const int64_t s0 = base0 + taps->off[0][kk], s1 = base1 + taps->off[1][kk];
              if (s0 < 0 || s0 >= g.src[0] || s1 < 0 || s1 >= g.src[1]) {
                std::fill(out, out + run, T(0));
                continue;
              }
              const S* line = image + (taps->channel[kk] * g.src[0] + s0) * g.src[1] * g.src[2] + s1 * g.src[2];
              const int64_t first = base2 + taps->off[2][kk], last = first + (run - 1) * step;
              if (first >= 0 && last < g.src[2]) {
                const S* src = line + first;
                for (int64_t r = 0; r < run; ++r) out[r] = static_cast<T>(src[r * step]);
              } else {
                for (int64_t r = 0; r < run; ++r) {
                  const int64_t s2 = first + r * step;
                  out[r] = (s2 >= 0 && s2 < g.src[2]) ? static_cast<T>(line[s2]) : T(0);
                }
              }
              continue;
            }
            const int64_t s0 = source_coordinate(p[0], g.mul[0], taps->off[0][kk], g.div[0], g.src[0]);
            const int64_t s1 = source_coordinate(p[1], g.mul[1], taps->off[1][kk], g.div[1], g.src[1]);
            if (s0 < 0 || s1 < 0) {
              std::fill(out, out + run, T(0));
              continue;
            }
            const S* line = image + (taps->channel[kk] * g.src[0] + s0) * g.src[1] * g.src[2] + s1 * g.src[2];
            const int64_t off = taps->off[2][kk];
            for (int64_t r = 0; r < run; ++r) {
              const int64_t s2 = source_coordinate(p[2] + r, g.mul[2], off, g.div[2], g.src[2]);
              out[r] = s2 < 0 ? T(0) : static_cast<T>(line[s2]);
            }
          }
          i += run;
          p[2] += run;
          if (p[2] == g.grid[2]) {
            p[2] = 0;
            if (++p[1] == g.grid[1]) {
              p[1] = 0;
              if (++p[0] == g.grid[0]) {
                p[0] = 0;
                ++n;
              }
            }
          }
        }
        for (int64_t kk = 0; kk < kc; ++kk) std::fill(panel + kk * lanes + rows, panel + (kk + 1) * lanes, T(0));
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
  const S* w = nullptr;
  int64_t in_channels = 0, taps = 0, centre = 0;
  const int64_t* out_idx = nullptr;  // null: identity
  const int64_t* in_idx = nullptr;
  const int64_t* kk_index = nullptr;
  const int64_t* kk_tap = nullptr;
  const S* centre_add = nullptr;  // P, or null
  bool by_input = false;
  int64_t depth = 0;

  template <typename T>
  void pack(int64_t i0, int64_t ni, int64_t k0, int64_t kc, int lanes, T* dst) const {
    const int64_t panel_stride = kc * lanes;
    for (int64_t i = 0; i < ni; ++i) {
      T* out = dst + (i / lanes) * panel_stride + i % lanes;
      for (int64_t j = 0; j < kc; ++j) {
        const int64_t kk = k0 + j, lane = i0 + i;
        const int64_t o_list = by_input ? kk_index[kk] : lane, c_list = by_input ? lane : kk_index[kk];
        const int64_t o = out_idx ? out_idx[o_list] : o_list, c = in_idx ? in_idx[c_list] : c_list;
        const int64_t tap = kk_tap[kk];
        T v = static_cast<T>(w[(o * in_channels + c) * taps + tap]);
        if (centre_add && tap == centre) v += static_cast<T>(centre_add[o * in_channels + c]);
        out[j * lanes] = v;
      }
    }
    const int64_t tail = ni % lanes;
    if (tail != 0) {
      T* last = dst + (ni / lanes) * panel_stride;
      for (int64_t j = 0; j < kc; ++j) std::fill(last + j * lanes + tail, last + (j + 1) * lanes, T(0));
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

  void operator()(int64_t m, T* c, int64_t n0, int64_t n1, int) const {
    const int64_t n = m / plane, p = m % plane;
    S* base = out + n * channels * plane + p;
    for (int64_t k = n0; k < n1; ++k) {
      const T v = c[k - n0] + (bias ? bias[k] : T(0));
      base[(channel ? channel[k] : k) * plane] = static_cast<S>(v);
    }
  }
};

}  // namespace spa_kernels::cpu
