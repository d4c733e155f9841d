#include "index_bounds.h"

#include <algorithm>

namespace spa_kernels::cpu {
namespace {

template <typename I>
std::tuple<int64_t, int64_t, bool> bounds_of(const I* values, int64_t n, int64_t stride) {
  bool increasing = true;
  for (int64_t i = 1; i < n && increasing; ++i) increasing = values[i * stride] > values[(i - 1) * stride];
  if (increasing) return {values[0], values[(n - 1) * stride], true};
  int64_t low = values[0], high = values[0];
  for (int64_t i = 1; i < n; ++i) {
    low = std::min<int64_t>(low, values[i * stride]);
    high = std::max<int64_t>(high, values[i * stride]);
  }
  return {low, high, false};
}

}  // namespace

std::tuple<int64_t, int64_t, bool> index_bounds(const at::Tensor& idx) {
  TORCH_CHECK_VALUE(idx.device().is_cpu() && idx.dim() == 1 && idx.numel() > 0,
                    "index_bounds needs a non-empty 1-D CPU tensor");
  const int64_t n = idx.numel(), stride = idx.stride(0);
  switch (idx.scalar_type()) {
    case at::kLong:
      return bounds_of(idx.const_data_ptr<int64_t>(), n, stride);
    case at::kInt:
      return bounds_of(idx.const_data_ptr<int32_t>(), n, stride);
    default:
      TORCH_CHECK_TYPE(false, "index_bounds needs int32 or int64 indices, got ", idx.scalar_type());
  }
}

}  // namespace spa_kernels::cpu
