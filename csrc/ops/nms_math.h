#pragma once
// The suppression test of the NMS family, shared by the CPU and CUDA kernels so both decide every pair identically.
#include <torch/headeronly/macros/Macros.h>

#include <cmath>
#include <limits>

#include "ops/exact_math.h"

namespace fastdet {
namespace nms {

// IoU(i, j) > threshold with IoU computed as torchvision's kernels do: sides clamped at zero, areas unclamped,
// inter / (area_i + area_j - inter). T is float for float16/bfloat16/float32 boxes and double for float64. A NaN IoU
// never suppresses. The comparison is symmetric in (i, j), which the CPU kernel relies on. The union is formed with
// explicitly rounded operations (exact_math.h): nvcc would otherwise contract area_a + area_b - w * h into an FMA, and
// a keep decision is a discrete result that must be the CPU's.
template <typename T>
C10_HOST_DEVICE inline bool iou_above(T ax1, T ay1, T ax2, T ay2, T area_a, T bx1, T by1, T bx2, T by2, T area_b,
                                      T threshold) {
  const T left = ax1 > bx1 ? ax1 : bx1;
  const T right = ax2 < bx2 ? ax2 : bx2;
  const T top = ay1 > by1 ? ay1 : by1;
  const T bottom = ay2 < by2 ? ay2 : by2;
  const T w = right - left > T(0) ? right - left : T(0);
  const T h = bottom - top > T(0) ? bottom - top : T(0);
  const T inter = exact::mul_rn(w, h);
  return inter / exact::sub_rn(exact::add_rn(area_a, area_b), inter) > threshold;
}

// torchvision's CPU kernel compares a float IoU against the double threshold. For a float x, `x > t` (in double)
// equals `x > t'` (in float) where t' is the largest float not above t; this keeps the comparison in float on the
// GPU without changing a single decision (rounding t to nearest instead would flip IoUs equal to round(t) > t).
inline float threshold_as_float(double threshold) {
  float t = static_cast<float>(threshold);
  if (static_cast<double>(t) > threshold) {
    t = std::nextafter(t, -std::numeric_limits<float>::infinity());
  }
  return t;
}

}  // namespace nms
}  // namespace fastdet
