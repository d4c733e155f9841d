// The cpu kernels that other translation units call: each is registered as a
// torch.ops.spa_kernels_cpu op in its own file, and autograd.cpp composes them
// into ops that carry their own C++ autograd (declared last; module.cpp also
// binds those for eager calls from Python, which skip the dispatcher's argument
// parsing).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

namespace spa_kernels::cpu {

at::Tensor splora_linear_forward(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& lora_a, const std::optional<at::Tensor>& lora_b,
                                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& in_idx,
                                 const std::optional<at::Tensor>& out_idx, double scale, bool compact_input,
                                 bool compact_output);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> splora_linear_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& lora_a, const std::optional<at::Tensor>& lora_b,
    const std::optional<at::Tensor>& in_idx, const std::optional<at::Tensor>& out_idx, double scale,
    std::array<bool, 5> output_mask, bool compact_input, bool compact_output);

at::Tensor conv_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& lora_a,
                        const std::optional<at::Tensor>& lora_b, const std::optional<at::Tensor>& adapter,
                        const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& in_idx,
                        const std::optional<at::Tensor>& out_idx, at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, double scale, bool compact_input, bool compact_output);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& lora_a, const std::optional<at::Tensor>& lora_b,
    const std::optional<at::Tensor>& adapter, const std::optional<at::Tensor>& in_idx,
    const std::optional<at::Tensor>& out_idx, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, double scale, std::array<bool, 6> output_mask, bool compact_input,
    bool compact_output);

// The ops splora_linear and conv: the forward kernel alone where nothing needs
// a gradient or under inference mode, else as an autograd Function whose
// backward is the backward kernel (autograd.cpp).
at::Tensor linear_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& lora_a,
                           const std::optional<at::Tensor>& lora_b, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& in_idx, const std::optional<at::Tensor>& out_idx,
                           double scale, bool compact_input, bool compact_output);

at::Tensor conv_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& lora_a,
                         const std::optional<at::Tensor>& lora_b, const std::optional<at::Tensor>& adapter,
                         const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& in_idx,
                         const std::optional<at::Tensor>& out_idx, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation, double scale, bool compact_input, bool compact_output);

}  // namespace spa_kernels::cpu
