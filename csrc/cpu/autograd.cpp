// The cpu ops with their autograd in C++: torch.ops.spa_kernels_cpu.splora_linear
// and .conv (SPLoRA and SPPaRA).  Each is the forward kernel as an
// autograd Function whose backward is the backward kernel, so an eager
// training step never enters Python between the module and the kernels: no
// Python autograd.Function, no Python backward node.  On a small layer that
// Python costs more than the arithmetic (bench `overhead`).
//
// The ops take the arguments of the kernels and the activations in any layout
// and any leading shape (linear: (..., in)); they hand the kernels 2-D (or
// N, C, ...) contiguous tensors, as the Python op layer does.  The adapter
// factors may also come as modules hold them, with a leading unit dimension.  They return
// gradients in the shapes of their operands, and None (undefined) for those
// not asked for.  Under inference mode (no autograd key) the CPU kernel, the
// forward alone, runs.
//
// A second derivative is not implemented: gradients computed with
// create_graph=True get an Error node as their history, so differentiating
// them fails loudly rather than giving zero.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <vector>

#include "kernels.h"

namespace spa_kernels::cpu {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  return t->contiguous();
}

// An adapter factor as the kernels take it: 2-D.  Modules hold A and B with a
// leading unit dimension, (1, r, in) and (1, out, r), and pass them as they are
// (a view per call would cost an autograd node each); gradients come back in
// the shape given.
std::optional<at::Tensor> factor(const std::optional<at::Tensor>& t, const char* name) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  if (t->dim() == 3) {
    TORCH_CHECK_VALUE(t->size(0) == 1, name, " must be 2-D, or 3-D with a leading dimension of 1");
    return t->squeeze(0).contiguous();
  }
  return t->contiguous();
}

bool requires_grad(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined() && t->requires_grad(); }

std::optional<at::Tensor> present(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// A fresh contiguous tensor given `shape` in place (same element count).  Not
// a view: autograd refuses in-place changes to views made inside a Function,
// and `nn.ReLU(inplace=True)` after the layer is common.
at::Tensor reshaped(at::Tensor t, at::IntArrayRef shape) {
  if (t.sizes() != shape) t.unsafeGetTensorImpl()->set_sizes_contiguous(shape);
  return t;
}

// A gradient given the shape of its operand (same element count).
at::Tensor shaped_like(const at::Tensor& grad, const std::optional<std::vector<int64_t>>& shape) {
  return grad.defined() && shape.has_value() ? reshaped(grad, *shape) : grad;
}

// The shape of a 3-D factor, saved to give its gradient that shape.
c10::IValue factor_shape(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() && t->dim() == 3 ? c10::IValue(t->sizes()) : c10::IValue();
}

std::optional<std::vector<int64_t>> saved_shape(const c10::IValue& v) {
  return v.isNone() ? std::nullopt : std::optional(v.toIntVector());
}

// Gradients taken with create_graph=True: give them an Error node as their
// history, attached to the op's differentiable inputs.
void refuse_double_backward(variable_list& grads, const variable_list& inputs, const char* op) {
  if (!at::GradMode::is_enabled()) return;
  bool any = false;
  for (const auto& t : inputs) any = any || (t.defined() && t.requires_grad());
  if (!any) return;
  auto node = c10::make_intrusive<torch::autograd::Error>(
      std::string("spa_kernels_cpu::") + op +
          " has no derivative: double backward through spa_kernels ops is not supported",
      torch::autograd::collect_next_edges(inputs));
  for (auto& g : grads) {
    if (g.defined()) torch::autograd::set_history(g, node);
  }
}

// Whether the gradient of each optional-tensor argument is needed.  The
// context numbers its inputs over the tensors given, so an absent optional
// argument shifts those after it: `given` says which arguments were given.
template <size_t N>
std::array<bool, N> needed_gradients(AutogradContext* ctx, const std::array<bool, N>& given) {
  std::array<bool, N> need{};
  size_t edge = 0;
  for (size_t i = 0; i < N; ++i) {
    if (given[i]) need[i] = ctx->needs_input_grad(edge++);
  }
  return need;
}

// ------------------------------------------------------------------ linear

// x as the kernels' (M, columns) contiguous matrix.
at::Tensor as_matrix(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least one dimension");
  const int64_t columns = x.size(-1);
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  return x.reshape({rows, columns}).contiguous();
}

std::vector<int64_t> with_last(at::IntArrayRef shape, int64_t last) {
  std::vector<int64_t> out(shape.begin(), shape.end());
  out.back() = last;
  return out;
}

at::Tensor linear_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& lora_a,
                          const std::optional<at::Tensor>& lora_b, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& in_idx, const std::optional<at::Tensor>& out_idx,
                          double scale, bool compact_input, bool compact_output) {
  const at::Tensor y = splora_linear_forward(as_matrix(x), weight.contiguous(), factor(lora_a, "lora_a"),
                                             factor(lora_b, "lora_b"), contiguous(bias), in_idx, out_idx, scale,
                                             compact_input, compact_output);
  return reshaped(y, with_last(x.sizes(), y.size(1)));
}

}  // namespace

