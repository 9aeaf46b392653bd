#pragma once
// SLEEF's vector math functions that libtorch_cpu already ships, found at run time (dlsym) so that a torch build
// which does not export them costs speed, never an import failure. Callers enable AVX2 per function (target
// attributes), not by a compiler flag, and take their scalar path when lookup() returns nullptr.
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define FASTDET_SLEEF_LOOKUP 1
#include <dlfcn.h>

#include <cstdlib>

namespace fastdet {
namespace sleef {

// Whether this CPU runs the AVX2 + FMA (+ F16C) functions.
inline bool avx2_fma_f16c() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

// Whether the environment variable `name` asks for the scalar path (set, non-empty and not "0"): tests compare the
// two paths through it.
inline bool scalar_forced(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && value[0] != '\0' && value[0] != '0';
}

// libtorch_cpu's exported function `name`, or nullptr.
inline void* lookup(const char* name) {
  void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
  return lib == nullptr ? nullptr : dlsym(lib, name);
}

}  // namespace sleef
}  // namespace fastdet
#endif
