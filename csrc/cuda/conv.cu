// SPLoRA / SPPaRA convolutions on the GPU: implicit GEMMs from op_problems_conv.h.

#include <cuda_runtime.h>

#include "spa_cuda.h"

namespace spa_cuda {

int conv_forward(const ConvArgs& args, void* y, void* intermediate, DType dtype, void* stream) {
  if (!check_conv_args(args).empty()) return int(cudaErrorInvalidValue);
  return run_problems(conv_forward_problems(args, y, intermediate), dtype, stream);
}

int conv_backward(const ConvArgs& args, const void* grad_out, const Gradients& grads, void* intermediate_u,
                  void* intermediate_t, const void* one, DType dtype, void* stream) {
  if (!check_conv_args(args).empty()) return int(cudaErrorInvalidValue);
  return run_problems(conv_backward_problems(args, grad_out, grads, intermediate_u, intermediate_t, one), dtype,
                      stream);
}

}  // namespace spa_cuda
