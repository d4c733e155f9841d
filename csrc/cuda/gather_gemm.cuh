// The gathered GEMM kernel: C = alpha·Σ_phases A·Bᵀ + bias through index maps.
//
// One block computes one active output tile (block_m × block_n) over every K
// phase, or zeroes one tile of pruned outputs (see gemm_problem.h).  Per tile
// the row points of A, B and the output are decoded once into shared memory;
// per K-step the K points (channel index lists, taps) are decoded once.  The
// adapter is a second K phase into the same fp32 accumulators.
//
// How the gathered channels are fed.  x (rows × in) and W (out × in) are
// row-major, so the active input channels S are a gather along the contiguous
// dimension of both operands.  The CUTLASS gather examples gather rows, which
// keeps 16-byte vector loads; a column gather cannot use cp.async or TMA, since
// an arbitrary channel list has no 16-byte runs.  The two choices were:
//   (a) a compaction pass writing x_S and W_OS densely, then a dense GEMM;
//   (b) gather while staging each K-step: lanes read single elements through
//       the K-step's decoded index list into registers (the next step's loads
//       are issued before this step's MMAs, so they overlap), then store them
//       into a padded K-major shared tile that feeds mma.sync.
// We take (b).  (a) writes and rereads x_S and W_OS on every call (the ops are
// stateless; x changes every call), which costs more DRAM traffic than the
// GEMM reads at keep ≥ 0.3, and it needs scratch the size of the activation.
// In (b) the lanes of a warp take consecutive K entries of one row, so with the
// usual keep ratios a warp's loads fall in a few 32-byte sectors and the DRAM
// traffic is that of the compacted GEMM; what is lost is load-issue rate,
// which the register prefetch hides behind the tensor cores.  A vector path
// for K-steps whose indices form one contiguous run is the next step.
//
// Tensor cores: bf16/fp16 use mma.sync.m16n8k16 (sm_80, also correct on
// sm_90); fp32 runs the same tiles on FMA units with the same accumulator
// layout (no TF32: fp32 results must match the fp32 reference to 1e-4).
// wgmma needs operand tiles in the layout TMA or a swizzled cp.async writes;
// with per-element gathers that staging is the bottleneck, so sm_90 runs the
// mma.sync path until a vector gather exists.

#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "gemm_problem.h"

namespace spa_cuda {

template <int BlockM, int BlockN, int WarpsM, int WarpsN, int BlockK>
struct TileConfig {
  static constexpr int kBlockM = BlockM, kBlockN = BlockN, kBlockK = BlockK;
  static constexpr int kWarpsM = WarpsM, kWarpsN = WarpsN;
  static constexpr int kThreads = 32 * WarpsM * WarpsN;
  static constexpr int kWarpTileM = BlockM / WarpsM, kWarpTileN = BlockN / WarpsN;
  static constexpr int kMmaTilesM = kWarpTileM / 16, kMmaTilesN = kWarpTileN / 8;
  // Padding of a shared row: 16 bytes, so the eight rows one fragment load
  // touches fall in different banks.
  template <typename Element>
  static constexpr int kRowStride = BlockK + 16 / int(sizeof(Element));
  static_assert(kWarpTileM % 16 == 0 && kWarpTileN % 8 == 0, "warp tile must hold whole mma tiles");
  static_assert((BlockM * BlockK) % kThreads == 0 && (BlockN * BlockK) % kThreads == 0, "even staging");
};

template <typename Element> struct ElementTraits;
template <> struct ElementTraits<float> {
  static constexpr bool kTensorCore = false;
  __device__ static float to_float(float v) { return v; }
  __device__ static float from_float(float v) { return v; }
};
template <> struct ElementTraits<__nv_bfloat16> {
  static constexpr bool kTensorCore = true;
  __device__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};
template <> struct ElementTraits<__half> {
  static constexpr bool kTensorCore = true;
  __device__ static float to_float(__half v) { return __half2float(v); }
  __device__ static __half from_float(float v) { return __float2half_rn(v); }
};

template <typename Element>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();  // built for sm_80 and newer only (see setup.py)
#endif
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();
#endif
}

