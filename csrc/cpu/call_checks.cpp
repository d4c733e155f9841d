// See call_checks.h.
#include "call_checks.h"

#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <vector>

namespace spa_kernels::cpu {
namespace {

namespace py = pybind11;

// The tensor behind `obj` when it is a tensor with concrete sizes, else null.
const at::Tensor* concrete_tensor(py::handle obj) {
  if (!THPVariable_Check(obj.ptr())) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(obj.ptr());
  if (!t.defined() || t.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) return nullptr;
  return &t;
}

// The entries of `obj` when it is exactly a tuple of `length` exact ints
// (bools, which Python counts as ints, excluded), else false.
bool exact_int_tuple(py::handle obj, size_t length, std::vector<int64_t>& out) {
  if (!PyTuple_CheckExact(obj.ptr()) || static_cast<size_t>(PyTuple_GET_SIZE(obj.ptr())) != length) return false;
  out.clear();
  for (size_t i = 0; i < length; ++i) {
    PyObject* item = PyTuple_GET_ITEM(obj.ptr(), i);
    if (!PyLong_CheckExact(item)) return false;
    int overflow = 0;
    const long long value = PyLong_AsLongLongAndOverflow(item, &overflow);
    if (overflow != 0 || (value == -1 && PyErr_Occurred())) {
      PyErr_Clear();
      return false;
    }
    out.push_back(value);
  }
  return true;
}

bool supported(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// An operand of the weight's dtype and device and exactly the given shape (a tuple of ints).
bool operand_matches(py::handle operand, py::handle shape, const at::Tensor& weight) {
  const at::Tensor* t = concrete_tensor(operand);
  if (t == nullptr || t->scalar_type() != weight.scalar_type() || t->device() != weight.device()) return false;
  std::vector<int64_t> expected;
  if (!exact_int_tuple(shape, t->dim(), expected)) return false;
  return t->sizes().vec() == expected;
}

}  // namespace

bool conv_call_is_valid(py::handle x_obj, py::handle weight_obj, py::handle bias, py::handle adapters,
                        py::handle adapter_shapes, py::handle stride_obj, py::handle padding_obj,
                        py::handle dilation_obj, py::handle groups) {
  if (!PyLong_CheckExact(groups.ptr()) || PyLong_AsLongLong(groups.ptr()) != 1) {
    PyErr_Clear();
    return false;
  }
  const at::Tensor* x = concrete_tensor(x_obj);
  const at::Tensor* weight = concrete_tensor(weight_obj);
  if (x == nullptr || weight == nullptr) return false;
  const int64_t d = weight->dim() - 2;
  if (d < 0 || x->dim() != d + 2 || x->size(1) != weight->size(1) || weight->size(0) < 1 || weight->size(1) < 1) {
    return false;
  }
  if (x->scalar_type() != weight->scalar_type() || !supported(weight->scalar_type()) ||
      x->device() != weight->device()) {
    return false;
  }
  if (!PyTuple_Check(adapters.ptr()) || !PyTuple_Check(adapter_shapes.ptr()) ||
      PyTuple_GET_SIZE(adapters.ptr()) != PyTuple_GET_SIZE(adapter_shapes.ptr())) {
    return false;
  }
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(adapters.ptr()); ++i) {
    if (!operand_matches(PyTuple_GET_ITEM(adapters.ptr(), i), PyTuple_GET_ITEM(adapter_shapes.ptr(), i), *weight)) {
      return false;
    }
  }
  if (!bias.is_none()) {
    const py::tuple bias_shape = py::make_tuple(weight->size(0));
    if (!operand_matches(bias, bias_shape, *weight)) return false;
  }
  std::vector<int64_t> stride, padding, dilation;
  if (!exact_int_tuple(stride_obj, d, stride) || !exact_int_tuple(padding_obj, d, padding) ||
      !exact_int_tuple(dilation_obj, d, dilation)) {
    return false;
  }
  for (int64_t i = 0; i < d; ++i) {
    const int64_t kernel = weight->size(i + 2), size = x->size(i + 2);
    if (kernel % 2 == 0 || stride[i] < 1 || padding[i] < 0 || dilation[i] < 1) return false;
    // At least one output: (size + 2 padding - dilation (kernel - 1) - 1) // stride + 1 >= 1.
    if (size + 2 * padding[i] - dilation[i] * (kernel - 1) - 1 < 0) return false;
  }
  return true;
}

}  // namespace spa_kernels::cpu
