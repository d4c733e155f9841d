// The GEMMs of each op, built from plain pointers and sizes (no CUDA, no torch).
//
// Notation (docs/design.md): x (M × in) or (N, C_in, *spatial), W, A (r × in),
// B (out × r), bias, S = in_idx, O = out_idx, s = scale.  Every op is a short
// list of GemmProblems (see gemm_problem.h) that the kernels run in order:
//
//   linear forward   T' = s·x_S A_Sᵀ           (M × r, the rank-r product)
//                    y_O = x_S W_OSᵀ + T' B_Oᵀ + b_O, zeros elsewhere (one launch)
//   linear backward  U' = s·dy_O B_O            (M × r)
//                    dx_S = dy_O W_OS + U' A_S, zeros elsewhere
//                    dA_S = U'ᵀ x_S,  dB_O = dy_Oᵀ T',  db_O = dy_Oᵀ 1,  dW_OS = dy_Oᵀ x_S
//   convolutions     the same with implicit-GEMM operands over (channel × tap);
//                    the adapter term reads the centre-tap input only.
//
// The rank-r intermediates T' and U' are stored in the operand dtype.  For 16-bit
// dtypes they are stored split, [hi | lo] (M × 2r) with hi + lo = the fp32 value
// to ~16 bits, and consumed by a second K phase over the lo half, so the adapter
// term keeps fp32 accuracy while running on the tensor cores.
//
// Index lists are int32 device arrays, sorted (the Python layer validates them).

#pragma once

#include <cstdint>
#include <string>

#include "gemm_problem.h"

namespace spa_cuda {

struct LinearArgs {
  const void* x = nullptr;       // (rows, in_features)
  const void* weight = nullptr;  // (out_features, in_features)
  const void* lora_a = nullptr;  // (rank, in_features) or null
  const void* lora_b = nullptr;  // (out_features, rank) or null
  const void* bias = nullptr;    // (out_features) or null
  const int32_t* in_idx = nullptr;   // (active_in) or null: all
  const int32_t* out_idx = nullptr;  // (active_out) or null: all
  int64_t rows = 0, in_features = 0, out_features = 0, rank = 0;
  int64_t active_in = 0, active_out = 0;
  float scale = 1.0f;
  int element_bytes = 4;
  bool split_intermediate = false;  // 16-bit: T', U' stored [hi | lo]
};

struct ConvArgs {
  const void* x = nullptr;        // (batch, in_channels, D, H, W)
  const void* weight = nullptr;   // (out_channels, in_channels, kd, kh, kw)
  const void* lora_a = nullptr;   // (rank, in_channels) or null
  const void* lora_b = nullptr;   // (out_channels, rank) or null
  const void* adapter = nullptr;  // SPPaRA (out_channels, in_channels) or null
  const void* bias = nullptr;
  const int32_t* in_idx = nullptr;
  const int32_t* out_idx = nullptr;
  int64_t batch = 0, in_channels = 0, out_channels = 0, rank = 0;
  int64_t active_in = 0, active_out = 0;
  int32_t input[kSpatialDims] = {1, 1, 1};   // conv1d/2d: leading dims 1
  int32_t kernel[kSpatialDims] = {1, 1, 1};
  int32_t output[kSpatialDims] = {1, 1, 1};
  int32_t stride[kSpatialDims] = {1, 1, 1};
  int32_t padding[kSpatialDims] = {0, 0, 0};
  int32_t dilation[kSpatialDims] = {1, 1, 1};
  float scale = 1.0f;
  int element_bytes = 4;
  bool split_intermediate = false;
};

// Outputs and scratch.  `intermediate` is (positions × intermediate_width) in the
// operand dtype; `one` points at a single element equal to 1 (the bias gradient
// is dy_Oᵀ·1).  Null outputs are not computed.
struct Gradients {
  void* grad_x = nullptr;
  void* grad_weight = nullptr;
  void* grad_lora_a = nullptr;
  void* grad_lora_b = nullptr;
  void* grad_adapter = nullptr;
  void* grad_bias = nullptr;
};

inline int64_t intermediate_width(int64_t rank, bool split) { return split ? 2 * rank : rank; }

// A null index pointer means "every channel", so an empty list (everything
// pruned) needs a pointer that is not null; it has no entries and is never read.
// A tensor with no elements may report a null data pointer: pass its lists through this.
inline const int32_t* index_list(const int32_t* data, int64_t count) {
  static const int32_t no_entries = 0;
  return count == 0 ? &no_entries : data;
}

// Problems of one op call, run in order.
constexpr int kMaxProblems = 8;
struct ProblemList {
  GemmProblem problems[kMaxProblems];
  int count = 0;
  GemmProblem& add() { return problems[count++]; }
};

// ------------------------------------------------------------------ checks

// An empty string when the sizes describe a valid call, else what is wrong
// (the binding raises it before any launch).
std::string check_linear_args(const LinearArgs& args);
std::string check_conv_args(const ConvArgs& args);

// ------------------------------------------------------------------ builders

ProblemList linear_forward_problems(const LinearArgs& args, void* y, void* intermediate);
// Two scratch buffers: U' (dx, dA) and T' (dB); either may be null when not needed.
ProblemList linear_backward_problems(const LinearArgs& args, const void* grad_out, const Gradients& grads,
                                     void* intermediate_u, void* intermediate_t, const void* one);
ProblemList conv_forward_problems(const ConvArgs& args, void* y, void* intermediate);
ProblemList conv_backward_problems(const ConvArgs& args, const void* grad_out, const Gradients& grads,
                                   void* intermediate_u, void* intermediate_t, const void* one);

}  // namespace spa_cuda

#include "op_problems_impl.h"
