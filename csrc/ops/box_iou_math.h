#pragma once
// The IoU family for one pair of (x1, y1, x2, y2) boxes, shared by the CPU and CUDA kernels so both backends evaluate
// the same expression in the same order. T is the accumulation type (float for float16/bfloat16/float32 inputs,
// double for float64).
//
// The formulas follow torchvision.ops exactly, including its conventions at the edges, because fastdet promises the
// same numbers:
//   * areas are (x2 - x1) * (y2 - y1) without clamping, so a degenerate box has a negative or zero area;
//   * intersection and enclosure sides are clamped at zero; IoU = inter / union may be NaN when union == 0;
//   * DIoU and CIoU add eps only to the squared enclosure diagonal; CIoU treats alpha as a constant under autograd.
// The backward mirrors what torch's autograd (torch 2.14, the pinned version) does for those expressions:
// clamp(min=0) with a scalar bound passes the gradient only where the input is > 0 (an input exactly at the bound,
// e.g. two boxes touching along an edge, gets none), and a tie in an elementwise min/max splits the gradient evenly
// between both arguments.
//
// The forward values are a bitwise contract between the backends (and torchvision's CPU results): every sum of
// products in them is written with the explicitly rounded helpers of exact_math.h, which nvcc cannot contract into
// an FMA (it would, e.g., fuse area_a + area_b - iw * ih and cw * cw + ch * ch). The backward's arithmetic may be
// contracted: gradients agree between the backends to rounding, and every discrete decision in it (clamps, min/max
// ties) compares plain differences of coordinates, which no contraction changes.
#include <torch/headeronly/macros/Macros.h>

#include "ops/box_pair_grad.h"
#include "ops/exact_math.h"

