// The index maps and the tile plan of the gathered GEMMs behind every CUDA op.
//
// Each op of the cuda backend is a few GEMMs C = A·B whose operands and output
// are not plain matrices but views of the caller's tensors: channels picked by
// an index list, convolution taps, padding.  One description serves them all:
//
//   * an AxisMap turns an index i along one GEMM axis into an element offset
//     and, for convolutions, a spatial coordinate (kept apart so that padding
//     can be bounds-checked);
//   * an OperandMap pairs the row axis and the reduction (K) axis of A or B;
//     the element at (row, k) is valid when the summed coordinate falls inside
//     the tensor, and sits at row.offset + k.offset + coordinate·strides;
//   * an OutputMap pairs the output's row and column axes; an axis with an
//     index list has a complement (the pruned channels) that the same launch
//     writes zeros to;
//   * a TilePlan numbers the launched blocks: active tiles first, then zero
//     tiles over the full output, which return at once where every element
//     they cover is active.
//
// This header has no CUDA or torch dependency: the kernels include it, and the
// host tests compile it with a plain C++ compiler and run the same maps on the
// CPU.  All offsets are 64-bit; a channel index fits 32 bits (checked).

#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SPA_HOST_DEVICE __host__ __device__ __forceinline__
#define SPA_UNROLL _Pragma("unroll")
#else
#define SPA_HOST_DEVICE inline
#define SPA_UNROLL
#endif

