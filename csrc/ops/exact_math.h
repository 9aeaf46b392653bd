#pragma once
// Explicitly rounded arithmetic for code shared by the CPU and CUDA kernels. nvcc contracts a * b + c into a fused
// multiply-add by default, which rounds once instead of twice; where a result decides something discrete (which pixel
// a sample lands on, whether a sample counts, a box edge that is compared later), these helpers keep the CUDA result
// bitwise equal to the CPU's. Host code compiles them to the plain operators.
#include <torch/headeronly/macros/Macros.h>

namespace fastdet {
namespace exact {

C10_HOST_DEVICE inline float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

C10_HOST_DEVICE inline double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

C10_HOST_DEVICE inline float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

C10_HOST_DEVICE inline double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

C10_HOST_DEVICE inline float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

C10_HOST_DEVICE inline double sub_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}

}  // namespace exact
}  // namespace fastdet
