// The Python module spa_kernels._C: importing it registers the kernels as
// torch.ops.spa_kernels_cpu.*; it also exposes the instruction-set switch and
// the index-list reader of the argument checks.
#include <omp.h>
#include <torch/extension.h>

#include "index_bounds.h"
#include "isa.h"
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
  m.def("index_bounds", &spa_kernels::cpu::index_bounds,
        "(smallest, largest, strictly increasing) of a non-empty 1-D int32/int64 CPU tensor.");
}
