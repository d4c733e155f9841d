// Instantiations of the gathered GEMM and the launch of one problem.

#include <cuda_runtime.h>

#include "gather_gemm.cuh"
#include "spa_cuda.h"

namespace spa_cuda {
namespace {

// Large tiles for the main GEMMs; small ones where an extent is a rank or a
// handful of channels (the rank-r products, the adapter gradients), so that
// more blocks share the work.
using LargeTiles = TileConfig<128, 128, 2, 4, 16>;
using SmallTiles = TileConfig<64, 64, 2, 2, 32>;

template <typename Element, typename Config, bool SpatialA, bool SpatialB>
int launch(const GemmProblem& problem, cudaStream_t stream) {
  const TilePlan plan = make_tile_plan(problem, TileShape{Config::kBlockM, Config::kBlockN, Config::kBlockK});
  if (plan.total_tiles == 0) return int(cudaSuccess);
  constexpr size_t shared_bytes = SharedLayout<Element, Config>::kBytes;
  auto kernel = gathered_gemm_kernel<Element, Config, SpatialA, SpatialB>;
  // Above 48 KiB of dynamic shared memory a kernel must opt in; cheap, so done every launch
  // (a static flag would be per device, and several devices may be used).
  cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared_bytes));
  if (status != cudaSuccess) return int(status);
  kernel<<<dim3(unsigned(grid_blocks(plan))), dim3(Config::kThreads), shared_bytes, stream>>>(problem, plan);
  return int(cudaGetLastError());
}

bool any_spatial(const OperandMap* operands, int phases) {
  for (int p = 0; p < phases; ++p)
    if (operands[p].spatial) return true;
  return false;
}

template <typename Element, typename Config>
int launch_tiles(const GemmProblem& problem, cudaStream_t stream) {
  const bool spatial_a = any_spatial(problem.a, problem.phases);
  const bool spatial_b = any_spatial(problem.b, problem.phases);
  if (spatial_a && spatial_b) return int(cudaErrorInvalidValue);  // no op builds this
  if (spatial_a) return launch<Element, Config, true, false>(problem, stream);
  if (spatial_b) return launch<Element, Config, false, true>(problem, stream);
  return launch<Element, Config, false, false>(problem, stream);
}

template <typename Element>
int launch_element(const GemmProblem& problem, cudaStream_t stream) {
  if (problem.m <= 64 || problem.n <= 64) return launch_tiles<Element, SmallTiles>(problem, stream);
  return launch_tiles<Element, LargeTiles>(problem, stream);
}

}  // namespace

int run_problem(const GemmProblem& problem, DType dtype, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32: return launch_element<float>(problem, s);
    case DType::kBFloat16: return launch_element<__nv_bfloat16>(problem, s);
    case DType::kFloat16: return launch_element<__half>(problem, s);
  }
  return int(cudaErrorInvalidValue);
}

int run_problems(const ProblemList& list, DType dtype, void* stream) {
  for (int i = 0; i < list.count; ++i) {
    const int status = run_problem(list.problems[i], dtype, stream);
    if (status != 0) return status;
  }
  return 0;
}

}  // namespace spa_cuda
