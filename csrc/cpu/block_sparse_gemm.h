// Block-sparse products over the active blocks of a block mask.
//
//   block_sparse_gemm:  Y[:, I] = sum_{J active in row I} X[:, J] . B_IJ^T      (y = x W^T and dx = dy W)
//   block_outer_sums:   G_a = Y[:, I_a]^T X[:, J_a]  for every active block a  (the weight's gradient)
//
// B_IJ (bh x bw) is never stored at full size: a callback writes each active
// block while B is packed, so the packed copy holds active blocks only, and
// everything else reuses the masked-GEMM engine's operand packing (pack_block)
// and register tiles.  X rows are packed once per block of kMC rows; an active
// block then reads its depth slice of that packed block in place through the
// tile kernel's row addresses and depth offsets (tile_rows), so each output
// panel of a block row is one tile call over all its active blocks.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "masked_gemm.h"

namespace spa_kernels::cpu {

// Active blocks by block row, in compressed-row form: row I holds the blocks
// begin[I] .. begin[I+1]-1, block a in column col[a]; `entry[a]` is the
// block's position in another ordering (the row-major one, for a transposed
// structure), or a itself.
struct BlockRows {
  int64_t rows = 0, cols = 0;
  std::vector<int64_t> begin, col, entry;

  int64_t count() const { return static_cast<int64_t>(col.size()); }
};

// The structure of a bool (rows x cols) mask (null: all active), row-major.
inline BlockRows block_rows_of(const bool* mask, int64_t rows, int64_t cols) {
  BlockRows b{rows, cols, std::vector<int64_t>(rows + 1, 0), {}, {}};
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      if (mask == nullptr || mask[i * cols + j]) {
        b.entry.push_back(static_cast<int64_t>(b.col.size()));
        b.col.push_back(j);
      }
    }
    b.begin[i + 1] = static_cast<int64_t>(b.col.size());
  }
  return b;
}

// The same blocks by block column: row J of the result lists the block rows
// I active in column J, and entry[] points back into `by_row`.
inline BlockRows transposed(const BlockRows& by_row) {
  BlockRows t{by_row.cols, by_row.rows, std::vector<int64_t>(by_row.cols + 1, 0), {}, {}};
  t.col.resize(by_row.count());
  t.entry.resize(by_row.count());
  for (int64_t a = 0; a < by_row.count(); ++a) ++t.begin[by_row.col[a] + 1];
  for (int64_t j = 0; j < t.rows; ++j) t.begin[j + 1] += t.begin[j];
  std::vector<int64_t> next(t.begin.begin(), t.begin.end() - 1);
  for (int64_t i = 0; i < by_row.rows; ++i) {
    for (int64_t a = by_row.begin[i]; a < by_row.begin[i + 1]; ++a) {
      const int64_t slot = next[by_row.col[a]]++;
      t.col[slot] = i;
      t.entry[slot] = by_row.entry[a];
    }
  }
  return t;
}