namespace spa_cuda {

constexpr int kSpatialDims = 3;  // conv1d/2d use (1, 1, W) / (1, H, W)
// A coordinate this negative fails every bounds check: marks rows past the end.
constexpr int32_t kInvalidCoordinate = -(1 << 29);

// One GEMM axis.  Index i splits into an outer part (a channel, a row, a batch
// sample: looked up through `index` when given) and an inner point of the box
// `inner` (taps of a kernel, positions of an image).
struct AxisMap {
  int64_t count = 0;              // indices along the axis: the GEMM extent
  const int32_t* index = nullptr;  // outer part through this list (sorted), or the identity
  int64_t index_count = 0;         // entries of `index` (the active channels)
  int64_t full_count = 0;          // outer extent without the list (for zeroing the complement)
  int64_t outer_stride = 0;        // elements between consecutive outer values
  int32_t inner[kSpatialDims] = {1, 1, 1};
  int64_t inner_stride[kSpatialDims] = {0, 0, 0};  // folded into the offset
  int32_t coordinate_scale[kSpatialDims] = {0, 0, 0};  // kept apart for bounds checks
  int32_t coordinate_shift[kSpatialDims] = {0, 0, 0};
};

struct AxisPoint {
  int64_t offset;  // negative: no element (past the end of the axis)
  int32_t coordinate[kSpatialDims];
};

SPA_HOST_DEVICE int64_t inner_points(const AxisMap& axis) {
  return int64_t(axis.inner[0]) * axis.inner[1] * axis.inner[2];
}

// Where index i of `axis` points.  through_index = false reads the outer part
// as a position of the full axis (zero tiles walk the full output this way).
SPA_HOST_DEVICE AxisPoint axis_point(const AxisMap& axis, int64_t i, bool through_index = true) {
  AxisPoint point;
  const int64_t points = inner_points(axis);
  const int64_t limit = through_index ? axis.count : axis.full_count * points;
  if (i < 0 || i >= limit) {
    point.offset = -1;
    SPA_UNROLL
    for (int d = 0; d < kSpatialDims; ++d) point.coordinate[d] = kInvalidCoordinate;
    return point;
  }
  int64_t outer, rest;
  if (points == 1) {
    outer = i;
    rest = 0;
  } else {
    outer = i / points;
    rest = i - outer * points;
  }
  // 32-bit arithmetic for the inner box: its extent is a kernel or an image, < 2^31.
  const int32_t inner_rest = int32_t(rest);
  const int32_t w = inner_rest % axis.inner[2];
  const int32_t h = (inner_rest / axis.inner[2]) % axis.inner[1];
  const int32_t d = inner_rest / (axis.inner[2] * axis.inner[1]);
  const int32_t box[kSpatialDims] = {d, h, w};
  const int64_t outer_value = (through_index && axis.index != nullptr) ? int64_t(axis.index[outer]) : outer;
  point.offset = outer_value * axis.outer_stride;
  SPA_UNROLL
  for (int k = 0; k < kSpatialDims; ++k) {
    point.offset += int64_t(box[k]) * axis.inner_stride[k];
    point.coordinate[k] = box[k] * axis.coordinate_scale[k] + axis.coordinate_shift[k];
  }
  return point;
}

// Operand A (M × K) or B (N × K, i.e. B transposed: both read row by row).
struct OperandMap {
  const void* data = nullptr;
  AxisMap rows;
  AxisMap depth;  // the reduction axis K
  bool spatial = false;  // bounds-check the summed coordinates (convolution operands)
  bool rows_contiguous = false;  // memory runs along rows, not K: lanes walk rows when loading
  int32_t extent[kSpatialDims] = {1, 1, 1};
  int32_t divisor[kSpatialDims] = {1, 1, 1};  // >1: input-gradient taps that land between strided outputs
  int64_t spatial_stride[kSpatialDims] = {0, 0, 0};
};

// The element offset of (row, k), or -1 where the operand reads zero (padding,
// a tap between strides, a row or k past the end).
SPA_HOST_DEVICE int64_t element_offset(const OperandMap& operand, const AxisPoint& row, const AxisPoint& k) {
  if ((row.offset | k.offset) < 0) return -1;
  int64_t offset = row.offset + k.offset;
  if (!operand.spatial) return offset;
  SPA_UNROLL
  for (int d = 0; d < kSpatialDims; ++d) {
    int32_t q = row.coordinate[d] + k.coordinate[d];
    if (q < 0) return -1;
    if (operand.divisor[d] != 1) {
      if (q % operand.divisor[d] != 0) return -1;
      q /= operand.divisor[d];
    }
    if (q >= operand.extent[d]) return -1;
    offset += int64_t(q) * operand.spatial_stride[d];
  }
  return offset;
}

struct OutputMap {
  void* data = nullptr;
  AxisMap rows;
  AxisMap cols;
  const void* bias = nullptr;  // added per column: bias[outer index of the column]
  float alpha = 1.0f;          // multiplies the product (not the bias)
  // Nonzero: 16-bit outputs are written as a pair, hi at the offset and the rounding
  // remainder lo at offset + split_offset, so a rank-r intermediate keeps ~16 bits.
  int64_t split_offset = 0;
};

// One GEMM: C = alpha·(A·Bᵀ over every phase) + bias, scattered through `output`.
// A second phase accumulates into the same registers: the adapter's rank-r
// term (fused), or the rounding remainder of a split intermediate.
constexpr int kMaxPhases = 2;
struct GemmProblem {
  int64_t m = 0, n = 0;
  int phases = 1;
  int64_t k[kMaxPhases] = {0, 0};
  OperandMap a[kMaxPhases];
  OperandMap b[kMaxPhases];
  OutputMap output;
};

// ------------------------------------------------------------------ tile plan

struct TileShape {
  int block_m, block_n, block_k;
};

struct TilePlan {
  int64_t row_tiles = 0, col_tiles = 0, active_tiles = 0;
  int64_t zero_row_tiles = 0, zero_col_tiles = 0, zero_tiles = 0;
  int64_t total_tiles = 0;
};

SPA_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

SPA_HOST_DEVICE bool has_complement(const AxisMap& axis) {
  return axis.index != nullptr && axis.index_count < axis.full_count;
}

// Zero tiles exist only when an output axis has pruned entries; they cover the
// full output (rows × cols over every channel) in tiles of the same shape.
SPA_HOST_DEVICE TilePlan make_tile_plan(const GemmProblem& problem, TileShape shape) {
  TilePlan plan;
  plan.row_tiles = ceil_div(problem.m, shape.block_m);
  plan.col_tiles = ceil_div(problem.n, shape.block_n);
  plan.active_tiles = plan.row_tiles * plan.col_tiles;
  const OutputMap& out = problem.output;
  if (has_complement(out.rows) || has_complement(out.cols)) {
    plan.zero_row_tiles = ceil_div(out.rows.full_count * inner_points(out.rows), shape.block_m);
    plan.zero_col_tiles = ceil_div(out.cols.full_count * inner_points(out.cols), shape.block_n);
    plan.zero_tiles = plan.zero_row_tiles * plan.zero_col_tiles;
  }
  plan.total_tiles = plan.active_tiles + plan.zero_tiles;
  return plan;
}

struct TileCoordinate {
  bool zero;  // a zero tile over the full output, not a GEMM tile
  int64_t row_tile, col_tile;
};

// Consecutive blocks share a column tile (a panel of B, the weight) and walk
// down the rows, so a panel is read from DRAM once and from L2 after.
SPA_HOST_DEVICE TileCoordinate tile_coordinate(const TilePlan& plan, int64_t tile) {
  TileCoordinate c;
  c.zero = tile >= plan.active_tiles;
  if (!c.zero) {
    c.col_tile = tile / plan.row_tiles;
    c.row_tile = tile - c.col_tile * plan.row_tiles;
  } else {
    const int64_t z = tile - plan.active_tiles;
    c.col_tile = z / plan.zero_row_tiles;
    c.row_tile = z - c.col_tile * plan.zero_row_tiles;
  }
  return c;
}

// Blocks launched for a plan: one per tile up to a cap; blocks then stride over tiles.
constexpr int64_t kMaxGridBlocks = int64_t(1) << 30;
SPA_HOST_DEVICE int64_t grid_blocks(const TilePlan& plan) {
  return plan.total_tiles < kMaxGridBlocks ? plan.total_tiles : kMaxGridBlocks;
}

// Whether full-axis position `outer` is listed in the sorted `axis.index`.
SPA_HOST_DEVICE bool outer_is_active(const AxisMap& axis, int64_t outer) {
  if (axis.index == nullptr) return true;
  int64_t lo = 0, hi = axis.index_count;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (int64_t(axis.index[mid]) < outer) lo = mid + 1; else hi = mid;
  }
  return lo < axis.index_count && int64_t(axis.index[lo]) == outer;
}

