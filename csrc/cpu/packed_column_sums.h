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
// A packed block holds rows m of A in micro-panels of `mr` lanes; the product
// needs depth entries as rows, so each block is first transposed into panels of
// `mr` depth entries (in L2, a small fraction of the cost of reading A), then
// multiplied with the register tile.  Each thread sums into its own buffers, so
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
      s.product.assign(static_cast<size_t>((depth + kern.mr) * ldp_), T(0));
      s.colsum.assign(static_cast<size_t>(depth), T(0));
      s.rows.resize(static_cast<size_t>((kKC + kern.mr) * kMC));
      s.t_panels.resize(static_cast<size_t>(std::max<int64_t>(rank_panels_, 1) * kMC * kern.nr));
      scratch_.push_back(std::move(s));
    }
  }

  // Block of rows [mb, mb + rows) x depth [pc, pc + kc), packed with kern.mr lanes.
  void operator()(int64_t mb, int64_t rows, int64_t pc, int64_t kc, const T* packed, int tid) {
    Scratch& s = scratch_[tid];
    const int mr = kern_.mr, nr = kern_.nr;
    const int64_t row_panels = (rows + mr - 1) / mr;
    for (int64_t ip = 0; ip < row_panels; ++ip) {
      const T* panel = packed + ip * kc * mr;
      for (int64_t k = 0; k < kc; ++k) {
        T sum = T(0);
        for (int i = 0; i < mr; ++i) sum += panel[k * mr + i];  // padding lanes are zero
        s.colsum[pc + k] += sum;
      }
    }
    if (rank_ == 0) return;
    if (pc == 0) pack_t(mb, rows, s);  // the first depth block of each row block
    // Depth entries as rows: rows_buf[(q * rows + m) * mr + l] = A[mb + m, pc + q * mr + l].
    const int64_t depth_panels = (kc + mr - 1) / mr;
    T* rows_buf = s.rows.data();
    for (int64_t q = 0; q < depth_panels; ++q) {
      for (int64_t m = 0; m < rows; ++m) {
        const T* src = packed + (m / mr) * kc * mr + (m % mr);
        T* dst = rows_buf + (q * rows + m) * mr;
        for (int l = 0; l < mr; ++l) {
          const int64_t k = q * mr + l;
          dst[l] = k < kc ? src[k * mr] : T(0);
        }
      }
    }
    for (int64_t q = 0; q < depth_panels; ++q) {
      for (int64_t jp = 0; jp < rank_panels_; ++jp) {
        // Rows past pc + kc get zeros added: the buffer has mr rows of slack.
        kern_.tile(rows, rows_buf + q * rows * mr, s.t_panels.data() + jp * rows * nr,
                   s.product.data() + (pc + q * mr) * ldp_ + jp * nr, ldp_, true);
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
    std::vector<T> product, colsum, rows, t_panels;
  };

  // T's rows [mb, mb + rows) as B panels of nr columns (zero past rank).
  void pack_t(int64_t mb, int64_t rows, Scratch& s) const {
    const int nr = kern_.nr;
    for (int64_t jp = 0; jp < rank_panels_; ++jp) {
      T* dst = s.t_panels.data() + jp * rows * nr;
      for (int64_t m = 0; m < rows; ++m) {
        const T* src = t_ + (mb + m) * rank_;
        for (int l = 0; l < nr; ++l) {
          const int64_t j = jp * nr + l;
          dst[m * nr + l] = j < rank_ ? src[j] : T(0);
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