// Shared memory of one block, carved from the dynamic allocation.
template <typename Element, typename Config>
struct SharedLayout {
  static constexpr int kRow = Config::template kRowStride<Element>;
  static constexpr size_t kTileA = size_t(Config::kBlockM) * kRow * sizeof(Element);
  static constexpr size_t kTileB = size_t(Config::kBlockN) * kRow * sizeof(Element);
  static constexpr size_t kPoints = (Config::kBlockM + Config::kBlockN + 4 * Config::kBlockK) * sizeof(AxisPoint);
  static constexpr size_t kFlags = Config::kBlockM + Config::kBlockN;
  static constexpr size_t kBytes = 2 * (kTileA + kTileB) + kPoints + ((kFlags + 15) / 16) * 16;

  // Base pointers only: double buffers are reached by arithmetic, since an
  // array of pointers indexed by the step's parity would live in local memory.
  Element* tile_a_base;
  Element* tile_b_base;
  AxisPoint* rows_a;  // kBlockM (also the output rows in the epilogue)
  AxisPoint* rows_b;  // kBlockN (also the output columns)
  AxisPoint* depth_base;  // the K-step's points: A buffer 0, A buffer 1, B buffer 0, B buffer 1
  uint8_t* active_rows;  // zero tiles: whether a row / column is active
  uint8_t* active_cols;

  __device__ explicit SharedLayout(unsigned char* base) {
    // AxisPoints first: they need 8-byte alignment; the tiles 4-byte.
    rows_a = reinterpret_cast<AxisPoint*>(base);
    rows_b = rows_a + Config::kBlockM;
    depth_base = rows_b + Config::kBlockN;
    unsigned char* tiles = base + kPoints;
    tile_a_base = reinterpret_cast<Element*>(tiles);
    tile_b_base = reinterpret_cast<Element*>(tiles + 2 * kTileA);
    active_rows = tiles + 2 * (kTileA + kTileB);
    active_cols = active_rows + Config::kBlockM;
  }

  __device__ Element* tile_a(int buffer) const { return tile_a_base + buffer * (kTileA / sizeof(Element)); }
  __device__ Element* tile_b(int buffer) const { return tile_b_base + buffer * (kTileB / sizeof(Element)); }
  __device__ AxisPoint* depth_a(int buffer) const { return depth_base + buffer * Config::kBlockK; }
  __device__ AxisPoint* depth_b(int buffer) const { return depth_base + (2 + buffer) * Config::kBlockK; }
};

template <bool Spatial>
__device__ __forceinline__ int64_t operand_offset(const OperandMap& op, const AxisPoint& row, const AxisPoint& k) {
  if constexpr (Spatial) {
    return element_offset(op, row, k);
  } else {
    return (row.offset | k.offset) < 0 ? -1 : row.offset + k.offset;
  }
}

// One operand's share of a K-step, held in registers between load and store.
template <typename Element, typename Config, int Rows>
struct StagedOperand {
  static constexpr int kCount = Rows * Config::kBlockK / Config::kThreads;
  Element values[kCount];

  // Which (row, k) of the tile the thread's e-th element is: lanes walk the
  // operand's contiguous direction so that a warp's loads share sectors.
  __device__ static void place(bool rows_contiguous, int e, int& row, int& k) {
    const int linear = threadIdx.x + e * Config::kThreads;
    if (rows_contiguous) {
      row = linear % Rows;
      k = linear / Rows;
    } else {
      k = linear % Config::kBlockK;
      row = linear / Config::kBlockK;
    }
  }

  template <bool Spatial>
  __device__ void load(const OperandMap& op, const AxisPoint* rows, const AxisPoint* depth) {
    const Element* data = static_cast<const Element*>(op.data);
#pragma unroll
    for (int e = 0; e < kCount; ++e) {
      int row, k;
      place(op.rows_contiguous, e, row, k);
      const int64_t offset = operand_offset<Spatial>(op, rows[row], depth[k]);
      values[e] = offset >= 0 ? data[offset] : ElementTraits<Element>::from_float(0.0f);
    }
  }

  __device__ void store(bool rows_contiguous, Element* tile) const {
    constexpr int kRow = Config::template kRowStride<Element>;
#pragma unroll
    for (int e = 0; e < kCount; ++e) {
      int row, k;
      place(rows_contiguous, e, row, k);
      tile[row * kRow + k] = values[e];
    }
  }
};

