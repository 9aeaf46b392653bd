#pragma once
// Matrix NMS (SOLOv2, Wang et al. 2020) for boxes, the per-pair math shared by the CPU and CUDA kernels.
//
// Candidates are in visit order (decreasing score). For a pair i < j of one category with IoU d = iou(i, j), and
// c_i = max over k < i of the same category of iou(k, i) (0 if none; how much i is itself suppressed), the decay of
// j is decay_j = min(1, min over such i of f(d) / f(c_i)), with f(x) = 1 - x (linear) or exp(-sigma x^2)
// (gaussian, mmdetection's parameterisation). IoU as torchvision's box_iou (iou::pair_forward). NaN propagates
// through both the max and the min, as torch.max / torch.min do in the dense formulation.
#include <torch/headeronly/macros/Macros.h>

#include <cmath>
#include <cstdint>

#include "ops/box_iou_math.h"

namespace fastdet {
namespace matrix_nms {

constexpr int64_t kLinear = 1;
constexpr int64_t kGaussian = 2;

template <typename T>
C10_HOST_DEVICE inline T pair_iou(const T* a, const T* b) {
  return iou::pair_forward<T>(iou::Box<T>{a[0], a[1], a[2], a[3]}, iou::Box<T>{b[0], b[1], b[2], b[3]}, iou::kIoU,
                              T(0));
}

template <typename T>
C10_HOST_DEVICE inline T nan_max(T a, T b) {
  return (a != a || b != b) ? a + b : (a > b ? a : b);
}

template <typename T>
C10_HOST_DEVICE inline T nan_min(T a, T b) {
  return (a != a || b != b) ? a + b : (a < b ? a : b);
}

// f(d) / f(c), each evaluated as the dense tensor formulation does: (1 - d) / (1 - c), or
// exp(-sigma * d^2) / exp(-sigma * c^2) with -sigma rounded to T.
template <typename T>
C10_HOST_DEVICE inline T ratio(T d, T c, int64_t kernel, T neg_sigma) {
  if (kernel == kLinear) return (T(1) - d) / (T(1) - c);
  return ::exp(neg_sigma * (d * d)) / ::exp(neg_sigma * (c * c));
}

}  // namespace matrix_nms
}  // namespace fastdet