// Y (M x rows*bh, dtype S) = X (M x cols*bw) . B^T over the active blocks of
// `blocks`, plus `bias` (per output column, may be null).  fill_block(I, a,
// dst) writes block a (in row I) as a row-major (bh x bw) array of T; it is
// called for the blocks of a row in order, all on one thread, so it may form
// a whole row's blocks on the row's first call.  Output
// columns of a block row without active blocks get the bias (or zero).
template <typename S, typename T, typename FillBlock>
void block_sparse_gemm(const TileKernels<T>& kern, const S* x, int64_t M, const BlockRows& blocks, int64_t bh,
                       int64_t bw, FillBlock&& fill_block, const T* bias, S* y, int threads) {
  const int mr = kern.mr, nr = kern.nr;
  const int64_t in_width = blocks.cols * bw, out_width = blocks.rows * bh;
  const int64_t panels = (bh + nr - 1) / nr;  // output panels of one block row
  // Packed B: block row I, panel s, depth (a - begin[I]) * bw + t, lane n.
  std::vector<int64_t> b_offset(blocks.rows + 1, 0);
  for (int64_t i = 0; i < blocks.rows; ++i) {
    b_offset[i + 1] = b_offset[i] + panels * (blocks.begin[i + 1] - blocks.begin[i]) * bw * nr;
  }
  AlignedBuffer<T> packed_b(b_offset[blocks.rows] + kSlack);
  // X is packed kMC rows by `chunk_cols` block columns at a time: all of them
  // when that block fits in L2, else about kKC columns (each block row's
  // products then accumulate over the chunks, in the usual GEMM order).
  const int64_t chunk_cols = static_cast<int64_t>(kMC * in_width * sizeof(T)) <= (int64_t{512} << 10)
                                 ? std::max<int64_t>(blocks.cols, 1)
                                 : std::max<int64_t>(1, kKC / std::max<int64_t>(bw, 1));
  // Depth offsets of each active block's columns inside its packed X chunk.
  std::vector<int64_t> offsets(blocks.count() * bw);
  for (int64_t a = 0; a < blocks.count(); ++a) {
    for (int64_t t = 0; t < bw; ++t) offsets[a * bw + t] = ((blocks.col[a] % chunk_cols) * bw + t) * mr;
  }
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> block(bh * bw);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < blocks.rows; ++i) {
      const int64_t first = blocks.begin[i], depth = (blocks.begin[i + 1] - first) * bw;
      for (int64_t a = first; a < blocks.begin[i + 1]; ++a) {
        fill_block(i, a, block.data());
        for (int64_t s = 0; s < panels; ++s) {
          T* panel = packed_b.get() + b_offset[i] + s * depth * nr + (a - first) * bw * nr;
          for (int64_t t = 0; t < bw; ++t) {
            for (int64_t n = 0; n < nr; ++n) {
              const int64_t row = s * nr + n;
              panel[t * nr + n] = row < bh ? block[row * bw + t] : T(0);
            }
          }
        }
      }
    }
  }

  const int64_t m_blocks = (M + kMC - 1) / kMC;
  const bool split_rows = m_blocks >= threads;
#pragma omp parallel num_threads(threads)
  {
    const int nthreads = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t mb_first = split_rows ? m_blocks * tid / nthreads : 0;
    const int64_t mb_last = split_rows ? m_blocks * (tid + 1) / nthreads : m_blocks;
    const int64_t i_first = split_rows ? 0 : blocks.rows * tid / nthreads;
    const int64_t i_last = split_rows ? blocks.rows : blocks.rows * (tid + 1) / nthreads;
    const int64_t ldc = panels * nr, ldc_all = std::max<int64_t>(i_last - i_first, 0) * ldc;
    AlignedBuffer<T> packed_x(kMC * chunk_cols * bw + kSlack);
    AlignedBuffer<T> c(kMC * ldc_all + kSlack);
    std::vector<const T*> lane_rows(mr);
    std::vector<int64_t> cursor(blocks.rows);
    std::vector<char> started(blocks.rows);
    const GatherMatrix<S> xg{x, in_width, nullptr, nullptr, false};
    for (int64_t mb = mb_first; mb < mb_last; ++mb) {
      const int64_t m0 = mb * kMC, rows = std::min(kMC, M - m0);
      const int64_t row_panels = (rows + mr - 1) / mr;
      for (int64_t i = i_first; i < i_last; ++i) {
        cursor[i] = blocks.begin[i];
        started[i] = 0;
      }
      for (int64_t c0 = 0; c0 < blocks.cols; c0 += chunk_cols) {
        const int64_t c1 = std::min(blocks.cols, c0 + chunk_cols), width = (c1 - c0) * bw;
        if (width > 0) pack_block(xg, m0, rows, c0 * bw, width, mr, packed_x.get());
        for (int64_t i = i_first; i < i_last; ++i) {
          const int64_t first = blocks.begin[i], full_depth = (blocks.begin[i + 1] - first) * bw;
          const int64_t a0 = cursor[i];
          int64_t a1 = a0;
          while (a1 < blocks.begin[i + 1] && blocks.col[a1] < c1) ++a1;
          cursor[i] = a1;
          if (a1 == a0) continue;
          T* ci = c.get() + (i - i_first) * ldc;
          for (int64_t s = 0; s < panels; ++s) {
            const T* bp = packed_b.get() + b_offset[i] + s * full_depth * nr + (a0 - first) * bw * nr;
            for (int64_t ip = 0; ip < row_panels; ++ip) {
              for (int l = 0; l < mr; ++l) lane_rows[l] = packed_x.get() + ip * width * mr + l;
              kern.tile_rows((a1 - a0) * bw, lane_rows.data(), offsets.data() + a0 * bw, bp,
                             ci + ip * mr * ldc_all + s * nr, ldc_all, started[i] != 0);
            }
          }
          started[i] = 1;
        }
      }
      // Row by row, so each thread writes its share of an output row in one
      // contiguous run (block row by block row, it would write bh elements
      // every out_width, a fresh pair of cache lines per store).
      for (int64_t r = 0; r < rows; ++r) {
        S* out_row = y + (m0 + r) * out_width;
        const T* c_row = c.get() + r * ldc_all;
        for (int64_t i = i_first; i < i_last; ++i) {
          S* out = out_row + i * bh;
          const T* row = c_row + (i - i_first) * ldc;
          const T* b = bias ? bias + i * bh : nullptr;
          if (started[i] && b) {
            for (int64_t n = 0; n < bh; ++n) out[n] = static_cast<S>(row[n] + b[n]);
          } else if (started[i]) {
            for (int64_t n = 0; n < bh; ++n) out[n] = static_cast<S>(row[n]);
          } else if (b) {
            for (int64_t n = 0; n < bh; ++n) out[n] = static_cast<S>(b[n]);
          } else {
            std::fill(out, out + bh, S(0));
          }
        }
      }
    }
  }
}

