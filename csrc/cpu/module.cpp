// The Python module spa_kernels._C: importing it registers the kernels as
// torch.ops.spa_kernels_cpu.*; it also exposes the instruction-set switch and
// the index-list reader of the argument checks, and the ops splora_linear and
// conv as plain functions for eager calls (the op layer's direct calls): a call
// through torch.ops parses its arguments against the schema in Python-facing
// C++ that costs more than a small layer computes.
#include <omp.h>
#include <torch/extension.h>

#include "call_checks.h"
#include "index_bounds.h"
#include "isa.h"
#include "kernels.h"
#include "small_problems.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "spa_kernels CPU kernels (registered as torch.ops.spa_kernels_cpu)";
  m.def("cpu_isa", &spa_kernels::cpu::current_isa, "Instruction set the float kernels use.");
  m.def("supported_cpu_isas", &spa_kernels::cpu::supported_isas, "Instruction sets usable on this CPU.");
  m.def("set_cpu_isa", &spa_kernels::cpu::set_isa, "Force an instruction set (avx512, avx2, generic).");
  // The kernels' own OpenMP runtime, which need not be the one torch loaded.
  m.def("max_threads", [] { return omp_get_max_threads(); }, "OpenMP threads a kernel call may use.");
  m.def("small_problem_limit", &spa_kernels::cpu::small_problem_limit,
        "Multiply-adds of the main product at or below which a call runs as plain loops.");
  m.def("set_small_problem_limit", &spa_kernels::cpu::set_small_problem_limit,
        "Set that limit (0: the GEMM engine always).");
  m.def("splora_linear", &spa_kernels::cpu::linear_autograd,
        "torch.ops.spa_kernels_cpu.splora_linear without the dispatcher: for eager calls only.", py::arg("x"),
        py::arg("weight"), py::arg("lora_a"), py::arg("lora_b"), py::arg("bias"), py::arg("in_idx"),
        py::arg("out_idx"), py::arg("scale"), py::arg("compact_input") = false, py::arg("compact_output") = false);
  m.def(
      "conv",
      [](const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& lora_a,
         const std::optional<at::Tensor>& lora_b, const std::optional<at::Tensor>& adapter,
         const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& in_idx,
         const std::optional<at::Tensor>& out_idx, const std::vector<int64_t>& stride,
         const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation, double scale, bool compact_input,
         bool compact_output) {
        return spa_kernels::cpu::conv_autograd(x, weight, lora_a, lora_b, adapter, bias, in_idx, out_idx, stride,
                                               padding, dilation, scale, compact_input, compact_output);
      },
      "torch.ops.spa_kernels_cpu.conv without the dispatcher: for eager calls only.", py::arg("x"),
      py::arg("weight"), py::arg("lora_a"), py::arg("lora_b"), py::arg("adapter"), py::arg("bias"),
      py::arg("in_idx"), py::arg("out_idx"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
      py::arg("scale"), py::arg("compact_input") = false, py::arg("compact_output") = false);
  m.def("conv_call_is_valid", &spa_kernels::cpu::conv_call_is_valid,
        "_validation._module_conv_call_is_valid in C++: whether a module's convolution call is certainly valid.");
  m.def("index_bounds", &spa_kernels::cpu::index_bounds,
        "(smallest, largest, strictly increasing) of a non-empty 1-D int32/int64 CPU tensor.");
}
