// splora_linear on the GPU: the problems of op_problems.h, run in order on one stream.

#include <cuda_runtime.h>

#include "spa_cuda.h"

namespace spa_cuda {

int splora_linear_forward(const LinearArgs& args, void* y, void* intermediate, DType dtype, void* stream) {
  if (!check_linear_args(args).empty()) return int(cudaErrorInvalidValue);
  return run_problems(linear_forward_problems(args, y, intermediate), dtype, stream);
}

int splora_linear_backward(const LinearArgs& args, const void* grad_out, const Gradients& grads,
                           void* intermediate_u, void* intermediate_t, const void* one, DType dtype, void* stream) {
  if (!check_linear_args(args).empty()) return int(cudaErrorInvalidValue);
  return run_problems(linear_backward_problems(args, grad_out, grads, intermediate_u, intermediate_t, one), dtype,
                      stream);
}

}  // namespace spa_cuda
