// The torch binding of the CUDA kernels: checks, allocation, stream; nothing else.
//
// Built only where torch has CUDA (setup.py), as spa_kernels._C_cuda.  The
// kernels behind it take plain pointers (spa_cuda.h).  Tensors arrive
// contiguous with int32 index lists (spa_kernels/backends/cuda prepares them);
// every check here raises a ValueError naming the argument before any launch.

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <torch/extension.h>

#include <optional>
#include <string>
#include <vector>

#include "spa_cuda.h"

namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

spa_cuda::DType dtype_of(const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return spa_cuda::DType::kFloat32;
    case at::kBFloat16: return spa_cuda::DType::kBFloat16;
    case at::kHalf: return spa_cuda::DType::kFloat16;
    default: TORCH_CHECK_VALUE(false, "x: the cuda backend runs float32, bfloat16 and float16, got ", x.scalar_type());
  }
  return spa_cuda::DType::kFloat32;
}

void check_tensor(const Tensor& t, const char* name, const Tensor& x, int64_t dim) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, ": expected a CUDA tensor, got one on ", t.device());
  TORCH_CHECK_VALUE(t.device() == x.device(), name, ": on ", t.device(), ", but x is on ", x.device());
  TORCH_CHECK_VALUE(t.scalar_type() == x.scalar_type(), name, ": dtype ", t.scalar_type(), ", but x is ",
                    x.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == dim, name, ": expected ", dim, " dimensions, got ", t.dim());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, ": must be contiguous");
}

const void* data_or_null(const OptionalTensor& t) { return t.has_value() ? t->data_ptr() : nullptr; }

// An index list's pointer and length; null for "all channels".
const int32_t* index_pointer(const OptionalTensor& idx, const char* name, const Tensor& x, int64_t size,
                             int64_t& count) {
  if (!idx.has_value()) {
    count = size;
    return nullptr;
  }
  TORCH_CHECK_VALUE(idx->scalar_type() == at::kInt, name, ": expected an int32 index list, got ", idx->scalar_type());
  TORCH_CHECK_VALUE(idx->dim() == 1 && idx->is_contiguous(), name, ": expected a contiguous 1-D tensor");
  TORCH_CHECK_VALUE(idx->device() == x.device(), name, ": on ", idx->device(), ", but x is on ", x.device());
  count = idx->numel();
  TORCH_CHECK_VALUE(count <= size, name, ": ", count, " entries for ", size, " channels");
  return spa_cuda::index_list(idx->data_ptr<int32_t>(), count);
}

void check_status(int status) {
  TORCH_CHECK(status == 0, "spa_kernels cuda kernel failed: ", cudaGetErrorString(static_cast<cudaError_t>(status)));
}

void* stream_now() { return c10::cuda::getCurrentCUDAStream().stream(); }

Tensor empty_or_placeholder(bool wanted, at::IntArrayRef shape, const Tensor& like) {
  return wanted ? at::empty(shape, like.options()) : at::empty({0}, like.options());
}

// ------------------------------------------------------------------ linear

spa_cuda::LinearArgs linear_args(const Tensor& x, const Tensor& weight, const OptionalTensor& lora_a,
                                 const OptionalTensor& lora_b, const OptionalTensor& bias,
                                 const OptionalTensor& in_idx, const OptionalTensor& out_idx, double scale) {
  check_tensor(x, "x", x, 2);
  const spa_cuda::DType dtype = dtype_of(x);
  check_tensor(weight, "weight", x, 2);
  TORCH_CHECK_VALUE(weight.size(1) == x.size(1), "weight: ", weight.size(1), " input features, x has ", x.size(1));
  TORCH_CHECK_VALUE(lora_a.has_value() == lora_b.has_value(), "lora_a and lora_b must be given together");
  spa_cuda::LinearArgs a;
  a.rows = x.size(0);
  a.in_features = x.size(1);
  a.out_features = weight.size(0);
  if (lora_a.has_value()) {
    check_tensor(*lora_a, "lora_a", x, 2);
    check_tensor(*lora_b, "lora_b", x, 2);
    a.rank = lora_a->size(0);
    TORCH_CHECK_VALUE(lora_a->size(1) == a.in_features, "lora_a: expected (rank, ", a.in_features, ")");
    TORCH_CHECK_VALUE(lora_b->size(0) == a.out_features && lora_b->size(1) == a.rank, "lora_b: expected (",
                      a.out_features, ", ", a.rank, ")");
  }
  if (bias.has_value()) {
    check_tensor(*bias, "bias", x, 1);
    TORCH_CHECK_VALUE(bias->size(0) == a.out_features, "bias: expected ", a.out_features, " entries");
  }
  a.x = x.data_ptr();
  a.weight = weight.data_ptr();
  a.lora_a = data_or_null(lora_a);
  a.lora_b = data_or_null(lora_b);
  a.bias = data_or_null(bias);
  a.in_idx = index_pointer(in_idx, "in_idx", x, a.in_features, a.active_in);
  a.out_idx = index_pointer(out_idx, "out_idx", x, a.out_features, a.active_out);
  a.scale = static_cast<float>(scale);
  a.element_bytes = spa_cuda::element_bytes(dtype);
  a.split_intermediate = spa_cuda::splits_intermediate(dtype);
  const std::string problem = spa_cuda::check_linear_args(a);
  TORCH_CHECK_VALUE(problem.empty(), problem);
  return a;
}

