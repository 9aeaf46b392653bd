#pragma once
// RoIAlign numerics shared by the CPU and CUDA kernels, so both backends place the same samples with the same
// weights. T is the accumulation type: float for float16/bfloat16/float32 inputs, double for float64.
//
// Semantics are torchvision's (0.29), written out so that the float32/float64 CPU results are bitwise identical to
// torchvision's CPU kernel:
//   * a box (x1, y1, x2, y2) is scaled by spatial_scale; aligned=True then shifts it by -0.5 (pixel centres sit at
//     integer + 0.5 in box coordinates), aligned=False forces width/height >= 1 instead;
//   * each of the pooled_height x pooled_width bins is sampled on a grid_h x grid_w grid at bin-relative positions
//     (i + 0.5) / grid; grid = sampling_ratio if > 0, else ceil(roi_size / pooled_size) ("adaptive");
//   * a sample with y < -1, y > H, x < -1 or x > W contributes 0; otherwise it is clamped into [0, H - 1] x
//     [0, W - 1] and bilinearly interpolated; the bin value is the sum of the samples divided by grid_h * grid_w.
// Evaluation order matters for bitwise parity: y = (start + p * bin) + ((i + 0.5) * bin) / grid, weights
// hy * hx, hy * lx, ly * hx, ly * lx, and a sample's value ((w1 v1 + w2 v2) + w3 v3) + w4 v4 added to the running sum.
//
// fastdet's defined outputs where torchvision has undefined behaviour:
//   * a box with a NaN/Inf coordinate (after scaling), or whose size overflows, pools to 0 and gets no gradient;
//   * the grid is clamped to kMaxGrid per axis, and samples that are certainly outside [-1, H] x [-1, W] are never
//     visited (they contribute exactly 0), so a huge box costs O(H * W) per channel instead of O(grid^2);
//   * an empty feature map (H == 0 or W == 0) pools to 0.
#include <torch/headeronly/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "ops/exact_math.h"

