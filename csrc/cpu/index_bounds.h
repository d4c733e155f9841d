// Range and order of an index list, read on the host for the Python checks.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

namespace spa_kernels::cpu {

// (smallest, largest, strictly increasing) of a non-empty 1-D int32/int64 CPU
// tensor, any stride.  The Python argument checks call this once per index
// list: one call into compiled code costs less than the NumPy operations
// that answer the same questions, above all when the caches are cold.
std::tuple<int64_t, int64_t, bool> index_bounds(const at::Tensor& idx);

}  // namespace spa_kernels::cpu