Tensor linear_forward(const Tensor& x, const Tensor& weight, const OptionalTensor& lora_a,
                      const OptionalTensor& lora_b, const OptionalTensor& bias, const OptionalTensor& in_idx,
                      const OptionalTensor& out_idx, double scale) {
  const c10::cuda::CUDAGuard guard(x.device());
  const spa_cuda::LinearArgs a = linear_args(x, weight, lora_a, lora_b, bias, in_idx, out_idx, scale);
  Tensor y = at::empty({a.rows, a.out_features}, x.options());  // every element is written
  Tensor t = at::empty({a.rows, spa_cuda::intermediate_width(a.rank, a.split_intermediate)}, x.options());
  check_status(spa_cuda::splora_linear_forward(a, y.data_ptr(), t.data_ptr(), dtype_of(x), stream_now()));
  return y;
}

// Gradients of (x, weight, lora_a, lora_b, bias); an empty tensor where not asked for.
std::vector<Tensor> linear_backward(const Tensor& grad_out, const Tensor& x, const Tensor& weight,
                                    const OptionalTensor& lora_a, const OptionalTensor& lora_b,
                                    const OptionalTensor& in_idx, const OptionalTensor& out_idx, double scale,
                                    std::vector<bool> output_mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK_VALUE(output_mask.size() == 5, "output_mask: expected 5 entries");
  const spa_cuda::LinearArgs a = linear_args(x, weight, lora_a, lora_b, std::nullopt, in_idx, out_idx, scale);
  check_tensor(grad_out, "grad_out", x, 2);
  TORCH_CHECK_VALUE(grad_out.size(0) == a.rows && grad_out.size(1) == a.out_features, "grad_out: expected (",
                    a.rows, ", ", a.out_features, ")");
  const bool lora = lora_a.has_value();
  std::vector<Tensor> grads = {
      empty_or_placeholder(output_mask[0], x.sizes(), x),
      empty_or_placeholder(output_mask[1], weight.sizes(), x),
      empty_or_placeholder(output_mask[2] && lora, lora ? lora_a->sizes() : at::IntArrayRef{0}, x),
      empty_or_placeholder(output_mask[3] && lora, lora ? lora_b->sizes() : at::IntArrayRef{0}, x),
      empty_or_placeholder(output_mask[4], {a.out_features}, x),
  };
  spa_cuda::Gradients g;
  g.grad_x = output_mask[0] ? grads[0].data_ptr() : nullptr;
  g.grad_weight = output_mask[1] ? grads[1].data_ptr() : nullptr;
  g.grad_lora_a = output_mask[2] && lora ? grads[2].data_ptr() : nullptr;
  g.grad_lora_b = output_mask[3] && lora ? grads[3].data_ptr() : nullptr;
  g.grad_bias = output_mask[4] ? grads[4].data_ptr() : nullptr;
  const int64_t width = spa_cuda::intermediate_width(a.rank, a.split_intermediate);
  Tensor u = at::empty({a.rows, width}, x.options());
  Tensor t = at::empty({a.rows, width}, x.options());
  Tensor one = at::ones({1}, x.options());
  check_status(spa_cuda::splora_linear_backward(a, grad_out.data_ptr(), g, u.data_ptr(), t.data_ptr(),
                                                one.data_ptr(), dtype_of(x), stream_now()));
  return grads;
}

// ------------------------------------------------------------------ convolutions

