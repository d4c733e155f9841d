// The plain C++ interface of the CUDA kernels: pointers, sizes, a stream.
//
// No torch and no CUDA types here, so the binding (binding.cpp) and the host
// tests include it freely.  Every entry point returns a cudaError_t value
// (0 = success); arguments are checked by check_linear_args/check_conv_args
// (op_problems.h), which the binding calls first.

#pragma once

#include <cstdint>

#include "op_problems.h"

namespace spa_cuda {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

inline int element_bytes(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

// 16-bit operands keep the rank-r intermediates split into [hi | lo].
inline bool splits_intermediate(DType dtype) { return dtype != DType::kFloat32; }

// Runs one problem (all its phases, its zero tiles) on `stream` (a cudaStream_t).
int run_problem(const GemmProblem& problem, DType dtype, void* stream);
int run_problems(const ProblemList& list, DType dtype, void* stream);

// y (rows × out) written in full, pruned outputs zeroed; `intermediate` holds
// rows × intermediate_width(rank, split) elements when an adapter is given.
int splora_linear_forward(const LinearArgs& args, void* y, void* intermediate, DType dtype, void* stream);
// Gradients left null are not computed; `one` is one element equal to 1 (for
// the bias gradient); the intermediates as in the forward.
int splora_linear_backward(const LinearArgs& args, const void* grad_out, const Gradients& grads,
                           void* intermediate_u, void* intermediate_t, const void* one, DType dtype, void* stream);

// The same for SPLoRA and SPPaRA convolutions (1d, 2d, 3d as (1, 1, W), (1, H, W), (D, H, W));
// intermediates hold batch · output positions × intermediate_width elements.
int conv_forward(const ConvArgs& args, void* y, void* intermediate, DType dtype, void* stream);
int conv_backward(const ConvArgs& args, const void* grad_out, const Gradients& grads, void* intermediate_u,
                  void* intermediate_t, const void* one, DType dtype, void* stream);

}  // namespace spa_cuda
