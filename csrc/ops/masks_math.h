#pragma once
// Per-element math of the mask ops, shared by the CPU and CUDA kernels so both place every pixel identically.
//
// paste_masks_in_image follows torchvision's paste_masks_in_image (0.29) step by step:
//   1. the M_h x M_w mask is zero-padded by `padding` on every side (torchvision's expand_masks), and the box is scaled
//      about its centre by s = (M_w + 2 padding) / M_w, computed in double and rounded to the box's compute type
//      (expand_boxes; every intermediate is rounded to the box dtype, as the tensor arithmetic does);
//   2. the expanded box is truncated towards zero to integers (b0, b1, b2, b3); the pasted patch is
//      w = max(b2 - b0 + 1, 1) by h = max(b3 - b1 + 1, 1) pixels with its top-left corner at (b0, b1);
//   3. the padded mask is resized to h x w with torch's bilinear interpolation (align_corners=False), and the part of
//      the patch inside the image is written; every other pixel is 0.
// Step 3 is torch's CPU upsample_bilinear2d as compiled for x86-64 (generic path): per axis the source position is
// fma(in / out, o + 0.5, -0.5) clamped at 0, the weights are rounded to the mask dtype, and a value is
// fma(row0, wy0, row1 * wy1) with row = fma(v0, wx0, v1 * wx1). Written with explicit fmas, the CPU and CUDA kernels
// agree bitwise with each other; torch itself takes another code path for small outputs (h + w <= 128), whose
// results differ from these by an ulp or so.
//
// Defined results where torchvision fails: a box whose expanded patch lies entirely outside the image pastes nothing
// (torchvision's slicing raises or wraps around there), and a box with a non-finite or huge (|x| >= 2^52) expanded
// coordinate pastes nothing (torchvision's integer conversion is undefined there).
#include <torch/headeronly/macros/Macros.h>

#include <cmath>
#include <cstdint>

#include "ops/exact_math.h"