spa_cuda::ConvArgs conv_args(const Tensor& x, const Tensor& weight, const OptionalTensor& lora_a,
                             const OptionalTensor& lora_b, const OptionalTensor& adapter,
                             const OptionalTensor& bias, const OptionalTensor& in_idx,
                             const OptionalTensor& out_idx, const std::vector<int64_t>& stride,
                             const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation,
                             double scale) {
  const int64_t d = x.dim() - 2;
  TORCH_CHECK_VALUE(d >= 1 && d <= 3, "x: expected (N, C, *spatial) with 1 to 3 spatial dimensions, got ",
                    x.dim(), " dimensions");
  check_tensor(x, "x", x, x.dim());
  const spa_cuda::DType dtype = dtype_of(x);
  check_tensor(weight, "weight", x, x.dim());
  TORCH_CHECK_VALUE(weight.size(1) == x.size(1), "weight: ", weight.size(1), " input channels, x has ", x.size(1),
                    " (groups=1 only)");
  TORCH_CHECK_VALUE(int64_t(stride.size()) == d && int64_t(padding.size()) == d && int64_t(dilation.size()) == d,
                    "stride, padding, dilation: expected ", d, " entries each");
  spa_cuda::ConvArgs a;
  a.batch = x.size(0);
  a.in_channels = x.size(1);
  a.out_channels = weight.size(0);
  for (int64_t i = 0; i < d; ++i) {
    const int slot = int(spa_cuda::kSpatialDims - d + i);
    TORCH_CHECK_VALUE(x.size(2 + i) <= (int64_t(1) << 28) && weight.size(2 + i) <= (int64_t(1) << 20),
                      "x/weight: spatial size too large");
    a.input[slot] = int32_t(x.size(2 + i));
    a.kernel[slot] = int32_t(weight.size(2 + i));
    a.stride[slot] = int32_t(stride[i]);
    a.padding[slot] = int32_t(padding[i]);
    a.dilation[slot] = int32_t(dilation[i]);
    const int64_t span = x.size(2 + i) + 2 * padding[i] - dilation[i] * (weight.size(2 + i) - 1) - 1;
    TORCH_CHECK_VALUE(span >= 0 && stride[i] >= 1, "x: spatial size ", x.size(2 + i),
                      " is smaller than the dilated kernel");
    a.output[slot] = int32_t(span / stride[i] + 1);
  }
  TORCH_CHECK_VALUE(lora_a.has_value() == lora_b.has_value(), "lora_a and lora_b must be given together");
  if (lora_a.has_value()) {
    check_tensor(*lora_a, "lora_a", x, 2);
    check_tensor(*lora_b, "lora_b", x, 2);
    a.rank = lora_a->size(0);
    TORCH_CHECK_VALUE(lora_a->size(1) == a.in_channels, "lora_a: expected (rank, ", a.in_channels, ")");
    TORCH_CHECK_VALUE(lora_b->size(0) == a.out_channels && lora_b->size(1) == a.rank, "lora_b: expected (",
                      a.out_channels, ", ", a.rank, ")");
  }
  if (adapter.has_value()) {
    check_tensor(*adapter, "adapter", x, 2);
    TORCH_CHECK_VALUE(adapter->size(0) == a.out_channels && adapter->size(1) == a.in_channels,
                      "adapter: expected (", a.out_channels, ", ", a.in_channels, ")");
  }
  if (bias.has_value()) {
    check_tensor(*bias, "bias", x, 1);
    TORCH_CHECK_VALUE(bias->size(0) == a.out_channels, "bias: expected ", a.out_channels, " entries");
  }
  a.x = x.data_ptr();
  a.weight = weight.data_ptr();
  a.lora_a = data_or_null(lora_a);
  a.lora_b = data_or_null(lora_b);
  a.adapter = data_or_null(adapter);
  a.bias = data_or_null(bias);
  a.in_idx = index_pointer(in_idx, "in_idx", x, a.in_channels, a.active_in);
  a.out_idx = index_pointer(out_idx, "out_idx", x, a.out_channels, a.active_out);
  a.scale = static_cast<float>(scale);
  a.element_bytes = spa_cuda::element_bytes(dtype);
  a.split_intermediate = spa_cuda::splits_intermediate(dtype);
  const std::string problem = spa_cuda::check_conv_args(a);
  TORCH_CHECK_VALUE(problem.empty(), problem);
  return a;
}

std::vector<int64_t> output_shape(const spa_cuda::ConvArgs& a, int64_t d) {
  std::vector<int64_t> shape = {a.batch, a.out_channels};
  for (int64_t i = spa_cuda::kSpatialDims - d; i < spa_cuda::kSpatialDims; ++i) shape.push_back(a.output[i]);
  return shape;
}