template <typename Config>
struct Accumulators {
  float c[Config::kMmaTilesM][Config::kMmaTilesN][4];
};

// acc += A_tile · B_tileᵀ for one K-step, with the mma.sync accumulator layout:
// c[i][j][e] is row g + 8·(e / 2), column 2·t + e % 2 of mma tile (i, j),
// g = lane / 4, t = lane % 4.
template <typename Element, typename Config>
__device__ __forceinline__ void multiply_tile(Accumulators<Config>& acc, const Element* tile_a, const Element* tile_b,
                                              int warp_row, int warp_col, int lane) {
  constexpr int kRow = Config::template kRowStride<Element>;
  const int g = lane >> 2, t = lane & 3;
  if constexpr (ElementTraits<Element>::kTensorCore) {
#pragma unroll
    for (int kk = 0; kk < Config::kBlockK; kk += 16) {
      uint32_t a[Config::kMmaTilesM][4];
      uint32_t b[Config::kMmaTilesN][2];
#pragma unroll
      for (int i = 0; i < Config::kMmaTilesM; ++i) {
        const Element* base = tile_a + (warp_row + i * 16 + g) * kRow + kk + 2 * t;
        a[i][0] = *reinterpret_cast<const uint32_t*>(base);
        a[i][1] = *reinterpret_cast<const uint32_t*>(base + 8 * kRow);
        a[i][2] = *reinterpret_cast<const uint32_t*>(base + 8);
        a[i][3] = *reinterpret_cast<const uint32_t*>(base + 8 * kRow + 8);
      }
#pragma unroll
      for (int j = 0; j < Config::kMmaTilesN; ++j) {
        const Element* base = tile_b + (warp_col + j * 8 + g) * kRow + kk + 2 * t;
        b[j][0] = *reinterpret_cast<const uint32_t*>(base);
        b[j][1] = *reinterpret_cast<const uint32_t*>(base + 8);
      }
#pragma unroll
      for (int i = 0; i < Config::kMmaTilesM; ++i)
#pragma unroll
        for (int j = 0; j < Config::kMmaTilesN; ++j) mma_16816<Element>(acc.c[i][j], a[i], b[j]);
    }
  } else {
#pragma unroll 4
    for (int kk = 0; kk < Config::kBlockK; ++kk) {
      float a[Config::kMmaTilesM][2], b[Config::kMmaTilesN][2];
#pragma unroll
      for (int i = 0; i < Config::kMmaTilesM; ++i) {
        a[i][0] = tile_a[(warp_row + i * 16 + g) * kRow + kk];
        a[i][1] = tile_a[(warp_row + i * 16 + g + 8) * kRow + kk];
      }
#pragma unroll
      for (int j = 0; j < Config::kMmaTilesN; ++j) {
        b[j][0] = tile_b[(warp_col + j * 8 + 2 * t) * kRow + kk];
        b[j][1] = tile_b[(warp_col + j * 8 + 2 * t + 1) * kRow + kk];
      }
#pragma unroll
      for (int i = 0; i < Config::kMmaTilesM; ++i)
#pragma unroll
        for (int j = 0; j < Config::kMmaTilesN; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc.c[i][j][e] = fmaf(a[i][e >> 1], b[j][e & 1], acc.c[i][j][e]);
    }
  }
}

template <typename Config>
__device__ __forceinline__ void stage_depth(const OperandMap& a, const OperandMap& b, int64_t k0,
                                            AxisPoint* depth_a, AxisPoint* depth_b) {
  const int i = threadIdx.x;
  if (i < Config::kBlockK) {
    depth_a[i] = axis_point(a.depth, k0 + i);
  } else if (i < 2 * Config::kBlockK) {
    depth_b[i - Config::kBlockK] = axis_point(b.depth, k0 + i - Config::kBlockK);
  }
}

// One K phase of an active tile: acc += A[m0:, :k] · B[n0:, :k]ᵀ.
template <typename Element, typename Config, bool SpatialA, bool SpatialB>
__device__ __forceinline__ void run_phase(const OperandMap& a, const OperandMap& b, int64_t k_extent, int64_t m0,
                                          int64_t n0, Accumulators<Config>& acc, SharedLayout<Element, Config>& s,
                                          int warp_row, int warp_col, int lane) {
  const int64_t steps = ceil_div(k_extent, Config::kBlockK);
  if (steps == 0) return;
  __syncthreads();  // the previous phase or tile may still read the row points
  for (int i = threadIdx.x; i < Config::kBlockM; i += Config::kThreads) s.rows_a[i] = axis_point(a.rows, m0 + i);
  for (int i = threadIdx.x; i < Config::kBlockN; i += Config::kThreads) s.rows_b[i] = axis_point(b.rows, n0 + i);
  stage_depth<Config>(a, b, 0, s.depth_a(0), s.depth_b(0));
  __syncthreads();

  StagedOperand<Element, Config, Config::kBlockM> staged_a;
  StagedOperand<Element, Config, Config::kBlockN> staged_b;
  staged_a.template load<SpatialA>(a, s.rows_a, s.depth_a(0));
  staged_b.template load<SpatialB>(b, s.rows_b, s.depth_b(0));
  staged_a.store(a.rows_contiguous, s.tile_a(0));
  staged_b.store(b.rows_contiguous, s.tile_b(0));
  if (steps > 1) stage_depth<Config>(a, b, Config::kBlockK, s.depth_a(1), s.depth_b(1));
  __syncthreads();

  for (int64_t step = 0; step < steps; ++step) {
    const int current = int(step & 1), next = current ^ 1;
    const bool more = step + 1 < steps;
    if (more) {  // issue the next step's gathers before this step's MMAs
      staged_a.template load<SpatialA>(a, s.rows_a, s.depth_a(next));
      staged_b.template load<SpatialB>(b, s.rows_b, s.depth_b(next));
    }
    multiply_tile<Element, Config>(acc, s.tile_a(current), s.tile_b(current), warp_row, warp_col, lane);
    if (more) {
      staged_a.store(a.rows_contiguous, s.tile_a(next));
      staged_b.store(b.rows_contiguous, s.tile_b(next));
    }
    if (step + 2 < steps) stage_depth<Config>(a, b, (step + 2) * Config::kBlockK, s.depth_a(current), s.depth_b(current));
    __syncthreads();
  }
}

template <typename Element>
__device__ __forceinline__ void store_output(Element* data, int64_t offset, int64_t split_offset, float value) {
  const Element hi = ElementTraits<Element>::from_float(value);
  data[offset] = hi;
  if (split_offset != 0) data[offset + split_offset] = ElementTraits<Element>::from_float(value - ElementTraits<Element>::to_float(hi));
}

template <typename Element, typename Config>
__device__ __forceinline__ void write_tile(const OutputMap& out, int64_t m, int64_t n, int64_t m0, int64_t n0,
                                           const Accumulators<Config>& acc, SharedLayout<Element, Config>& s,
                                           int warp_row, int warp_col, int lane) {
  __syncthreads();  // the row points are reused for the output
  float* bias_values = reinterpret_cast<float*>(s.tile_a(0));  // the tiles are free now
  for (int i = threadIdx.x; i < Config::kBlockM; i += Config::kThreads) s.rows_a[i] = axis_point(out.rows, m0 + i);
  for (int i = threadIdx.x; i < Config::kBlockN; i += Config::kThreads) {
    s.rows_b[i] = axis_point(out.cols, n0 + i);
    float bias = 0.0f;
    if (out.bias != nullptr && n0 + i < n) {
      const int64_t outer = (n0 + i) / inner_points(out.cols);
      const int64_t channel = out.cols.index != nullptr ? int64_t(out.cols.index[outer]) : outer;
      bias = ElementTraits<Element>::to_float(static_cast<const Element*>(out.bias)[channel]);
    }
    bias_values[i] = bias;
  }
  __syncthreads();
  Element* data = static_cast<Element*>(out.data);
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int i = 0; i < Config::kMmaTilesM; ++i)
#pragma unroll
    for (int j = 0; j < Config::kMmaTilesN; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = warp_row + i * 16 + g + 8 * (e >> 1);
        const int col = warp_col + j * 8 + 2 * t + (e & 1);
        if (m0 + row < m && n0 + col < n) {
          const float value = out.alpha * acc.c[i][j][e] + bias_values[col];
          store_output(data, s.rows_a[row].offset + s.rows_b[col].offset, out.split_offset, value);
        }
      }
}

