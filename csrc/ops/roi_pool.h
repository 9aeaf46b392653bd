#pragma once
// RoIPool bin geometry shared by the CPU and CUDA kernels (argument checks are shared with roi_align, roi_align.h).
//
// torchvision's semantics: box corners are scaled and rounded half away from zero to whole pixels; the RoI spans
// end - start + 1 pixels (at least 1); bin p covers [floor(p * bin), ceil((p + 1) * bin)) shifted by the start and
// clamped to the map; the output is the bin's maximum (NaN values never win a comparison), an empty bin gives 0 and
// argmax -1. argmax is the index h * W + w inside the feature plane.
//
// fastdet's defined output where torchvision has undefined behaviour: a box with a NaN/Inf coordinate (after scaling)
// pools to 0 with argmax -1; rounded corners are clamped to +-2^40 before conversion to an integer.
#include <torch/headeronly/macros/Macros.h>

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "ops/roi_align_math.h"

namespace fastdet {
namespace roi {

template <typename T>
struct PoolGeometry {
  int64_t start_h, start_w;
  T bin_h, bin_w;
  bool valid;
};

template <typename T>
C10_HOST_DEVICE inline int64_t rounded_corner(T v) {
  const T r = ::round(v);
  const T limit = static_cast<T>(int64_t(1) << 40);
  return r > limit ? (int64_t(1) << 40) : r < -limit ? -(int64_t(1) << 40) : static_cast<int64_t>(r);
}

template <typename T>
C10_HOST_DEVICE inline PoolGeometry<T> pool_geometry(const T* roi, T spatial_scale, int64_t pooled_h,
                                                     int64_t pooled_w) {
  PoolGeometry<T> g;
  const T x1 = roi[0] * spatial_scale, y1 = roi[1] * spatial_scale;
  const T x2 = roi[2] * spatial_scale, y2 = roi[3] * spatial_scale;
  g.valid = finite(x1) && finite(y1) && finite(x2) && finite(y2);
  if (!g.valid) {
    g.start_h = g.start_w = 0;
    g.bin_h = g.bin_w = T(0);
    return g;
  }
  g.start_w = rounded_corner(x1);
  g.start_h = rounded_corner(y1);
  const int64_t end_w = rounded_corner(x2), end_h = rounded_corner(y2);
  const int64_t roi_w = end_w - g.start_w + 1 > 1 ? end_w - g.start_w + 1 : 1;
  const int64_t roi_h = end_h - g.start_h + 1 > 1 ? end_h - g.start_h + 1 : 1;
  g.bin_h = static_cast<T>(roi_h) / static_cast<T>(pooled_h);
  g.bin_w = static_cast<T>(roi_w) / static_cast<T>(pooled_w);
  return g;
}

C10_HOST_DEVICE inline int64_t clamp_index(int64_t v, int64_t size) {
  return v < 0 ? 0 : (v > size ? size : v);
}

// Pixel range [*lo, *hi) of bin p along one axis, clamped to [0, size).
template <typename T>
C10_HOST_DEVICE inline void pool_bin_range(int64_t start, T bin, int64_t p, int64_t size, int64_t* lo, int64_t* hi) {
  *lo = clamp_index(static_cast<int64_t>(::floor(static_cast<T>(p) * bin)) + start, size);
  *hi = clamp_index(static_cast<int64_t>(::ceil(static_cast<T>(p + 1) * bin)) + start, size);
}

// The running maximum starts at -FLT_MAX (torchvision's constant, for float64 too).
template <typename T>
C10_HOST_DEVICE inline T pool_init() {
  return static_cast<T>(-FLT_MAX);
}

// Running maximum of one bin [h0, h1) x [w0, w1) of a feature plane read through strides (ish, isw), updating
// (*best, *where) as torchvision's roi_pool: a value wins only if it is strictly greater (NaN never wins, ties keep the
// first pixel in row-major order). Branch-free selects: bins hold a handful of pixels, so a data-dependent branch would
// mispredict about half the time. Shared by roi_pool's and roi_spp's CPU and CUDA kernels.
template <typename scalar_t, typename T>
C10_HOST_DEVICE inline void pool_bin_max(const scalar_t* plane, int64_t ish, int64_t isw, int64_t W, int64_t h0,
                                         int64_t h1, int64_t w0, int64_t w1, T* best, int32_t* where) {
  T top = *best;
  int32_t at = *where;
  for (int64_t h = h0; h < h1; ++h) {
    const scalar_t* line = plane + h * ish;
    const int32_t row = static_cast<int32_t>(h * W);
    for (int64_t w = w0; w < w1; ++w) {
      const T v = static_cast<T>(line[w * isw]);
      const bool better = v > top;
      top = better ? v : top;
      at = better ? row + static_cast<int32_t>(w) : at;
    }
  }
  *best = top;
  *where = at;
}

}  // namespace roi
}  // namespace fastdet
