// Sums over the rows of a GEMM's A operand, taken from its packed blocks.
//
// For A (M x depth), read through the blocks another GEMM packs anyway, and a
// dense row-major T (M x rank), this accumulates
//     product = A^T T   (depth x rank)      and      colsum = A^T 1   (depth).
// The linear backward hooks it onto the dx GEMM, whose A is dy_O: then
// [dB_O | db_O] = dy_O^T [t | 1] come from blocks that are already in cache, and
// dy (often the largest tensor of the step) is read from memory once instead of
// twice, the second time column by column.
//
// A packed block holds rows m of A in micro-panels of `mr` lanes; each panel
// meets the matching mr rows of T in the `panel_outer` kernel, which keeps
// those rows in registers and walks the panel's depth entries.  Each thread sums into its own buffers, so
// nothing is shared while the GEMM runs; `product`/`colsum` add them up.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "masked_gemm.h"

namespace spa_kernels::cpu {

template <typename T>
class PackedColumnSums {
 public:
  // `t` may be null when rank is 0 (column sums only).
  PackedColumnSums(const TileKernels<T>& kern, const T* t, int64_t rank, int64_t depth, int threads)
      : kern_(kern), t_(t), rank_(rank), depth_(depth),
        rank_panels_((rank + kern.nr - 1) / kern.nr), ldp_(std::max<int64_t>(rank_panels_ * kern.nr, 1)) {
    for (int i = 0; i < threads; ++i) {
      Scratch s;
      s.product.assign(static_cast<size_t>(depth * ldp_), T(0));
      s.colsum.assign(static_cast<size_t>(depth), T(0));
      s.lane_sums.resize(static_cast<size_t>(kKC * kern.mr));
      s.t_panels.resize(static_cast<size_t>(std::max<int64_t>(rank_panels_, 1) * kMC * kern.nr));
      scratch_.push_back(std::move(s));
    }
  }

  // Block of rows [mb, mb + rows) x depth [pc, pc + kc), packed with kern.mr lanes.
  void operator()(int64_t mb, int64_t rows, int64_t pc, int64_t kc, const T* packed, int tid) {
    Scratch& s = scratch_[tid];
    const int mr = kern_.mr, nr = kern_.nr;
    const int64_t row_panels = (rows + mr - 1) / mr;
    const int64_t panel_size = kc * mr;
    // Column sums: add the panels lane by lane (contiguous, so it vectorises),
    // then fold each entry's mr lanes once.  Padding lanes are zero.
    T* lanes = s.lane_sums.data();
    std::copy(packed, packed + panel_size, lanes);
    for (int64_t ip = 1; ip < row_panels; ++ip) {
      const T* panel = packed + ip * panel_size;
      for (int64_t x = 0; x < panel_size; ++x) lanes[x] += panel[x];
    }
    for (int64_t k = 0; k < kc; ++k) {
      T sum = T(0);
      for (int i = 0; i < mr; ++i) sum += lanes[k * mr + i];
      s.colsum[pc + k] += sum;
    }
    if (rank_ == 0) return;
    if (pc == 0) pack_t(mb, rows, row_panels * mr, s);  // the first depth block of each row block
    for (int64_t ip = 0; ip < row_panels; ++ip) {
      for (int64_t jp = 0; jp < rank_panels_; ++jp) {
        kern_.panel_outer(kc, packed + ip * panel_size, s.t_panels.data() + (jp * kMC + ip * mr) * nr,
                          s.product.data() + pc * ldp_ + jp * nr, ldp_);
      }
    }
  }

  T product(int64_t k, int64_t j) const {
    T total = T(0);
    for (const Scratch& s : scratch_) total += s.product[k * ldp_ + j];
    return total;
  }

  T colsum(int64_t k) const {
    T total = T(0);
    for (const Scratch& s : scratch_) total += s.colsum[k];
    return total;
  }

 private:
  struct Scratch {
    std::vector<T> product, colsum, lane_sums, t_panels;
  };

  // T's rows [mb, mb + rows) as (rows x nr) blocks, one per rank panel, zero
  // past rank and down to `padded_rows` (a whole number of A panels).
  void pack_t(int64_t mb, int64_t rows, int64_t padded_rows, Scratch& s) const {
    const int nr = kern_.nr;
    for (int64_t jp = 0; jp < rank_panels_; ++jp) {
      T* dst = s.t_panels.data() + jp * kMC * nr;
      for (int64_t m = 0; m < padded_rows; ++m) {
        const T* src = t_ + (mb + m) * rank_;
        for (int l = 0; l < nr; ++l) {
          const int64_t j = jp * nr + l;
          dst[m * nr + l] = m < rows && j < rank_ ? src[j] : T(0);
        }
      }
    }
  }

  const TileKernels<T>& kern_;
  const T* t_;
  int64_t rank_, depth_, rank_panels_, ldp_;
  std::vector<Scratch> scratch_;
};

}  // namespace spa_kernels::cpu
