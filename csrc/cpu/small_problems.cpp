#include "small_problems.h"

#include <stdexcept>

namespace spa_kernels::cpu {
namespace {

// An 8 -> 8 linear at batch 256 (16384 multiply-adds) stays below it; the
// GEMM engine's fixed cost is a few microseconds, a few 10^4 multiply-adds.
std::atomic<int64_t> limit{32768};

}  // namespace

int64_t small_problem_limit() { return limit.load(std::memory_order_relaxed); }

void set_small_problem_limit(int64_t macs) {
  if (macs < 0) throw std::invalid_argument("the small-problem limit must be >= 0 multiply-adds");
  limit.store(macs, std::memory_order_relaxed);
}

}  // namespace spa_kernels::cpu