namespace fastdet {
namespace masks {

// Fused multiply-add, rounded once on both backends (torch's CPU kernels are compiled with contraction).
C10_HOST_DEVICE inline float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

C10_HOST_DEVICE inline double fma_rn(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return __fma_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// Rounds an opmath value A to the storage type T and back (a no-op for float/double storage).
template <typename T, typename A>
C10_HOST_DEVICE inline A round_to(A v) {
  return static_cast<A>(static_cast<T>(v));
}

// Integer patch of one detection: top-left (x0, y0), size (w, h) >= 1. valid is false when the box pastes nothing
// because a coordinate is not finite or too large to convert.
struct Patch {
  int64_t x0, y0, w, h;
  bool valid;
};

constexpr double kMaxCoord = 4503599627370496.0;  // 2^52: beyond it the truncation to int64 is not meaningful

template <typename A>
C10_HOST_DEVICE inline bool convertible(A v) {
  return v == v && v < static_cast<A>(kMaxCoord) && v > -static_cast<A>(kMaxCoord);
}

// box: (x1, y1, x2, y2) in storage type T (A is its compute type); scale: (M_w + 2 padding) / M_w.
template <typename T, typename A>
C10_HOST_DEVICE inline Patch expand_box(const T* box, A scale) {
  const A x1 = static_cast<A>(box[0]), y1 = static_cast<A>(box[1]);
  const A x2 = static_cast<A>(box[2]), y2 = static_cast<A>(box[3]);
  // w_half = (x2 - x1) * 0.5 * scale and x_c = (x2 + x1) * 0.5, each operation rounded to T.
  const A w_half =
      round_to<T>(exact::mul_rn(round_to<T>(exact::mul_rn(round_to<T>(exact::sub_rn(x2, x1)), A(0.5))), scale));
  const A h_half =
      round_to<T>(exact::mul_rn(round_to<T>(exact::mul_rn(round_to<T>(exact::sub_rn(y2, y1)), A(0.5))), scale));
  const A x_c = round_to<T>(exact::mul_rn(round_to<T>(exact::add_rn(x2, x1)), A(0.5)));
  const A y_c = round_to<T>(exact::mul_rn(round_to<T>(exact::add_rn(y2, y1)), A(0.5)));
  const A ex0 = round_to<T>(exact::sub_rn(x_c, w_half)), ex1 = round_to<T>(exact::add_rn(x_c, w_half));
  const A ey0 = round_to<T>(exact::sub_rn(y_c, h_half)), ey1 = round_to<T>(exact::add_rn(y_c, h_half));
  Patch p{0, 0, 1, 1, false};
  if (!(convertible(ex0) && convertible(ex1) && convertible(ey0) && convertible(ey1))) {
    return p;
  }
  const int64_t b0 = static_cast<int64_t>(ex0), b1 = static_cast<int64_t>(ey0);
  const int64_t b2 = static_cast<int64_t>(ex1), b3 = static_cast<int64_t>(ey1);
  p.x0 = b0;
  p.y0 = b1;
  p.w = b2 - b0 + 1 > 1 ? b2 - b0 + 1 : 1;
  p.h = b3 - b1 + 1 > 1 ? b3 - b1 + 1 : 1;
  p.valid = true;
  return p;
}

// The pixels [first, last) of an image axis of length `size` that the patch [start, start + length) covers.
C10_HOST_DEVICE inline void clip_span(int64_t start, int64_t length, int64_t size, int64_t* first, int64_t* last) {
  *first = start > 0 ? start : 0;
  const int64_t end = start + length;
  *last = end < size ? end : size;
  if (*last < *first) {
    *last = *first;
  }
}

// Bilinear source taps of output index o along one axis resized from `in` to `out` pixels (align_corners=False),
// weights rounded to the mask dtype T.
template <typename A>
struct Taps {
  int64_t i0, i1;
  A w0, w1;
};

template <typename T, typename A>
C10_HOST_DEVICE inline Taps<A> taps(int64_t o, int64_t in, int64_t out, A ratio) {
  Taps<A> t;
  if (in == out) {
    t.i0 = t.i1 = o;
    t.w0 = A(1);
    t.w1 = A(0);
    return t;
  }
  A real = fma_rn(ratio, static_cast<A>(o) + A(0.5), A(-0.5));
  real = real < A(0) ? A(0) : real;
  int64_t i0 = static_cast<int64_t>(::floor(real));
  i0 = i0 < in - 1 ? i0 : in - 1;
  A l1 = real - static_cast<A>(i0);
  l1 = l1 < A(0) ? A(0) : (l1 > A(1) ? A(1) : l1);
  t.i0 = i0;
  t.i1 = i0 + (i0 < in - 1 ? 1 : 0);
  t.w0 = round_to<T>(A(1) - l1);
  t.w1 = round_to<T>(l1);
  return t;
}

// torch's area_pixel_compute_scale for align_corners=False and no explicit scale: in / out in the compute type.
template <typename A>
C10_HOST_DEVICE inline A resize_ratio(int64_t in, int64_t out) {
  return static_cast<A>(in) / static_cast<A>(out);
}

// Value of the zero-padded mask (rows and columns shifted by `pad`) at padded pixel (py, px).
template <typename T, typename A>
C10_HOST_DEVICE inline A padded_value(const T* mask, int64_t mh, int64_t mw, int64_t pad, int64_t py, int64_t px) {
  const int64_t y = py - pad, x = px - pad;
  if (y < 0 || y >= mh || x < 0 || x >= mw) {
    return A(0);
  }
  return static_cast<A>(mask[y * mw + x]);
}

// One output pixel of the resized padded mask.
template <typename T, typename A>
C10_HOST_DEVICE inline A resized_value(const T* mask, int64_t mh, int64_t mw, int64_t pad, const Taps<A>& ty,
                                       const Taps<A>& tx) {
  const A r0 = fma_rn(padded_value<T, A>(mask, mh, mw, pad, ty.i0, tx.i0), tx.w0,
                      exact::mul_rn(padded_value<T, A>(mask, mh, mw, pad, ty.i0, tx.i1), tx.w1));
  const A r1 = fma_rn(padded_value<T, A>(mask, mh, mw, pad, ty.i1, tx.i0), tx.w0,
                      exact::mul_rn(padded_value<T, A>(mask, mh, mw, pad, ty.i1, tx.i1), tx.w1));
  return fma_rn(r0, ty.w0, exact::mul_rn(r1, ty.w1));
}

}  // namespace masks
}  // namespace fastdet
