// Convolution geometry shared by the C++ kernels: the one place C++ computes an
// output size (the Python side has its own single copy in spa_kernels/_geometry.py).
#pragma once

#include <cstdint>

namespace spa_kernels::cpu {

// Length of one spatial output dimension, as torch.nn.Conv*d computes it; below 1
// when the input is too small for the kernel.
inline int64_t conv_output_size(int64_t size, int64_t kernel, int64_t stride, int64_t padding, int64_t dilation) {
  return (size + 2 * padding - dilation * (kernel - 1) - 1) / stride + 1;
}

}  // namespace spa_kernels::cpu