// Zeroes the pruned outputs of one tile of the full output.
template <typename Element, typename Config>
__device__ __forceinline__ void zero_tile(const OutputMap& out, int64_t row_tile, int64_t col_tile,
                                          SharedLayout<Element, Config>& s) {
  const int64_t full_rows = out.rows.full_count * inner_points(out.rows);
  const int64_t full_cols = out.cols.full_count * inner_points(out.cols);
  const int64_t r0 = row_tile * Config::kBlockM, c0 = col_tile * Config::kBlockN;
  const int64_t r_end = r0 + Config::kBlockM < full_rows ? r0 + Config::kBlockM : full_rows;
  const int64_t c_end = c0 + Config::kBlockN < full_cols ? c0 + Config::kBlockN : full_cols;
  if (zero_tile_fully_active(out, r0, r_end, c0, c_end)) return;  // same answer in every thread
  __syncthreads();
  for (int i = threadIdx.x; i < Config::kBlockM; i += Config::kThreads) {
    s.rows_a[i] = axis_point(out.rows, r0 + i, false);
    s.active_rows[i] = r0 + i < r_end && full_position_is_active(out.rows, r0 + i);
  }
  for (int i = threadIdx.x; i < Config::kBlockN; i += Config::kThreads) {
    s.rows_b[i] = axis_point(out.cols, c0 + i, false);
    s.active_cols[i] = c0 + i < c_end && full_position_is_active(out.cols, c0 + i);
  }
  __syncthreads();
  Element* data = static_cast<Element*>(out.data);
  const Element zero = ElementTraits<Element>::from_float(0.0f);
  // Lanes walk the output's contiguous direction.
  const bool rows_fast = out.rows.inner_stride[2] == 1 || out.rows.outer_stride == 1;
  for (int e = threadIdx.x; e < Config::kBlockM * Config::kBlockN; e += Config::kThreads) {
    const int row = rows_fast ? e % Config::kBlockM : e / Config::kBlockN;
    const int col = rows_fast ? e / Config::kBlockM : e % Config::kBlockN;
    if (r0 + row < r_end && c0 + col < c_end && !(s.active_rows[row] && s.active_cols[col])) {
      const int64_t offset = s.rows_a[row].offset + s.rows_b[col].offset;
      data[offset] = zero;
      if (out.split_offset != 0) data[offset + out.split_offset] = zero;
    }
  }
}

