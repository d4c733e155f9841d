#include "isa.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

namespace spa_kernels::cpu {
namespace {

bool cpu_has(const char* feature) {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (std::string(feature) == "avx512") return __builtin_cpu_supports("avx512f");
  if (std::string(feature) == "avx2")
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("popcnt");
#endif
  return std::string(feature) == "generic";
}

const TileKernels<float>* kernels_named(const std::string& name) {
  if (name == "avx512") return cpu_has("avx512") ? avx512_float_kernels() : nullptr;
  if (name == "avx2") return cpu_has("avx2") ? avx2_float_kernels() : nullptr;
  if (name == "generic") return generic_float_kernels();
  return nullptr;
}

const TileKernels<float>* best_kernels() {
  if (const char* forced = std::getenv("SPA_KERNELS_CPU_ISA")) {
    if (const TileKernels<float>* k = kernels_named(forced)) return k;
  }
  for (const std::string& name : supported_isas()) {
    if (const TileKernels<float>* k = kernels_named(name)) return k;
  }
  return generic_float_kernels();
}

std::atomic<const TileKernels<float>*>& selected() {
  static std::atomic<const TileKernels<float>*> kernels{best_kernels()};
  return kernels;
}

}  // namespace

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (const char* name : {"avx512", "avx2", "generic"}) {
    if (kernels_named(name) != nullptr) names.emplace_back(name);
  }
  return names;
}

std::string current_isa() { return selected().load()->isa; }

void set_isa(const std::string& name) {
  const TileKernels<float>* k = kernels_named(name);
  if (k == nullptr) {
    std::string known;
    for (const std::string& s : supported_isas()) known += (known.empty() ? "" : ", ") + s;
    throw std::invalid_argument("isa '" + name + "' is not supported on this CPU; supported: " + known);
  }
  selected().store(k);
}

const TileKernels<float>& float_kernels() { return *selected().load(); }
const TileKernels<double>& double_kernels() { return *generic_double_kernels(); }

}  // namespace spa_kernels::cpu
