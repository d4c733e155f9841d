// Checks of a whole call made from Python, for the module path: each decides
// in C++ what the Python check of the same name decides, so that the common
// call of a small layer pays one binding call instead of dozens of attribute
// reads.
#pragma once

#include <torch/extension.h>

namespace spa_kernels::cpu {

// What spa_kernels._validation._module_conv_call_is_valid answers (see there):
// whether a module's convolution call is certainly valid, judged on its common
// case alone.  Anything else, including every bad argument, answers false.
bool conv_call_is_valid(pybind11::handle x, pybind11::handle weight, pybind11::handle bias,
                        pybind11::handle adapters, pybind11::handle adapter_shapes, pybind11::handle stride,
                        pybind11::handle padding, pybind11::handle dilation, pybind11::handle groups);

}  // namespace spa_kernels::cpu