// Entries of the sorted list in [first, last): lets a zero tile skip itself
// when every position it covers is active.
SPA_HOST_DEVICE int64_t active_in_range(const AxisMap& axis, int64_t first, int64_t last) {
  if (axis.index == nullptr) return last - first;
  auto lower_bound = [&](int64_t value) {
    int64_t lo = 0, hi = axis.index_count;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (int64_t(axis.index[mid]) < value) lo = mid + 1; else hi = mid;
    }
    return lo;
  };
  return lower_bound(last) - lower_bound(first);
}

// Whether full-output position i of an output axis is active (its outer part listed).
SPA_HOST_DEVICE bool full_position_is_active(const AxisMap& axis, int64_t i) {
  return outer_is_active(axis, i / inner_points(axis));
}

// Whether a zero tile covering full positions [first, last) of both axes has nothing to zero.
SPA_HOST_DEVICE bool zero_tile_fully_active(const OutputMap& out, int64_t row_first, int64_t row_last,
                                            int64_t col_first, int64_t col_last) {
  auto all_active = [](const AxisMap& axis, int64_t first, int64_t last) {
    const int64_t points = inner_points(axis);
    const int64_t outer_first = first / points, outer_last = (last - 1) / points + 1;
    return active_in_range(axis, outer_first, outer_last) == outer_last - outer_first;
  };
  return all_active(out.rows, row_first, row_last) && all_active(out.cols, col_first, col_last);
}

}  // namespace spa_cuda