namespace fastdet {
namespace iou {

enum Variant : int64_t { kIoU = 0, kGIoU = 1, kDIoU = 2, kCIoU = 3 };

template <typename T>
struct Box {
  T x1, y1, x2, y2;
};

template <typename T>
C10_HOST_DEVICE inline T clamp_min_zero(T v) {
  return v < T(0) ? T(0) : v;  // NaN stays NaN, as in torch.clamp
}

template <typename T>
C10_HOST_DEVICE inline T maximum(T a, T b) {
  return a > b ? a : b;
}

template <typename T>
C10_HOST_DEVICE inline T minimum(T a, T b) {
  return a < b ? a : b;
}

// 4/pi^2, the CIoU aspect-ratio constant.
template <typename T>
C10_HOST_DEVICE inline T ciou_k() {
  return T(0.40528473456935108578);
}

// area_a + area_b - inter, each operation rounded on its own (as on the CPU and in torchvision).
template <typename T>
C10_HOST_DEVICE inline T union_area(T area_a, T area_b, T inter) {
  return exact::sub_rn(exact::add_rn(area_a, area_b), inter);
}

// a * a + b * b, rounded after each operation.
template <typename T>
C10_HOST_DEVICE inline T sum_of_squares(T a, T b) {
  return exact::add_rn(exact::mul_rn(a, a), exact::mul_rn(b, b));
}

template <typename T>
C10_HOST_DEVICE inline T pair_forward(const Box<T>& a, const Box<T>& b, int64_t variant, T eps) {
  const T area_a = exact::mul_rn(a.x2 - a.x1, a.y2 - a.y1);
  const T area_b = exact::mul_rn(b.x2 - b.x1, b.y2 - b.y1);
  const T iw = clamp_min_zero(minimum(a.x2, b.x2) - maximum(a.x1, b.x1));
  const T ih = clamp_min_zero(minimum(a.y2, b.y2) - maximum(a.y1, b.y1));
  const T inter = exact::mul_rn(iw, ih);
  const T uni = union_area(area_a, area_b, inter);
  const T iou = inter / uni;
  if (variant == kIoU) {
    return iou;
  }
  const T cw = clamp_min_zero(maximum(a.x2, b.x2) - minimum(a.x1, b.x1));
  const T ch = clamp_min_zero(maximum(a.y2, b.y2) - minimum(a.y1, b.y1));
  if (variant == kGIoU) {
    const T enclosure = exact::mul_rn(cw, ch);
    return iou - exact::sub_rn(enclosure, uni) / enclosure;
  }
  const T diag = exact::add_rn(sum_of_squares(cw, ch), eps);
  const T dx = (a.x1 + a.x2) / T(2) - (b.x1 + b.x2) / T(2);
  const T dy = (a.y1 + a.y2) / T(2) - (b.y1 + b.y2) / T(2);
  const T diou = iou - sum_of_squares(dx, dy) / diag;
  if (variant == kDIoU) {
    return diou;
  }
  const T dtheta = ::atan((a.x2 - a.x1) / (a.y2 - a.y1)) - ::atan((b.x2 - b.x1) / (b.y2 - b.y1));
  const T v = ciou_k<T>() * (dtheta * dtheta);  // k * dtheta^2, rounded in the same order as torchvision
  const T alpha = v / (T(1) - iou + v + eps);
  return exact::sub_rn(diou, exact::mul_rn(alpha, v));
}

// Gradient of g * pair_forward(a, b) with respect to both boxes (written into ga and gb, order x1, y1, x2, y2).
template <typename T>
C10_HOST_DEVICE inline void pair_backward(const Box<T>& a, const Box<T>& b, int64_t variant, T eps, T g, T ga[4],
                                          T gb[4]) {
  const T wa = a.x2 - a.x1, ha = a.y2 - a.y1;
  const T wb = b.x2 - b.x1, hb = b.y2 - b.y1;
  // The intermediates the forward also forms are rounded as there, so iou, union, diag, ... are the forward's values.
  const T area_a = exact::mul_rn(wa, ha), area_b = exact::mul_rn(wb, hb);
  const T iw_raw = minimum(a.x2, b.x2) - maximum(a.x1, b.x1);
  const T ih_raw = minimum(a.y2, b.y2) - maximum(a.y1, b.y1);
  const T iw = clamp_min_zero(iw_raw), ih = clamp_min_zero(ih_raw);
  const T inter = exact::mul_rn(iw, ih);
  const T uni = union_area(area_a, area_b, inter);
  const T iou = inter / uni;

  // Gradients with respect to the intermediate quantities.
  const T g_iou = g;
  T g_inter = g_iou / uni;
  T g_union = -g_iou * inter / (uni * uni);
  T g_cw = T(0), g_ch = T(0);           // enclosure sides (after clamping)
  T g_dx = T(0), g_dy = T(0);           // centre offsets (a minus b)
  T g_wa = T(0), g_ha = T(0), g_wb = T(0), g_hb = T(0);  // box sides, besides their use in the areas

  T cw = T(0), ch = T(0), cw_raw = T(0), ch_raw = T(0);
  if (variant != kIoU) {
    cw_raw = maximum(a.x2, b.x2) - minimum(a.x1, b.x1);
    ch_raw = maximum(a.y2, b.y2) - minimum(a.y1, b.y1);
    cw = clamp_min_zero(cw_raw);
    ch = clamp_min_zero(ch_raw);
  }
  if (variant == kGIoU) {
    // giou = iou - (C - U) / C
    const T enclosure = exact::mul_rn(cw, ch);
    const T g_enclosure = -g * uni / (enclosure * enclosure);
    g_union += g / enclosure;
    g_cw += g_enclosure * ch;
    g_ch += g_enclosure * cw;
  } else if (variant == kDIoU || variant == kCIoU) {
    // diou = iou - rho2 / D, D = cw^2 + ch^2 + eps, rho2 = dx^2 + dy^2
    const T diag = exact::add_rn(sum_of_squares(cw, ch), eps);
    const T dx = (a.x1 + a.x2) / T(2) - (b.x1 + b.x2) / T(2);
    const T dy = (a.y1 + a.y2) / T(2) - (b.y1 + b.y2) / T(2);
    const T rho2 = sum_of_squares(dx, dy);
    const T g_rho2 = -g / diag;
    const T g_diag = g * rho2 / (diag * diag);
    g_cw += g_diag * T(2) * cw;
    g_ch += g_diag * T(2) * ch;
    g_dx += g_rho2 * T(2) * dx;
    g_dy += g_rho2 * T(2) * dy;
    if (variant == kCIoU) {
      // ciou = diou - alpha * v with alpha held constant; v = k * (atan(wa/ha) - atan(wb/hb))^2
      const T ra = wa / ha, rb = wb / hb;
      const T dtheta = ::atan(ra) - ::atan(rb);
      const T v = ciou_k<T>() * (dtheta * dtheta);
      const T alpha = v / (T(1) - iou + v + eps);
      const T g_v = -g * alpha;
      const T g_dtheta = g_v * ciou_k<T>() * T(2) * dtheta;
      const T g_ra = g_dtheta / (T(1) + ra * ra);
      const T g_rb = -g_dtheta / (T(1) + rb * rb);
      g_wa += g_ra / ha;
      g_ha += -g_ra * wa / (ha * ha);
      g_wb += g_rb / hb;
      g_hb += -g_rb * wb / (hb * hb);
    }
  }

  // union = area_a + area_b - inter
  g_inter -= g_union;
  g_wa += g_union * ha;
  g_ha += g_union * wa;
  g_wb += g_union * hb;
  g_hb += g_union * wb;

  // inter = iw * ih, each clamped at zero (gradient passes where the raw value is > 0, see the header comment)
  const T g_iw = iw_raw > T(0) ? g_inter * ih : T(0);
  const T g_ih = ih_raw > T(0) ? g_inter * iw : T(0);

  // With variant IoU the enclosure gradients are zero, so routing them changes nothing.
  const T g_cw_raw = cw_raw > T(0) ? g_cw : T(0);
  const T g_ch_raw = ch_raw > T(0) ? g_ch : T(0);
  const T ac[4] = {a.x1, a.y1, a.x2, a.y2};
  const T bc[4] = {b.x1, b.y1, b.x2, b.y2};
  route_pair_grads<T>(ac, bc, PairGrads<T>{g_iw, g_ih, g_cw_raw, g_ch_raw, g_dx, g_dy, g_wa, g_ha, g_wb, g_hb}, ga, gb);
}

}  // namespace iou
}  // namespace fastdet