template <typename Element, typename Config, bool SpatialA, bool SpatialB>
__global__ void __launch_bounds__(Config::kThreads)
    gathered_gemm_kernel(const __grid_constant__ GemmProblem problem, const __grid_constant__ TilePlan plan) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  SharedLayout<Element, Config> s(shared_bytes);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_row = (warp / Config::kWarpsN) * Config::kWarpTileM;
  const int warp_col = (warp % Config::kWarpsN) * Config::kWarpTileN;

  for (int64_t tile = blockIdx.x; tile < plan.total_tiles; tile += gridDim.x) {
    const TileCoordinate where = tile_coordinate(plan, tile);
    if (where.zero) {
      zero_tile<Element, Config>(problem.output, where.row_tile, where.col_tile, s);
      __syncthreads();
      continue;
    }
    const int64_t m0 = where.row_tile * Config::kBlockM, n0 = where.col_tile * Config::kBlockN;
    Accumulators<Config> acc;
#pragma unroll
    for (int i = 0; i < Config::kMmaTilesM; ++i)
#pragma unroll
      for (int j = 0; j < Config::kMmaTilesN; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc.c[i][j][e] = 0.0f;
    run_phase<Element, Config, SpatialA, SpatialB>(problem.a[0], problem.b[0], problem.k[0], m0, n0, acc, s,
                                                   warp_row, warp_col, lane);
    if (problem.phases > 1)
      run_phase<Element, Config, SpatialA, SpatialB>(problem.a[1], problem.b[1], problem.k[1], m0, n0, acc, s,
                                                     warp_row, warp_col, lane);
    write_tile<Element, Config>(problem.output, problem.m, problem.n, m0, n0, acc, s, warp_row, warp_col, lane);
    __syncthreads();
  }
}

}  // namespace spa_cuda