// G_a = Y[:, rows of block a]^T . X[:, columns of block a] (bh x bw, summed
// over all M rows) for every active block, into `g` (count x bh x bw, T).
// Y and X are packed transposed, kKC rows at a time, by the engine's
// pack_block; each block is then one tile per panel pair.
template <typename S, typename T>
void block_outer_sums(const TileKernels<T>& kern, const S* yv, const S* x, int64_t M, const BlockRows& blocks,
                      int64_t bh, int64_t bw, T* g, int threads) {
  const int mr = kern.mr, nr = kern.nr;
  const int64_t in_width = blocks.cols * bw, out_width = blocks.rows * bh;
  const int64_t a_panels = (bh + mr - 1) / mr, b_panels = (bw + nr - 1) / nr;
  const int64_t ldg = b_panels * nr, g_stride = a_panels * mr * ldg;
  const int64_t count = blocks.count();
  AlignedBuffer<T> padded(count * g_stride + kSlack);  // each block as whole tiles
  AlignedBuffer<T> packed_y(blocks.rows * a_panels * mr * kKC + kSlack);
  AlignedBuffer<T> packed_x(blocks.cols * b_panels * nr * kKC + kSlack);
  std::vector<char> column_used(blocks.cols, 0);
  for (int64_t a = 0; a < count; ++a) column_used[blocks.col[a]] = 1;
  std::vector<int64_t> row_of(count);
  for (int64_t i = 0; i < blocks.rows; ++i) {
    for (int64_t a = blocks.begin[i]; a < blocks.begin[i + 1]; ++a) row_of[a] = i;
  }
  const GatherMatrix<S> yt{yv, out_width, nullptr, nullptr, true};  // logical (o, m) = y[m, o]
  const GatherMatrix<S> xt{x, in_width, nullptr, nullptr, true};    // logical (k, m) = x[m, k]
#pragma omp parallel num_threads(threads)
  {
    for (int64_t m0 = 0; m0 < M; m0 += kKC) {
      const int64_t mc = std::min(kKC, M - m0);
#pragma omp for schedule(static) nowait
      for (int64_t i = 0; i < blocks.rows; ++i) {
        if (blocks.begin[i + 1] > blocks.begin[i]) {
          pack_block(yt, i * bh, bh, m0, mc, mr, packed_y.get() + i * a_panels * mr * kKC);
        }
      }
#pragma omp for schedule(static)
      for (int64_t j = 0; j < blocks.cols; ++j) {
        if (column_used[j]) pack_block(xt, j * bw, bw, m0, mc, nr, packed_x.get() + j * b_panels * nr * kKC);
      }
#pragma omp for schedule(static)
      for (int64_t a = 0; a < count; ++a) {
        const T* ya = packed_y.get() + row_of[a] * a_panels * mr * kKC;
        const T* xa = packed_x.get() + blocks.col[a] * b_panels * nr * kKC;
        for (int64_t ip = 0; ip < a_panels; ++ip) {
          for (int64_t jp = 0; jp < b_panels; ++jp) {
            kern.tile(mc, ya + ip * mc * mr, xa + jp * mc * nr, padded.get() + a * g_stride + ip * mr * ldg + jp * nr,
                      ldg, m0 > 0);
          }
        }
      }
    }
#pragma omp for schedule(static)
    for (int64_t a = 0; a < count; ++a) {
      for (int64_t r = 0; r < bh; ++r) {
        std::copy_n(padded.get() + a * g_stride + r * ldg, bw, g + (a * bh + r) * bw);
      }
    }
  }
}

}  // namespace spa_kernels::cpu
