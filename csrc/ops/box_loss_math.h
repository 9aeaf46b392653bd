#pragma once
// GIoU / DIoU / CIoU losses of one aligned pair of (x1, y1, x2, y2) boxes, shared by the CPU and CUDA kernels.
// T is the accumulation type (float for float16/bfloat16/float32 boxes, double for float64).
//
// These follow torchvision.ops.generalized_box_iou_loss / distance_box_iou_loss / complete_box_iou_loss, whose
// conventions differ from the pairwise functions in box_iou_math.h, so this is a separate header:
//   * the intersection is (xk2 - xk1) * (yk2 - yk1) only where both sides are strictly positive, else exactly 0
//     (a mask, not a clamp: the gradient flows through it only where the mask holds);
//   * iou = inter / (union + eps); the enclosure sides are not clamped;
//   * GIoU: 1 - (iou - (C - union) / (C + eps));
//   * DIoU: (1 - iou) + rho^2 / (cw^2 + ch^2 + eps);
//   * CIoU: DIoU + alpha * v, v = 4/pi^2 * (atan(wb/hb) - atan(wa/ha))^2, alpha = v / (1 - iou + v + eps) held constant
//     under autograd. torchvision computes CIoU's DIoU part with its default eps = 1e-7 whatever eps is passed (only
//     alpha sees the caller's eps); fastdet reproduces that, see kCIoUInnerEps.
// The backward mirrors torch's autograd for those expressions (torch 2.14): an elementwise min/max tie splits the
// gradient evenly between both arguments.
//
// As in box_iou_math.h, the loss values are a contract between the backends: their sums of products use the explicitly
// rounded helpers of exact_math.h, so nvcc cannot contract them into FMAs and the CUDA losses equal the CPU's bitwise.
// The backward may be contracted (gradients agree to rounding; its decisions compare plain coordinate differences).
#include <torch/headeronly/macros/Macros.h>

#include "ops/box_pair_grad.h"
#include "ops/exact_math.h"

#include <cmath>

