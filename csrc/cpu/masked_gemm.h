// A blocked GEMM whose operands are gathered while they are packed.
//
// Every masked product in the library has the form
//
//     C[i, n] = sum_k A(i, k) * B(n, k)          i < M, n < N, k < K
//
// where A and B are *views*: rows and columns picked through index lists from
// a full-size tensor, possibly transposed; an optional low-rank term adds the
// adapter's rank-r path to the same product.  A blocked GEMM copies each operand
// once into cache-friendly micro-panels anyway, so the gather costs nothing
// extra: it happens in that copy.  Only active channels are ever read or
// multiplied.  The result of each row goes to a `finalize` callback, which
// scatters it into full-width storage (and writes the zeros between).
//
// Blocking follows the usual scheme: all of B is packed once into panels of
// `nr` columns; each thread then walks its rows in blocks of kMC, packs an
// (kMC x kKC) slice of A, and runs the register tile over it.
#pragma once

#include <omp.h>

#include <algorithm>
#include <concepts>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <new>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "tile_kernels.h"

namespace spa_kernels::cpu {

// Rows per A block: fits an L2-sized (kMC x kKC) slice; a multiple of every mr.
constexpr int64_t kMC = 144;
// Depth per block: keeps a (kKC x nr) B micro-panel in L1 while it is reused.
constexpr int64_t kKC = 256;
// Scratch slack so vector reads just past a row's last value stay in bounds.
constexpr int64_t kSlack = 32;

// A matrix read through optional index lists.  Logical element (i, j) is
// storage element (row_idx[i], col_idx[j]) of `data`, or, when `transposed`,
// storage element (row_idx[j], col_idx[i]).  A null index list is identity.
template <typename S>
struct GatherMatrix {
  const S* data = nullptr;
  int64_t ld = 0;
  const int64_t* row_idx = nullptr;
  const int64_t* col_idx = nullptr;
  bool transposed = false;

