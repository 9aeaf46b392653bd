#pragma once
// Per-pair math of soft-NMS, shared by the CPU and CUDA kernels. It follows ensemble-boxes' cpu_soft_nms_float step
// for step, so both backends reproduce that package's results: coordinates and areas in float64 (ensemble-boxes
// promotes every box to float64), IoU = inter / (area_i + area_j - inter) with NaN-propagating min/max as numpy's
// minimum/maximum, and the decay weight of method 1 (linear: 1 - IoU when IoU > iou_threshold) or 2 (gaussian:
// exp(-IoU^2 / sigma), independent of iou_threshold). Scores keep their own dtype: the new score is
// score_dtype(weight * double(score)), as numpy's assignment into the score array rounds it.
#include <torch/headeronly/macros/Macros.h>

#include <cmath>
#include <cstdint>

#include "ops/exact_math.h"

namespace fastdet {
namespace soft_nms {

// ensemble-boxes' method codes.
constexpr int64_t kLinear = 1;
constexpr int64_t kGaussian = 2;

// Workspace layout: per slot x1, y1, x2, y2, area (float64).
constexpr int kFields = 5;

C10_HOST_DEVICE inline double nan_max(double a, double b) {
  return (a != a || b != b) ? a + b : (a > b ? a : b);
}

C10_HOST_DEVICE inline double nan_min(double a, double b) {
  return (a != a || b != b) ? a + b : (a < b ? a : b);
}

C10_HOST_DEVICE inline double iou(const double* a, const double* b) {
  const double w = nan_max(0.0, exact::sub_rn(nan_min(a[3], b[3]), nan_max(a[1], b[1])));
  const double h = nan_max(0.0, exact::sub_rn(nan_min(a[2], b[2]), nan_max(a[0], b[0])));
  const double inter = exact::mul_rn(w, h);
  return inter / exact::sub_rn(exact::add_rn(a[4], b[4]), inter);
}

// The gaussian weight is exp of this.
C10_HOST_DEVICE inline double gaussian_exponent(double overlap, double sigma) {
  return -(exact::mul_rn(overlap, overlap)) / sigma;
}

// Decay weight for an overlap; exactly 1 (so the score is left as is) for IoU 0 under both methods.
C10_HOST_DEVICE inline double weight(double overlap, int64_t method, double iou_threshold, double sigma) {
  if (method == kLinear) {
    return overlap > iou_threshold ? 1.0 - overlap : 1.0;
  }
  return overlap == 0.0 ? 1.0 : exp(gaussian_exponent(overlap, sigma));
}

// numpy's (max, argmax) order over the remaining scores: the first NaN wins, else the first largest value.
template <typename S>
C10_HOST_DEVICE inline bool ranks_before(S a, int64_t ia, S b, int64_t ib) {
  const bool a_nan = a != a, b_nan = b != b;
  if (a_nan || b_nan) return a_nan && (!b_nan || ia < ib);
  return a > b || (a == b && ia < ib);
}

// Once every remaining score is <= score_threshold (or NaN), no later step can lift one above it when
// score_threshold >= 0: gaussian weights lie in [0, 1]; linear ones are < 1 but may be negative (IoU > 1 with
// degenerate boxes), which can only lift a negative score, so the linear method also needs no negative score left.
template <typename S>
C10_HOST_DEVICE inline bool can_still_pass(S score, double score_threshold, int64_t method) {
  const double s = static_cast<double>(score);
  return s > score_threshold || (method == kLinear && s < 0.0);
}

}  // namespace soft_nms
}  // namespace fastdet