int64_t output_positions(const spa_cuda::ConvArgs& a) {
  return a.batch * int64_t(a.output[0]) * a.output[1] * a.output[2];
}

Tensor conv_forward(const Tensor& x, const Tensor& weight, const OptionalTensor& lora_a,
                    const OptionalTensor& lora_b, const OptionalTensor& adapter, const OptionalTensor& bias,
                    const OptionalTensor& in_idx, const OptionalTensor& out_idx, std::vector<int64_t> stride,
                    std::vector<int64_t> padding, std::vector<int64_t> dilation, double scale) {
  const c10::cuda::CUDAGuard guard(x.device());
  const spa_cuda::ConvArgs a =
      conv_args(x, weight, lora_a, lora_b, adapter, bias, in_idx, out_idx, stride, padding, dilation, scale);
  Tensor y = at::empty(output_shape(a, x.dim() - 2), x.options());
  Tensor t = at::empty({output_positions(a), spa_cuda::intermediate_width(a.rank, a.split_intermediate)},
                       x.options());
  check_status(spa_cuda::conv_forward(a, y.data_ptr(), t.data_ptr(), dtype_of(x), stream_now()));
  return y;
}

// Gradients of (x, weight, lora_a, lora_b, adapter, bias); an empty tensor where not asked for.
std::vector<Tensor> conv_backward(const Tensor& grad_out, const Tensor& x, const Tensor& weight,
                                  const OptionalTensor& lora_a, const OptionalTensor& lora_b,
                                  const OptionalTensor& adapter, const OptionalTensor& in_idx,
                                  const OptionalTensor& out_idx, std::vector<int64_t> stride,
                                  std::vector<int64_t> padding, std::vector<int64_t> dilation, double scale,
                                  std::vector<bool> output_mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK_VALUE(output_mask.size() == 6, "output_mask: expected 6 entries");
  const spa_cuda::ConvArgs a = conv_args(x, weight, lora_a, lora_b, adapter, std::nullopt, in_idx, out_idx, stride,
                                         padding, dilation, scale);
  check_tensor(grad_out, "grad_out", x, x.dim());
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(output_shape(a, x.dim() - 2)),
                    "grad_out: shape ", grad_out.sizes(), " does not match the output");
  const bool lora = lora_a.has_value(), sppara = adapter.has_value();
  const bool want[6] = {output_mask[0], output_mask[1], output_mask[2] && lora, output_mask[3] && lora,
                        output_mask[4] && sppara, output_mask[5]};
  std::vector<Tensor> grads = {
      empty_or_placeholder(want[0], x.sizes(), x),
      empty_or_placeholder(want[1], weight.sizes(), x),
      empty_or_placeholder(want[2], lora ? lora_a->sizes() : at::IntArrayRef{0}, x),
      empty_or_placeholder(want[3], lora ? lora_b->sizes() : at::IntArrayRef{0}, x),
      empty_or_placeholder(want[4], sppara ? adapter->sizes() : at::IntArrayRef{0}, x),
      empty_or_placeholder(want[5], {a.out_channels}, x),
  };
  spa_cuda::Gradients g;
  g.grad_x = want[0] ? grads[0].data_ptr() : nullptr;
  g.grad_weight = want[1] ? grads[1].data_ptr() : nullptr;
  g.grad_lora_a = want[2] ? grads[2].data_ptr() : nullptr;
  g.grad_lora_b = want[3] ? grads[3].data_ptr() : nullptr;
  g.grad_adapter = want[4] ? grads[4].data_ptr() : nullptr;
  g.grad_bias = want[5] ? grads[5].data_ptr() : nullptr;
  const int64_t width = spa_cuda::intermediate_width(a.rank, a.split_intermediate);
  Tensor u = at::empty({output_positions(a), width}, x.options());
  Tensor t = at::empty({output_positions(a), width}, x.options());
  Tensor one = at::ones({1}, x.options());
  check_status(spa_cuda::conv_backward(a, grad_out.data_ptr(), g, u.data_ptr(), t.data_ptr(), one.data_ptr(),
                                       dtype_of(x), stream_now()));
  return grads;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "spa_kernels CUDA kernels (see csrc/cuda/spa_cuda.h)";
  m.def("linear_forward", &linear_forward);
  m.def("linear_backward", &linear_backward);
  m.def("conv_forward", &conv_forward);
  m.def("conv_backward", &conv_backward);
}