namespace fastdet {
namespace roi {

constexpr int64_t kMaxGrid = int64_t(1) << 30;
// Most levels a multi-scale call may pass; they travel to the CUDA kernel by value.
constexpr int kMaxLevels = 8;

// Multiply/add without contraction into fused multiply-adds. nvcc fuses a * b + c by default, which would move
// sample positions by an ulp relative to the CPU; positions decide discrete things (which pixels, whether a sample
// counts), so they are computed with explicitly rounded operations and are bitwise equal on both backends. Sums of
// weighted values may use FMAs (they then agree to rounding).
using exact::add_rn;
using exact::mul_rn;

template <typename T>
struct AlignGeometry {
  T start_h, start_w;  // scaled (and, if aligned, shifted) top-left corner
  T bin_h, bin_w;      // bin size
  int64_t grid_h, grid_w;
  T count;     // the divisor: max(grid_h * grid_w, 1)
  bool valid;  // false for non-finite boxes: the RoI pools to 0
};

template <typename T>
C10_HOST_DEVICE inline bool finite(T v) {
  // v - v is 0 for finite v and NaN for +-Inf/NaN; comparisons with NaN are false. Avoids std::isfinite, whose
  // host/device overloads differ between compilers.
  return (v - v) == T(0);
}

template <typename T>
C10_HOST_DEVICE inline int64_t adaptive_grid(T roi_size, int64_t pooled, int64_t sampling_ratio) {
  if (sampling_ratio > 0) {
    return sampling_ratio;
  }
  // torchvision: ceil(roi_size / pooled) converted to int; a non-positive result means no samples.
  const T g = ::ceil(roi_size / static_cast<T>(pooled));
  if (!(g > T(0))) {
    return 0;
  }
  return g >= static_cast<T>(kMaxGrid) ? kMaxGrid : static_cast<int64_t>(g);
}

// roi points at (x1, y1, x2, y2) in accumulation precision.
template <typename T>
C10_HOST_DEVICE inline AlignGeometry<T> align_geometry(const T* roi, T spatial_scale, int64_t pooled_h,
                                                       int64_t pooled_w, int64_t sampling_ratio, bool aligned) {
  AlignGeometry<T> g;
  const T offset = aligned ? T(0.5) : T(0);
  g.start_w = add_rn(mul_rn(roi[0], spatial_scale), -offset);
  g.start_h = add_rn(mul_rn(roi[1], spatial_scale), -offset);
  const T end_w = add_rn(mul_rn(roi[2], spatial_scale), -offset);
  const T end_h = add_rn(mul_rn(roi[3], spatial_scale), -offset);
  T roi_w = end_w - g.start_w;
  T roi_h = end_h - g.start_h;
  if (!aligned) {
    // Force malformed RoIs to be 1x1 (torchvision's legacy behaviour). NaN stays NaN here: std::max(NaN, 1) would
    // return NaN too, and the validity test below catches it.
    roi_w = roi_w < T(1) ? T(1) : roi_w;
    roi_h = roi_h < T(1) ? T(1) : roi_h;
  }
  g.bin_h = roi_h / static_cast<T>(pooled_h);
  g.bin_w = roi_w / static_cast<T>(pooled_w);
  g.valid = finite(g.start_w) && finite(g.start_h) && finite(roi_w) && finite(roi_h) && finite(end_w) &&
            finite(end_h);
  if (!g.valid) {
    g.grid_h = g.grid_w = 0;
    g.count = T(1);
    return g;
  }
  g.grid_h = adaptive_grid(roi_h, pooled_h, sampling_ratio);
  g.grid_w = adaptive_grid(roi_w, pooled_w, sampling_ratio);
  const int64_t n = g.grid_h * g.grid_w;  // < 2^60 with the clamp
  g.count = static_cast<T>(n > 1 ? n : 1);
  return g;
}

// Coordinate of sample i of bin p along one axis (the exact expression torchvision evaluates).
template <typename T>
C10_HOST_DEVICE inline T sample_coord(T start, T bin, int64_t p, int64_t i, int64_t grid) {
  return add_rn(add_rn(start, mul_rn(static_cast<T>(p), bin)),
                mul_rn(static_cast<T>(i) + T(0.5), bin) / static_cast<T>(grid));
}

// One bilinear sample along one axis: the two neighbouring pixel indices and their weights (h for low, l for high).
template <typename T>
struct AxisSample {
  int64_t low, high;
  T l, h;
  bool valid;
};

template <typename T>
C10_HOST_DEVICE inline AxisSample<T> axis_sample(T v, int64_t size) {
  AxisSample<T> s;
  // NaN fails both comparisons below, so it is excluded by the first test written as a negation.
  s.valid = size > 0 && !(v < T(-1) || v > static_cast<T>(size)) && v == v;
  if (!s.valid) {
    s.low = s.high = 0;
    s.l = s.h = T(0);
    return s;
  }
  if (v <= T(0)) {
    v = T(0);
  }
  s.low = static_cast<int64_t>(v);
  if (s.low >= size - 1) {
    s.high = s.low = size - 1;
    v = static_cast<T>(s.low);
  } else {
    s.high = s.low + 1;
  }
  s.l = v - static_cast<T>(s.low);
  s.h = T(1) - s.l;
  return s;
}

// The sample indices [first, last) of bin p that can fall inside [-1, size]; every other index of [0, grid)
// certainly yields an invalid sample. Sample coordinates are monotone in i, so skipping them changes no result;
// the bound is computed in double with a slack covering the rounding of sample_coord, and the exact test of
// axis_sample still runs on every visited index. Only engaged for large grids (huge boxes).
template <typename T>
C10_HOST_DEVICE inline void sample_range(T start, T bin, int64_t p, int64_t grid, int64_t size, int64_t* first,
                                         int64_t* last) {
  *first = 0;
  *last = grid;
  if (grid <= 16) {
    return;
  }
  const double base = static_cast<double>(start) + static_cast<double>(p) * static_cast<double>(bin);
  const double step = static_cast<double>(bin) / static_cast<double>(grid);
  if (!(step > 0.0) || !finite(step) || !finite(base)) {
    return;
  }
  const double eps = static_cast<double>(std::numeric_limits<T>::epsilon());
  const double magnitude = (base < 0 ? -base : base) + static_cast<double>(bin) * 2.0 + static_cast<double>(size) + 2;
  const double slack = 2.0 + 16.0 * eps * magnitude / step;
  const double lo = (-1.0 - base) / step - 0.5 - slack;
  const double hi = (static_cast<double>(size) - base) / step - 0.5 + slack;  // last index that may be valid
  if (lo > 0.0) {
    *first = lo >= static_cast<double>(grid) ? grid : static_cast<int64_t>(lo);
  }
  if (hi < static_cast<double>(grid - 1)) {
    *last = hi < 0.0 ? 0 : static_cast<int64_t>(hi) + 1;
  }
  if (*last < *first) {
    *last = *first;
  }
}

// Batch index of a RoI: torchvision truncates the float towards zero. Returns -1 when that is not in [0, n).
template <typename T>
C10_HOST_DEVICE inline int64_t batch_index(T value, int64_t n) {
  if (!(value > T(-1) && value < static_cast<T>(n))) {
    return -1;  // also NaN
  }
  return static_cast<int64_t>(value);
}

}  // namespace roi
}  // namespace fastdet
