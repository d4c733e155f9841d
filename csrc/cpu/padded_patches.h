// The forward convolution's implicit im2col matrix, read in place from a
// zero-padded copy of the active input channels.
//
// Packing patches straight from x (PatchOperand) has to find out, for every
// position and tap, whether the read falls on padding and copy around it lane
// by lane, and it copies every input value once per tap: on the small maps of
// a CNN's later stages that copy costs a large share of the GEMM.  A copy of
// x_S with explicit zero borders makes every read valid and splits its
// address into a part of the position and a part of the depth entry:
//     A(m, kk) = padded[row_offset(m) + depth_offset(kk)],
// so the GEMM tile reads A in place (TileKernels::tile_rows: one address per
// row of the tile, one offset per depth entry) and A is never packed.  The
// copy is a single pass over x_S (|S| channels only, about (H+2)(W+2)/HW of
// x_S) and converts the input to the accumulation type once, not once per tap.
// Where no tap reads a border (1x1 kernels, any stride) and x is in the
// accumulation type already, there is no copy: x is read where it lies.
#pragma once

#include <omp.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "masked_gemm.h"

namespace spa_kernels::cpu {

// A grid of positions (batch x grid) reading a source (batch x channels x src)
// at source coordinate grid * mul + tap offset along each dimension, as in a
// forward convolution (stride = mul).  Spatial shapes are padded to three
// dimensions with leading extents of 1.
struct PaddedGeometry {
  int64_t batch = 0;
  int64_t grid[3] = {1, 1, 1};
  int64_t src[3] = {1, 1, 1};
  int64_t mul[3] = {1, 1, 1};
};

template <typename T>
class PaddedPatches {
 public:
  // x: (batch, x_channels, src...) of dtype S; `channel[0:count]` are the
  // channels to copy (null: all); depth entry kk reads list channel
  // `depth_channel[kk]` at tap offset `depth_offset[kk]`.
  template <typename S>
  PaddedPatches(const S* x, const PaddedGeometry& g, int64_t x_channels, const int64_t* channel, int64_t count,
                const std::vector<int64_t>& depth_channel, const std::vector<std::array<int64_t, 3>>& depth_offset,
                int threads)
      : depth(static_cast<int64_t>(depth_channel.size())), g_(g),
        in_place_(std::is_same_v<S, T> && needs_no_border(g, depth_offset)),
        data_(in_place_ ? 0 : buffer_size(g, count, depth_offset)) {
    int64_t low[3];
    padding(g, depth_offset, low, padded_);
    plane_ = padded_[0] * padded_[1] * padded_[2];
    // In place, a depth entry's channel is its plane in x itself.
    batch_stride_ = (in_place_ ? x_channels : count) * plane_;
    depth_offset_.reserve(depth_channel.size());
    for (size_t kk = 0; kk < depth_channel.size(); ++kk) {
      const auto& off = depth_offset[kk];
      const int64_t plane_index = in_place_ && channel ? channel[depth_channel[kk]] : depth_channel[kk];
      depth_offset_.push_back(plane_index * plane_ +
                              ((off[0] + low[0]) * padded_[1] + off[1] + low[1]) * padded_[2] + off[2] + low[2]);
    }
    if constexpr (std::is_same_v<S, T>) {
      if (in_place_) {
        base_ = x;
        return;
      }
    }
    base_ = data_.get();
    const int64_t src_plane = g.src[0] * g.src[1] * g.src[2];
    T* out = data_.get();
    const int64_t planes = g.batch * count;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t q = 0; q < planes; ++q) {
      const int64_t n = q / count, c = channel ? channel[q % count] : q % count;
      const S* src = x + (n * x_channels + c) * src_plane;
      T* dst = out + q * plane_;
      for (int64_t p0 = 0; p0 < padded_[0]; ++p0) {
        for (int64_t p1 = 0; p1 < padded_[1]; ++p1) {
          T* row = dst + (p0 * padded_[1] + p1) * padded_[2];
          const int64_t s0 = p0 - low[0], s1 = p1 - low[1];
          if (s0 < 0 || s0 >= g.src[0] || s1 < 0 || s1 >= g.src[1]) {
            std::fill(row, row + padded_[2], T(0));
            continue;
          }
          const S* line = src + (s0 * g.src[1] + s1) * g.src[2];
          std::fill(row, row + low[2], T(0));
          for (int64_t s2 = 0; s2 < g.src[2]; ++s2) row[low[2] + s2] = static_cast<T>(line[s2]);
          std::fill(row + low[2] + g.src[2], row + padded_[2], T(0));
        }
      }
    }
  }

