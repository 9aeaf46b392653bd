#pragma once
// Box coding (R-CNN deltas) shared by the CPU and CUDA kernels, with torchvision's BoxCoder formulas evaluated
// operation by operation in the same order, each rounded to the accumulation type A (float for float16/bfloat16/
// float32, double for float64):
//
//   decode: w = x2 - x1, cx = x1 + 0.5 w; dx = r0 / wx; dw = min(r2 / ww, clip);
//           pcx = dx * w + cx; pw = exp(dw) * w; x1' = pcx - 0.5 pw, x2' = pcx + 0.5 pw   (y likewise)
//   encode: dx = (wx * (gcx - ecx)) / ew; dw = ww * log(gw / ew)
//
// Two details keep the numbers torchvision's: products and sums are rounded separately (on CUDA through the _rn
// intrinsics, since nvcc would otherwise contract dx * w + cx into one fused multiply-add), and the clip is a plain
// comparison, so NaN deltas stay NaN as with torch.clamp. exp and log: the CPU decode/encode kernels evaluate them
// with torch's own exp / log (aten::exp / aten::log through the dispatcher) over arrays laid out exactly like
// torchvision's intermediate tensors, so the CPU results are torchvision's bit for bit; the CUDA kernels and the CPU
// gather-decode use the math library's expf/logf (within an ulp or two of torch's).
//
// Ops (schema file box_coder.cpp): the public box_decode, _box_decode_backward, box_encode and _decode_select_boxes
// check their arguments once and call the per-backend kernels
//   _box_decode_kernel(rel_codes [R, 4C], boxes [Rb, 4], weights, clip) -> [R, 4C]
//   _box_decode_backward_kernel(grad [R, 4C], rel_codes, boxes, weights, clip) -> ([R, 4C], [Rb, 4])
//   _box_encode_kernel(reference_boxes [N, 4], proposals [N, 4], weights) -> [N, 4]
//   _decode_select_boxes_kernel(rel_codes [B, N, 4], anchors [Ba, N, 4], index [B, K] int64,
//                               image_sizes [B, 2] float64 or None, weights, clip) -> [B, K, 4]
// with every tensor contiguous, on one device, the box tensors in one floating dtype, weights 4 finite non-zero
// numbers and clip not NaN (R a multiple of Rb; Ba = 1 or B).
#include <torch/headeronly/macros/Macros.h>

#include <cmath>
#include <cstdint>

#include "ops/exact_math.h"
#include "ops/stable.h"