// Named outside the anonymous namespace: a node's name (grad_fn.name()) is its type's.
struct LinearFunction : public torch::autograd::Function<LinearFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& lora_a, const std::optional<at::Tensor>& lora_b,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& in_idx,
                            const std::optional<at::Tensor>& out_idx, double scale, bool compact_input,
                            bool compact_output) {
    const at::Tensor x2 = as_matrix(x);
    const at::Tensor w = weight.contiguous();
    const auto a = factor(lora_a, "lora_a"), b = factor(lora_b, "lora_b");
    const at::Tensor y = splora_linear_forward(x2, w, a, b, contiguous(bias), in_idx, out_idx, scale,
                                               compact_input, compact_output);
    // The operands as given: backward re-derives the kernels' views, and a
    // create_graph backward needs the given tensors' autograd edges.
    ctx->save_for_backward({x, weight, lora_a.value_or(at::Tensor()), lora_b.value_or(at::Tensor()),
                            in_idx.value_or(at::Tensor()), out_idx.value_or(at::Tensor())});
    ctx->saved_data["x_shape"] = x.sizes();
    ctx->saved_data["lora_a_shape"] = factor_shape(lora_a);
    ctx->saved_data["lora_b_shape"] = factor_shape(lora_b);
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["compact_input"] = compact_input;
    ctx->saved_data["compact_output"] = compact_output;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return reshaped(y, with_last(x.sizes(), y.size(1)));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor x2 = as_matrix(saved[0]), w = saved[1].contiguous();
    const auto a = factor(present(saved[2]), "lora_a"), b = factor(present(saved[3]), "lora_b");
    const std::array<bool, 5> mask = needed_gradients<5>(
        ctx, {true, true, a.has_value(), b.has_value(), ctx->saved_data["has_bias"].toBool()});
    const at::Tensor& grad_out = grad_outputs[0];
    const at::Tensor g2 = grad_out.reshape({x2.size(0), grad_out.size(-1)}).contiguous();
    auto [dx, dw, da, db, dbias] =
        splora_linear_backward(g2, x2, w, a, b, present(saved[4]), present(saved[5]),
                               ctx->saved_data["scale"].toDouble(), mask,
                               ctx->saved_data["compact_input"].toBool(), ctx->saved_data["compact_output"].toBool());
    if (dx.defined()) dx = reshaped(dx, ctx->saved_data["x_shape"].toIntVector());
    variable_list grads{dx, dw, shaped_like(da, saved_shape(ctx->saved_data["lora_a_shape"])),
                        shaped_like(db, saved_shape(ctx->saved_data["lora_b_shape"])), dbias};
    refuse_double_backward(grads, {saved[0], saved[1], saved[2], saved[3]}, "splora_linear");
    grads.resize(10);  // in_idx, out_idx, scale and the flags have none
    return grads;
  }
};

at::Tensor linear_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& lora_a,
                           const std::optional<at::Tensor>& lora_b, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& in_idx, const std::optional<at::Tensor>& out_idx,
                           double scale, bool compact_input, bool compact_output) {
  // Nothing to differentiate (no_grad, or frozen operands): the forward alone,
  // without building a node.
  if (!at::GradMode::is_enabled() || !(x.requires_grad() || weight.requires_grad() || requires_grad(lora_a) ||
                                       requires_grad(lora_b) || requires_grad(bias))) {
    return linear_forward(x, weight, lora_a, lora_b, bias, in_idx, out_idx, scale, compact_input, compact_output);
  }
  return LinearFunction::apply(x, weight, lora_a, lora_b, bias, in_idx, out_idx, scale, compact_input,
                               compact_output);
}

namespace {

// ------------------------------------------------------------------ conv

at::Tensor conv_forward_op(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& lora_a,
                           const std::optional<at::Tensor>& lora_b, const std::optional<at::Tensor>& adapter,
                           const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& in_idx,
                           const std::optional<at::Tensor>& out_idx, at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, double scale, bool compact_input, bool compact_output) {
  return conv_forward(x.contiguous(), weight.contiguous(), factor(lora_a, "lora_a"), factor(lora_b, "lora_b"),
                      contiguous(adapter), contiguous(bias), in_idx, out_idx, stride, padding, dilation, scale,
                      compact_input, compact_output);
}

}  // namespace