namespace fastdet {
namespace boxloss {

enum Variant : int64_t { kGIoU = 1, kDIoU = 2, kCIoU = 3 };

constexpr double kCIoUInnerEps = 1e-7;

template <typename T>
C10_HOST_DEVICE inline T maxv(T a, T b) {
  return a > b ? a : b;
}
template <typename T>
C10_HOST_DEVICE inline T minv(T a, T b) {
  return a < b ? a : b;
}

template <typename T>
C10_HOST_DEVICE inline T four_over_pi_sq() {
  return T(0.40528473456935108578);
}

using exact::add_rn;
using exact::mul_rn;
using exact::sub_rn;

// wa * ha + wb * hb - inter, each operation rounded on its own.
template <typename T>
C10_HOST_DEVICE inline T union_area(T wa, T ha, T wb, T hb, T inter) {
  return sub_rn(add_rn(mul_rn(wa, ha), mul_rn(wb, hb)), inter);
}

// a * a + b * b, rounded after each operation.
template <typename T>
C10_HOST_DEVICE inline T sum_of_squares(T a, T b) {
  return add_rn(mul_rn(a, a), mul_rn(b, b));
}

// Loss of one pair; a = predicted (boxes1), b = target (boxes2), each {x1, y1, x2, y2}.
template <typename T>
C10_HOST_DEVICE inline T pair_loss(const T a[4], const T b[4], int64_t variant, T eps) {
  const T xk1 = maxv(a[0], b[0]), yk1 = maxv(a[1], b[1]);
  const T xk2 = minv(a[2], b[2]), yk2 = minv(a[3], b[3]);
  const bool overlap = (yk2 > yk1) && (xk2 > xk1);
  const T inter = overlap ? mul_rn(xk2 - xk1, yk2 - yk1) : T(0);
  const T uni = union_area(a[2] - a[0], a[3] - a[1], b[2] - b[0], b[3] - b[1], inter);
  const T eps_iou = variant == kCIoU ? T(kCIoUInnerEps) : eps;
  const T iou = inter / (uni + eps_iou);
  const T cw = maxv(a[2], b[2]) - minv(a[0], b[0]);
  const T ch = maxv(a[3], b[3]) - minv(a[1], b[1]);
  if (variant == kGIoU) {
    const T area_c = mul_rn(cw, ch);
    return T(1) - (iou - (area_c - uni) / (area_c + eps));
  }
  const T diag = add_rn(sum_of_squares(cw, ch), eps_iou);
  const T dx = (a[2] + a[0]) / T(2) - (b[0] + b[2]) / T(2);
  const T dy = (a[3] + a[1]) / T(2) - (b[1] + b[3]) / T(2);
  const T diou = (T(1) - iou) + sum_of_squares(dx, dy) / diag;
  if (variant == kDIoU) {
    return diou;
  }
  const T dtheta = ::atan((b[2] - b[0]) / (b[3] - b[1])) - ::atan((a[2] - a[0]) / (a[3] - a[1]));
  const T v = four_over_pi_sq<T>() * (dtheta * dtheta);
  const T alpha = v / (T(1) - iou + v + eps);
  return add_rn(diou, mul_rn(alpha, v));
}

// Gradient of g * pair_loss(a, b) with respect to both boxes, written into ga and gb.
template <typename T>
C10_HOST_DEVICE inline void pair_loss_backward(const T a[4], const T b[4], int64_t variant, T eps, T g, T ga[4],
                                               T gb[4]) {
  const T wa = a[2] - a[0], ha = a[3] - a[1];
  const T wb = b[2] - b[0], hb = b[3] - b[1];
  const T xk1 = maxv(a[0], b[0]), yk1 = maxv(a[1], b[1]);
  const T xk2 = minv(a[2], b[2]), yk2 = minv(a[3], b[3]);
  const bool overlap = (yk2 > yk1) && (xk2 > xk1);
  const T iw = xk2 - xk1, ih = yk2 - yk1;
  // Intermediates the forward also forms are rounded as there.
  const T inter = overlap ? mul_rn(iw, ih) : T(0);
  const T uni = union_area(wa, ha, wb, hb, inter);
  const T eps_iou = variant == kCIoU ? T(kCIoUInnerEps) : eps;
  const T den = uni + eps_iou;
  const T iou = inter / den;
  const T cw = maxv(a[2], b[2]) - minv(a[0], b[0]);
  const T ch = maxv(a[3], b[3]) - minv(a[1], b[1]);

  T g_iou = T(0), g_uni = T(0), g_cw = T(0), g_ch = T(0), g_dx = T(0), g_dy = T(0);
  T g_wa = T(0), g_ha = T(0), g_wb = T(0), g_hb = T(0);
  if (variant == kGIoU) {
    // loss = 1 - iou + (C - U) / (C + eps)
    const T area_c = mul_rn(cw, ch);
    const T cden = area_c + eps;
    g_iou = -g;
    const T g_frac = g / cden;
    const T g_area_c = g_frac - g * (area_c - uni) / (cden * cden);
    g_uni -= g_frac;
    g_cw = g_area_c * ch;
    g_ch = g_area_c * cw;
  } else {
    // loss = (1 - iou) + rho2 / D [+ alpha * v]
    const T diag = add_rn(sum_of_squares(cw, ch), eps_iou);
    const T dx = (a[2] + a[0]) / T(2) - (b[0] + b[2]) / T(2);
    const T dy = (a[3] + a[1]) / T(2) - (b[1] + b[3]) / T(2);
    const T rho2 = sum_of_squares(dx, dy);
    g_iou = -g;
    const T g_rho2 = g / diag;
    const T g_diag = -g * rho2 / (diag * diag);
    g_cw = g_diag * T(2) * cw;
    g_ch = g_diag * T(2) * ch;
    g_dx = g_rho2 * T(2) * dx;
    g_dy = g_rho2 * T(2) * dy;
    if (variant == kCIoU) {
      const T ra = wa / ha, rb = wb / hb;
      const T dtheta = ::atan(rb) - ::atan(ra);
      const T v = four_over_pi_sq<T>() * (dtheta * dtheta);
      const T alpha = v / (T(1) - iou + v + eps);
      const T g_dtheta = g * alpha * four_over_pi_sq<T>() * T(2) * dtheta;
      const T g_rb = g_dtheta / (T(1) + rb * rb);
      const T g_ra = -g_dtheta / (T(1) + ra * ra);
      g_wa += g_ra / ha;
      g_ha -= g_ra * wa / (ha * ha);
      g_wb += g_rb / hb;
      g_hb -= g_rb * wb / (hb * hb);
    }
  }
  // iou = inter / (union + eps)
  T g_inter = g_iou / den;
  g_uni -= g_iou * inter / (den * den);
  // union = wa * ha + wb * hb - inter
  g_wa += g_uni * ha;
  g_ha += g_uni * wa;
  g_wb += g_uni * hb;
  g_hb += g_uni * wb;
  g_inter -= g_uni;
  const T g_iw = overlap ? g_inter * ih : T(0);
  const T g_ih = overlap ? g_inter * iw : T(0);

  route_pair_grads<T>(a, b, PairGrads<T>{g_iw, g_ih, g_cw, g_ch, g_dx, g_dy, g_wa, g_ha, g_wb, g_hb}, ga, gb);
}

}  // namespace boxloss
}  // namespace fastdet