  int64_t row(int64_t r) const { return row_idx ? row_idx[r] : r; }
  int64_t col(int64_t c) const { return col_idx ? col_idx[c] : c; }
};

// One whole micro-panel of a row gather: lane l of column j is rows[l][cols[j]].
// Walking the columns with every lane at once writes the panel in order and
// reads each index once; the next panel's rows are fetched ahead meanwhile,
// because a gather from wide rows is bound by memory, not by the copy.
template <int kLanes, typename S, typename T>
void gather_panel(const S* const* rows, const S* const* next_rows, const int64_t* cols, int64_t nj, T* out) {
  if (next_rows != nullptr && nj > 0) {
    constexpr int64_t kLine = 64 / sizeof(S);
    for (int l = 0; l < kLanes; ++l) {
      for (int64_t c = cols[0]; c <= cols[nj - 1]; c += kLine) __builtin_prefetch(next_rows[l] + c, 0, 1);
    }
  }
  for (int64_t j = 0; j < nj; ++j) {
    const int64_t c = cols[j];
    for (int l = 0; l < kLanes; ++l) out[j * kLanes + l] = static_cast<T>(rows[l][c]);
  }
}

// The full panels of a row gather with `kLanes` lanes; returns the rows done.
template <int kLanes, typename S, typename T>
int64_t gather_full_panels(const GatherMatrix<S>& g, int64_t i0, int64_t ni, const int64_t* cols, int64_t nj,
                           T* dst) {
  const int64_t full = ni / kLanes * kLanes;
  const S* rows[2][kLanes];
  auto load_rows = [&](int64_t p0, const S** r) {
    for (int l = 0; l < kLanes; ++l) r[l] = g.data + g.row(i0 + p0 + l) * g.ld;
  };
  if (full > 0) load_rows(0, rows[0]);
  for (int64_t p0 = 0; p0 < full; p0 += kLanes) {
    const S** current = rows[(p0 / kLanes) & 1];
    const S** next = rows[((p0 / kLanes) & 1) ^ 1];
    const bool has_next = p0 + kLanes < full;
    if (has_next) load_rows(p0 + kLanes, next);
    gather_panel<kLanes>(current, has_next ? next : nullptr, cols, nj, dst + (p0 / kLanes) * nj * kLanes);
  }
  return full;
}

// Calls fn(std::integral_constant<int, L>{}) for a run-time lane count L that
// the tile kernels use (4, 6, 8, 12 or 16), so that a copy over lanes has a
// compile-time trip count and vectorises; false for any other count.
template <typename Fn>
bool with_lanes(int lanes, Fn&& fn) {
  switch (lanes) {
    case 4: fn(std::integral_constant<int, 4>{}); return true;
    case 6: fn(std::integral_constant<int, 6>{}); return true;
    case 8: fn(std::integral_constant<int, 8>{}); return true;
    case 12: fn(std::integral_constant<int, 12>{}); return true;
    case 16: fn(std::integral_constant<int, 16>{}); return true;
    default: return false;
  }
}

// Copies logical rows [i0, i0+ni) x columns [j0, j0+nj) of `g` into
// micro-panels of `lanes` rows: row i, column j goes to
//     dst[(i / lanes) * nj * lanes + j * lanes + i % lanes],
// and the last panel is zero-padded to a whole number of lanes.
template <typename S, typename T>
void pack_block(const GatherMatrix<S>& g, int64_t i0, int64_t ni, int64_t j0, int64_t nj, int lanes,
                T* dst) {
  const int64_t panel_stride = nj * lanes;
  if (!g.transposed) {
    // Logical row = storage row: walk along it.  A column gather goes panel by
    // panel for the lane counts the tile kernels use.
    int64_t first = 0;
    if (g.col_idx) {
      const int64_t* cols = g.col_idx + j0;
      // Other lane counts take the row-by-row loop below.
      with_lanes(lanes, [&](auto l) { first = gather_full_panels<l.value>(g, i0, ni, cols, nj, dst); });
    }
    for (int64_t i = first; i < ni; ++i) {
      const S* src = g.data + g.row(i0 + i) * g.ld;
      T* out = dst + (i / lanes) * panel_stride + i % lanes;
      if (g.col_idx) {
        const int64_t* cols = g.col_idx + j0;
        for (int64_t j = 0; j < nj; ++j) out[j * lanes] = static_cast<T>(src[cols[j]]);
      } else {
        for (int64_t j = 0; j < nj; ++j) out[j * lanes] = static_cast<T>(src[j0 + j]);
      }
    }
  } else {
    // Logical column = storage row: read each storage row once for all the
    // block's lanes (good locality when it is far from the next row).
    for (int64_t j = 0; j < nj; ++j) {
      const S* src = g.data + g.row(j0 + j) * g.ld;
      for (int64_t p0 = 0; p0 < ni; p0 += lanes) {
        T* out = dst + (p0 / lanes) * panel_stride + j * lanes;
        const int64_t n = std::min<int64_t>(lanes, ni - p0);
        if (g.col_idx) {
          const int64_t* cols = g.col_idx + i0 + p0;
          for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(src[cols[i]]);
        } else {
          const S* row = src + i0 + p0;
          for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(row[i]);
        }
      }
    }
  }
  const int64_t tail = ni % lanes;
  if (tail != 0) {
    T* last = dst + (ni / lanes) * panel_stride;
    for (int64_t j = 0; j < nj; ++j) std::fill(last + j * lanes + tail, last + (j + 1) * lanes, T(0));
  }
}

// One GEMM operand: logical rows of `matrix` over `depth` columns.
template <typename S>
struct Operand {
  GatherMatrix<S> matrix;
  int64_t depth = 0;

  // pack() takes any number of rows, not just one micro-panel.
  static constexpr bool kPacksManyPanels = true;

