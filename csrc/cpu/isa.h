// Run-time choice of the instruction set the float kernels use.
#pragma once

#include <string>
#include <vector>

#include "tile_kernels.h"

namespace spa_kernels::cpu {

// Instruction sets this CPU (and this build) can run, best first.
std::vector<std::string> supported_isas();
// The one in use: the best supported, unless overridden by set_isa or the
// SPA_KERNELS_CPU_ISA environment variable (read once, at first use).
std::string current_isa();
// Throws std::invalid_argument for a name that is unknown or unsupported here.
void set_isa(const std::string& name);

const TileKernels<float>& float_kernels();
const TileKernels<double>& double_kernels();

template <typename T>
const TileKernels<T>& kernels_for();
template <>
inline const TileKernels<float>& kernels_for<float>() { return float_kernels(); }
template <>
inline const TileKernels<double>& kernels_for<double>() { return double_kernels(); }

}  // namespace spa_kernels::cpu