struct ConvFunction : public torch::autograd::Function<ConvFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& lora_a, const std::optional<at::Tensor>& lora_b,
                            const std::optional<at::Tensor>& adapter, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& in_idx, const std::optional<at::Tensor>& out_idx,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, double scale,
                            bool compact_input, bool compact_output) {
    const at::Tensor xc = x.contiguous(), w = weight.contiguous();
    const auto a = factor(lora_a, "lora_a"), b = factor(lora_b, "lora_b"), p = contiguous(adapter);
    at::Tensor y = conv_forward(xc, w, a, b, p, contiguous(bias), in_idx, out_idx, stride, padding, dilation, scale,
                                compact_input, compact_output);
    ctx->save_for_backward({x, weight, lora_a.value_or(at::Tensor()), lora_b.value_or(at::Tensor()),
                            adapter.value_or(at::Tensor()), in_idx.value_or(at::Tensor()),
                            out_idx.value_or(at::Tensor())});
    ctx->saved_data["lora_a_shape"] = factor_shape(lora_a);
    ctx->saved_data["lora_b_shape"] = factor_shape(lora_b);
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["compact_input"] = compact_input;
    ctx->saved_data["compact_output"] = compact_output;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const auto a = factor(present(saved[2]), "lora_a"), b = factor(present(saved[3]), "lora_b");
    const auto p = contiguous(present(saved[4]));
    const std::array<bool, 6> mask = needed_gradients<6>(
        ctx, {true, true, a.has_value(), b.has_value(), p.has_value(), ctx->saved_data["has_bias"].toBool()});
    const std::vector<int64_t> stride = ctx->saved_data["stride"].toIntVector();
    const std::vector<int64_t> padding = ctx->saved_data["padding"].toIntVector();
    const std::vector<int64_t> dilation = ctx->saved_data["dilation"].toIntVector();
    auto [dx, dw, da, db, dp, dbias] = conv_backward(
        grad_outputs[0].contiguous(), saved[0].contiguous(), saved[1].contiguous(), a, b, p, present(saved[5]), present(saved[6]), stride,
        padding, dilation, ctx->saved_data["scale"].toDouble(), mask, ctx->saved_data["compact_input"].toBool(),
        ctx->saved_data["compact_output"].toBool());
    variable_list grads{dx, dw, shaped_like(da, saved_shape(ctx->saved_data["lora_a_shape"])),
                        shaped_like(db, saved_shape(ctx->saved_data["lora_b_shape"])), dp, dbias};
    refuse_double_backward(grads, {saved[0], saved[1], saved[2], saved[3], saved[4]}, "conv");
    grads.resize(14);  // the index lists, geometry, scale and flags have none
    return grads;
  }
};

at::Tensor conv_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& lora_a,
                         const std::optional<at::Tensor>& lora_b, const std::optional<at::Tensor>& adapter,
                         const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& in_idx,
                         const std::optional<at::Tensor>& out_idx, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation, double scale, bool compact_input, bool compact_output) {
  if (!at::GradMode::is_enabled() || !(x.requires_grad() || weight.requires_grad() || requires_grad(lora_a) ||
                                       requires_grad(lora_b) || requires_grad(adapter) || requires_grad(bias))) {
    return conv_forward_op(x, weight, lora_a, lora_b, adapter, bias, in_idx, out_idx, stride, padding, dilation,
                           scale, compact_input, compact_output);
  }
  return ConvFunction::apply(x, weight, lora_a, lora_b, adapter, bias, in_idx, out_idx, stride, padding, dilation,
                             scale, compact_input, compact_output);
}

TORCH_LIBRARY_FRAGMENT(spa_kernels_cpu, m) {
  m.def(
      "splora_linear(Tensor x, Tensor weight, Tensor? lora_a, Tensor? lora_b, Tensor? bias, Tensor? in_idx, "
      "Tensor? out_idx, float scale, bool compact_input=False, bool compact_output=False) -> Tensor");
  m.def(
      "conv(Tensor x, Tensor weight, Tensor? lora_a, Tensor? lora_b, Tensor? adapter, Tensor? bias, "
      "Tensor? in_idx, Tensor? out_idx, int[] stride, int[] padding, int[] dilation, float scale, "
      "bool compact_input=False, bool compact_output=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(spa_kernels_cpu, CPU, m) {
  m.impl("splora_linear", &linear_forward);
  m.impl("conv", &conv_forward_op);
}

TORCH_LIBRARY_IMPL(spa_kernels_cpu, Autograd, m) {
  m.impl("splora_linear", &linear_autograd);
  m.impl("conv", &conv_autograd);
}

}  // namespace spa_kernels::cpu