  template <typename T>
  void pack(int64_t i0, int64_t ni, int64_t k0, int64_t kc, int lanes, T* dst) const {
    pack_block(matrix, i0, ni, k0, kc, lanes, dst);
  }
};

template <typename Op>
constexpr bool packs_many_panels = requires { Op::kPacksManyPanels; };

// A low-rank term added to a product:  C += scale * (A inner^T) outer^T.
// `inner` is logical (j, k), rank x depth of A; `outer` is logical (n, j),
// N x rank.  masked_gemm adds it one of two ways, whichever multiplies less:
// folded into B's packed panels (B(n, k) += scale * outer(n, :) . inner(:, k),
// N x depth x rank once), or as r extra output columns computed from the same
// packed A blocks as the main product (M x rank x (depth + N)), so A is read
// once.  `save`, if set, receives scale * A inner^T (M x rank) for later use,
// which only the columns compute.
template <typename S, typename T>
struct LowRankTerm {
  GatherMatrix<S> inner;
  GatherMatrix<S> outer;
  int64_t rank = 0;
  // `inner` covers depth [0, inner_depth) of A and is zero beyond (a
  // convolution's adapter sees only the centre tap, ordered first); -1 = all.
  int64_t inner_depth = -1;
  T scale = T(1);
  T* save = nullptr;
};

// 64-byte aligned scratch memory.
template <typename T>
class AlignedBuffer {
 public:
  explicit AlignedBuffer(int64_t count) {
    const size_t bytes = ((static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(T) + 63) / 64) * 64;
    data_.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
    if (!data_) throw std::bad_alloc();
  }
  T* get() const { return data_.get(); }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> data_;
};

// Called with each packed block of A while it is in cache:
// (first row, rows, first depth entry, depth entries, packed block, thread).
// The block has the layout of pack_block with `mr` lanes; every block of A
// reaches the hook exactly once, whatever the threads' split.
template <typename T>
using PackedBlockHook = std::function<void(int64_t, int64_t, int64_t, int64_t, const T*, int)>;

// Adds scale * outer . inner to B's packed panels [p_first, p_last): the
// low-rank term folded into the weights, for the columns of those panels only.
// `inner_panels` is inner^T (depth x rank) packed into micro-panels of mr rows,
// already times scale; `packed_outer` holds outer in B's panel layout.  The
// tile kernel computes each (mr x nr) block of the update; a last block that
// would run past the term's depth goes through `spill` (mr x nr).
template <typename T>
void fold_low_rank(const TileKernels<T>& kern, int64_t depth, int64_t rank, const T* inner_panels,
                   const T* packed_outer, T* packed_b, int64_t panel_depth, int64_t p_first, int64_t p_last,
                   T* spill) {
  const int mr = kern.mr, nr = kern.nr;
  for (int64_t jp = p_first; jp < p_last; ++jp) {
    const T* outer = packed_outer + jp * rank * nr;
    T* panel = packed_b + jp * panel_depth * nr;
    for (int64_t k0 = 0; k0 < depth; k0 += mr) {
      const T* a = inner_panels + (k0 / mr) * rank * mr;
      if (k0 + mr <= depth) {
        kern.tile(rank, a, outer, panel + k0 * nr, nr, true);
      } else {
        kern.tile(rank, a, outer, spill, nr, false);
        for (int64_t e = 0; e < (depth - k0) * nr; ++e) panel[k0 * nr + e] += spill[e];
      }
    }
  }
}

// Threads to use: torch's setting, and one inside an outer parallel region.
inline int gemm_threads() {
  return omp_in_parallel() ? 1 : std::max(1, omp_get_max_threads());
}

// C = A(M x K) * B(N x K)^T [+ low-rank term], row by row into
// `finalize(i, c_row, n0, n1, thread)`, where c_row holds C[i, n0:n1]
// (writable scratch; callers may scale it in place), or a block of rows at a
// time into `finalize.write_block(i0, rows, c, ldc, n0, n1)` where the
// finalizer has one (writers that transpose rows into planes).  Rows are split between
// threads when there are enough of them, else columns.  A and B are any
// operands with a `depth` and `pack(i0, ni, k0, kc, lanes, dst)` that writes
// micro-panels like pack_block; A may instead offer `row_addresses` and
// `depth_offsets` (PaddedPatches) and is then read in place, never packed.
template <typename T, typename OpA, typename OpB, typename Finalize, typename SL = float>
void masked_gemm(const TileKernels<T>& kern, int64_t M, int64_t N, const OpA& a, const OpB& b,
                 Finalize&& finalize, int num_threads, const LowRankTerm<SL, T>* low_rank = nullptr,
                 const PackedBlockHook<T>* on_packed_a = nullptr) {
  const int64_t K = a.depth;
  if (M <= 0 || N <= 0) return;
  // A read in place through row addresses and depth offsets (see
  // TileKernels::tile_rows) instead of packed block by block.
  constexpr bool in_place_a = requires(const T** rows) {
    a.row_addresses(int64_t{}, int64_t{}, int64_t{}, rows);
    { a.depth_offsets() } -> std::convertible_to<const int64_t*>;
  };
  if (in_place_a && on_packed_a) throw std::invalid_argument("masked_gemm: an A read in place has no packed blocks");
  const int mr = kern.mr, nr = kern.nr;
  const int64_t n_panels = (N + nr - 1) / nr;
  const int64_t m_panels = (M + mr - 1) / mr;
  const int64_t term_rank = low_rank ? low_rank->rank : 0;
  const int64_t inner_depth = low_rank && low_rank->inner_depth >= 0 ? std::min(low_rank->inner_depth, K) : K;
  // Folding the term into B costs N x depth x rank multiplies; its r extra
  // output columns cost M x rank x (depth + N), and only they can be saved.
  const bool fold = term_rank > 0 && !low_rank->save && N * inner_depth < M * (inner_depth + N);
  const int64_t rank = fold ? 0 : term_rank;  // the extra output columns
  const int64_t rank_panels = (rank + nr - 1) / nr;
  const int64_t k_alloc = std::max<int64_t>(K, 1);

  // B, the low-rank inner factor (as extra panels after B's, or folded into
  // them from micro-panels of its transpose) and outer factor.
  AlignedBuffer<T> packed_b((n_panels + rank_panels) * k_alloc * nr);
  AlignedBuffer<T> packed_outer(n_panels * std::max<int64_t>(term_rank, 1) * nr);
  const int64_t fold_rows = fold ? (inner_depth + mr - 1) / mr * mr : 0;
  AlignedBuffer<T> inner_panels(fold_rows * term_rank);
  if (fold) {
    GatherMatrix<SL> inner_t = low_rank->inner;  // logical (k, j): the transpose
    inner_t.transposed = !inner_t.transposed;
    pack_block(inner_t, 0, inner_depth, 0, term_rank, mr, inner_panels.get());
    for (int64_t e = 0; e < fold_rows * term_rank; ++e) inner_panels.get()[e] *= low_rank->scale;
  }
#pragma omp parallel num_threads(num_threads)
  {
    const int threads = omp_get_num_threads(), tid = omp_get_thread_num();
    // Each thread packs a contiguous share of B's panels: in one call where
    // the operand can (a transposed gather then reads each storage row once
    // per thread rather than once per panel), else panel by panel.
    const int64_t p_first = n_panels * tid / threads, p_last = n_panels * (tid + 1) / threads;
    const int64_t step = packs_many_panels<OpB> ? std::max<int64_t>(p_last - p_first, 1) : 1;
    for (int64_t jp = p_first; jp < p_last; jp += step) {
      const int64_t n0 = jp * nr, nn = std::min(N, std::min(jp + step, p_last) * nr) - n0;
      b.pack(n0, nn, 0, K, nr, packed_b.get() + jp * K * nr);
      if (term_rank > 0) {
        pack_block(low_rank->outer, n0, nn, 0, term_rank, nr, packed_outer.get() + jp * term_rank * nr);
      }
    }
    if (fold) {
      AlignedBuffer<T> spill(static_cast<int64_t>(mr) * nr);
      fold_low_rank(kern, inner_depth, term_rank, inner_panels.get(), packed_outer.get(), packed_b.get(), K,
                    p_first, p_last, spill.get());
    }
    for (int64_t lp = tid; lp < rank_panels; lp += threads) {
      const int64_t j0 = lp * nr;
      T* panel = packed_b.get() + (n_panels + lp) * K * nr;
      pack_block(low_rank->inner, j0, std::min<int64_t>(nr, rank - j0), 0, inner_depth, nr, panel);
      std::fill(panel + inner_depth * nr, panel + K * nr, T(0));
    }
  }

  const bool split_rows = m_panels >= 4 * num_threads || n_panels < num_threads;
#pragma omp parallel num_threads(num_threads)
  {
    const int threads = omp_get_num_threads();
    const int tid = omp_get_thread_num();
    int64_t m_begin = 0, m_end = M, p_begin = 0, p_end = n_panels;
    if (split_rows) {
      m_begin = std::min(M, m_panels * tid / threads * mr);
      m_end = std::min(M, m_panels * (tid + 1) / threads * mr);
    } else {
      p_begin = n_panels * tid / threads;
      p_end = n_panels * (tid + 1) / threads;
    }
    const int64_t n0 = p_begin * nr, n1 = std::min(N, p_end * nr);
    if (m_begin < m_end && n0 < n1) {
      // Row layout of the C scratch: this thread's columns, then the rank columns.
      const int64_t rank_col = (p_end - p_begin) * nr;
      const int64_t ldc = rank_col + rank_panels * nr + kSlack;
      // Packed A blocks (or, A read in place, only the rank-r products).
      AlignedBuffer<T> packed_a(kMC * std::max<int64_t>(in_place_a ? rank : std::max(std::min(kKC, K), rank), 1));
      AlignedBuffer<T> c(kMC * ldc + kSlack);
      std::vector<const T*> a_rows(in_place_a ? kMC : 0);
      for (int64_t mb = m_begin; mb < m_end; mb += kMC) {
        const int64_t rows = std::min(kMC, m_end - mb);
        const int64_t row_panels = (rows + mr - 1) / mr;
        if (K == 0) std::memset(c.get(), 0, sizeof(T) * (kMC * ldc));
        if constexpr (in_place_a) a.row_addresses(mb, rows, row_panels * mr, a_rows.data());
        for (int64_t pc = 0; pc < K; pc += kKC) {
          const int64_t kc = std::min(kKC, K - pc);
          if constexpr (!in_place_a) {
            a.pack(mb, rows, pc, kc, mr, packed_a.get());
            // Split by columns, every thread packs the same blocks: one reports them.
            if (on_packed_a && (split_rows || tid == 0)) (*on_packed_a)(mb, rows, pc, kc, packed_a.get(), tid);
          }
          // `depth` <= kc: the first entries of each A panel.
          auto run_panel = [&](int64_t jp, T* cp, int64_t depth) {
            const T* bp = packed_b.get() + jp * K * nr + pc * nr;
            for (int64_t ip = 0; ip < row_panels; ++ip) {
              if constexpr (in_place_a) {
                kern.tile_rows(depth, a_rows.data() + ip * mr, a.depth_offsets() + pc, bp, cp + ip * mr * ldc, ldc,
                               pc > 0);
              } else {
                kern.tile(depth, packed_a.get() + ip * kc * mr, bp, cp + ip * mr * ldc, ldc, pc > 0);
              }
            }
          };
          for (int64_t jp = p_begin; jp < p_end; ++jp) run_panel(jp, c.get() + (jp - p_begin) * nr, kc);
          // Rank columns: only depth below inner_depth adds to them (the inner
          // factor is zero beyond), so each block runs just that part; the
          // first block writes them even when it has none.
          if (pc == 0 || pc < inner_depth) {
            const int64_t rank_depth = std::clamp<int64_t>(inner_depth - pc, 0, kc);
            for (int64_t lp = 0; lp < rank_panels; ++lp) {
              run_panel(n_panels + lp, c.get() + rank_col + lp * nr, rank_depth);
            }
          }
        }
        if (rank > 0) {
          // The rank-r product of these rows becomes the depth of one more block.
          T* u = packed_a.get();
          const T scale = low_rank->scale;
          T* const save = split_rows || tid == 0 ? low_rank->save : nullptr;
          for (int64_t row = 0; row < row_panels * mr; ++row) {
            T* lane = u + (row / mr) * rank * mr + row % mr;  // (j, row) at lane[j * mr]
            const T* product = c.get() + row * ldc + rank_col;
            if (row < rows) {
              for (int64_t j = 0; j < rank; ++j) lane[j * mr] = scale * product[j];
              if (save) {
                for (int64_t j = 0; j < rank; ++j) save[(mb + row) * rank + j] = lane[j * mr];
              }
            } else {
              for (int64_t j = 0; j < rank; ++j) lane[j * mr] = T(0);
            }
          }
          for (int64_t jp = p_begin; jp < p_end; ++jp) {
            const T* bp = packed_outer.get() + jp * term_rank * nr;
            T* cp = c.get() + (jp - p_begin) * nr;
            for (int64_t ip = 0; ip < row_panels; ++ip) {
              kern.tile(rank, u + ip * rank * mr, bp, cp + ip * mr * ldc, ldc, true);
            }
          }
        }
        if constexpr (requires { finalize.write_block(mb, rows, c.get(), ldc, n0, n1); }) {
          finalize.write_block(mb, rows, c.get(), ldc, n0, n1);
        } else {
          for (int64_t i = 0; i < rows; ++i) finalize(mb + i, c.get() + i * ldc, n0, n1, tid);
        }
      }
    }
  }
}

}  // namespace spa_kernels::cpu