namespace fastdet {
namespace coder {

using exact::add_rn;
using exact::mul_rn;
using exact::sub_rn;

// exp / log in A. Device code uses CUDA's expf/logf (max. 2 ulp / 1 ulp), not the fast intrinsics.
C10_HOST_DEVICE inline float exp_a(float x) {
#if defined(__CUDA_ARCH__)
  return ::expf(x);
#else
  return std::exp(x);
#endif
}
C10_HOST_DEVICE inline double exp_a(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}
C10_HOST_DEVICE inline float log_a(float x) {
#if defined(__CUDA_ARCH__)
  return ::logf(x);
#else
  return std::log(x);
#endif
}
C10_HOST_DEVICE inline double log_a(double x) {
#if defined(__CUDA_ARCH__)
  return ::log(x);
#else
  return std::log(x);
#endif
}

// Weights and clip converted once to A, as torch converts the Python scalars it is given.
template <typename A>
struct Params {
  A wx, wy, ww, wh, clip;
};

template <typename A>
struct Decoded {
  A dx, dy, dw, dh;  // deltas after weighting and clipping
  A w, h;            // reference box size
  A ew, eh;          // exp(dw), exp(dh)
  bool pass_w, pass_h;  // the clip let dw / dh through (gradient flows): strictly below the clip, as torch.clamp's
};

// Decoding in two halves, so that a backend can evaluate exp(dw), exp(dh) in between with a library of its choice
// (the CPU kernel uses torch's own vectorised exp, which makes its results torchvision's bit for bit).
// decode_prepare: the clamped size deltas dw, dh (and whether the clamp let them through).
template <typename A>
C10_HOST_DEVICE inline Decoded<A> decode_prepare(const A r[4], const A b[4], const Params<A>& p) {
  Decoded<A> d;
  d.w = sub_rn(b[2], b[0]);
  d.h = sub_rn(b[3], b[1]);
  d.dx = r[0] / p.wx;
  d.dy = r[1] / p.wy;
  const A dw = r[2] / p.ww;
  const A dh = r[3] / p.wh;
  d.pass_w = dw < p.clip;
  d.pass_h = dh < p.clip;
  d.dw = dw > p.clip ? p.clip : dw;  // NaN stays NaN
  d.dh = dh > p.clip ? p.clip : dh;
  d.ew = A(0);
  d.eh = A(0);
  return d;
}

// decode_finish: the corners, given d from decode_prepare with d.ew = exp(d.dw), d.eh = exp(d.dh).
template <typename A>
C10_HOST_DEVICE inline void decode_finish(const A b[4], const Decoded<A>& d, A out[4]) {
  const A cx = add_rn(b[0], mul_rn(A(0.5), d.w));
  const A cy = add_rn(b[1], mul_rn(A(0.5), d.h));
  const A pcx = add_rn(mul_rn(d.dx, d.w), cx);
  const A pcy = add_rn(mul_rn(d.dy, d.h), cy);
  const A hw = mul_rn(A(0.5), mul_rn(d.ew, d.w));
  const A hh = mul_rn(A(0.5), mul_rn(d.eh, d.h));
  out[0] = sub_rn(pcx, hw);
  out[1] = sub_rn(pcy, hh);
  out[2] = add_rn(pcx, hw);
  out[3] = add_rn(pcy, hh);
}

// Decodes one (delta, box) pair into out (x1, y1, x2, y2), and returns the intermediates the backward needs.
template <typename A>
C10_HOST_DEVICE inline Decoded<A> decode_one(const A r[4], const A b[4], const Params<A>& p, A out[4]) {
  Decoded<A> d = decode_prepare(r, b, p);
  d.ew = exp_a(d.dw);
  d.eh = exp_a(d.dh);
  decode_finish(b, d, out);
  return d;
}

// Backward of decode_one for upstream gradient g (x1, y1, x2, y2): gradients of the four deltas and of the box.
template <typename A>
C10_HOST_DEVICE inline void decode_one_backward(const A r[4], const A b[4], const Params<A>& p, const A g[4],
                                                A grad_r[4], A grad_b[4]) {
  A unused[4];
  const Decoded<A> d = decode_one(r, b, p, unused);
  // x: out0 = pcx - hw, out2 = pcx + hw with pcx = dx w + x1 + w / 2 and hw = exp(dw) w / 2
  const A gcx = g[0] + g[2];
  const A ghw = g[2] - g[0];
  const A gcy = g[1] + g[3];
  const A ghh = g[3] - g[1];
  grad_r[0] = gcx * d.w / p.wx;
  grad_r[1] = gcy * d.h / p.wy;
  grad_r[2] = d.pass_w ? ghw * A(0.5) * d.ew * d.w / p.ww : A(0);
  grad_r[3] = d.pass_h ? ghh * A(0.5) * d.eh * d.h / p.wh : A(0);
  // d out / d w (box width) through pcx (dx + 1/2) and hw (exp(dw) / 2); x1 also moves the centre directly.
  const A gw = gcx * (d.dx + A(0.5)) + ghw * A(0.5) * d.ew;
  const A gh = gcy * (d.dy + A(0.5)) + ghh * A(0.5) * d.eh;
  grad_b[0] = gcx - gw;
  grad_b[1] = gcy - gh;
  grad_b[2] = gw;
  grad_b[3] = gh;
}

// Encoding in two halves around the logs, as decoding around exp: encode_ratios gives gw / ew and gh / eh,
// encode_finish the deltas given their logs.
template <typename A>
C10_HOST_DEVICE inline void encode_ratios(const A g[4], const A e[4], A* ratio_w, A* ratio_h) {
  *ratio_w = sub_rn(g[2], g[0]) / sub_rn(e[2], e[0]);
  *ratio_h = sub_rn(g[3], g[1]) / sub_rn(e[3], e[1]);
}

template <typename A>
C10_HOST_DEVICE inline void encode_finish(const A g[4], const A e[4], const Params<A>& p, A log_w, A log_h, A out[4]) {
  const A ew = sub_rn(e[2], e[0]);
  const A eh = sub_rn(e[3], e[1]);
  const A ecx = add_rn(e[0], mul_rn(A(0.5), ew));
  const A ecy = add_rn(e[1], mul_rn(A(0.5), eh));
  const A gw = sub_rn(g[2], g[0]);
  const A gh = sub_rn(g[3], g[1]);
  const A gcx = add_rn(g[0], mul_rn(A(0.5), gw));
  const A gcy = add_rn(g[1], mul_rn(A(0.5), gh));
  out[0] = mul_rn(p.wx, sub_rn(gcx, ecx)) / ew;
  out[1] = mul_rn(p.wy, sub_rn(gcy, ecy)) / eh;
  out[2] = mul_rn(p.ww, log_w);
  out[3] = mul_rn(p.wh, log_h);
}

// Encodes proposal e against reference (ground-truth) box g.
template <typename A>
C10_HOST_DEVICE inline void encode_one(const A g[4], const A e[4], const Params<A>& p, A out[4]) {
  A rw, rh;
  encode_ratios(g, e, &rw, &rh);
  encode_finish(g, e, p, log_a(rw), log_a(rh), out);
}

// weights (wx, wy, ww, wh) and clip converted to A, as torch converts the Python scalars it is given.
template <typename A>
Params<A> make_params(torch::headeronly::HeaderOnlyArrayRef<double> weights, double clip) {
  return Params<A>{static_cast<A>(weights[0]), static_cast<A>(weights[1]), static_cast<A>(weights[2]),
                   static_cast<A>(weights[3]), static_cast<A>(clip)};
}

}  // namespace coder
}  // namespace fastdet