  int64_t depth = 0;

  // For the in-place tile (TileKernels::tile_rows): element (m, kk) is at
  // rows[m - i0][depth_offsets()[kk]].  Writes `padded_rows` >= ni addresses;
  // rows past ni repeat the first (their results are scratch, never read).
  void row_addresses(int64_t i0, int64_t ni, int64_t padded_rows, const T** rows) const {
    int64_t m = i0, p[3];
    p[2] = m % g_.grid[2];
    m /= g_.grid[2];
    p[1] = m % g_.grid[1];
    m /= g_.grid[1];
    p[0] = m % g_.grid[0];
    int64_t n = m / g_.grid[0];
    for (int64_t r = 0; r < ni; ++r) {
      rows[r] = base_ + n * batch_stride_ +
                ((p[0] * g_.mul[0]) * padded_[1] + p[1] * g_.mul[1]) * padded_[2] + p[2] * g_.mul[2];
      if (++p[2] == g_.grid[2]) {
        p[2] = 0;
        if (++p[1] == g_.grid[1]) {
          p[1] = 0;
          if (++p[0] == g_.grid[0]) p[0] = 0, ++n;
        }
      }
    }
    for (int64_t r = ni; r < padded_rows; ++r) rows[r] = rows[0];
  }
  const int64_t* depth_offsets() const { return depth_offset_.data(); }

 private:
  // No tap of any grid position reads outside the source (a 1×1 kernel, or
  // "valid" padding): the source is its own padded copy and, in the
  // accumulation type already, is read where it lies.  A pointwise
  // convolution then runs as a plain GEMM over x, with no copy at all.
  static bool needs_no_border(const PaddedGeometry& g, const std::vector<std::array<int64_t, 3>>& offsets) {
    int64_t low[3], padded[3];
    padding(g, offsets, low, padded);
    for (int d = 0; d < 3; ++d) {
      if (low[d] != 0 || padded[d] != g.src[d]) return false;
    }
    return true;
  }

  // Zero borders wide enough for every tap of every grid position.
  static void padding(const PaddedGeometry& g, const std::vector<std::array<int64_t, 3>>& offsets, int64_t (&low)[3],
                      int64_t (&padded)[3]) {
    for (int d = 0; d < 3; ++d) {
      int64_t lo = 0, hi = 0;
      for (const auto& off : offsets) lo = std::min(lo, off[d]), hi = std::max(hi, off[d]);
      low[d] = -lo;
      const int64_t last = (g.grid[d] - 1) * g.mul[d] + hi;  // the furthest source coordinate read
      padded[d] = low[d] + std::max(g.src[d], last + 1);
    }
  }

  static int64_t buffer_size(const PaddedGeometry& g, int64_t count,
                             const std::vector<std::array<int64_t, 3>>& offsets) {
    int64_t low[3], padded[3];
    padding(g, offsets, low, padded);
    return g.batch * count * padded[0] * padded[1] * padded[2];
  }

  PaddedGeometry g_;
  int64_t padded_[3] = {1, 1, 1};
  int64_t plane_ = 1;
  int64_t batch_stride_ = 0;  // between images, at base_
  std::vector<int64_t> depth_offset_;
  bool in_place_ = false;
  AlignedBuffer<T> data_;
  const T* base_ = nullptr;  // data_, or x itself when read in place
};

}  // namespace spa_kernels::cpu
