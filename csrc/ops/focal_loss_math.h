#pragma once
// Sigmoid focal loss of one element, shared by the CPU and CUDA kernels so both backends evaluate the same expression.
// T is the accumulation type: float for float16/bfloat16/float32 inputs, double for float64.
//
//   p   = sigmoid(x)                     p_m = 1 - p = sigmoid(-x)
//   ce  = t * softplus(-x) + (1 - t) * softplus(x)        (binary cross-entropy with logits)
//   q   = 1 - p_t = p * (1 - t) + p_m * t
//   a_t = alpha * t + (1 - alpha) * (1 - t)               (1 when alpha < 0)
//   loss = a_t * ce * q^gamma
//
// Numerics, and where they differ from torchvision's composite (which evaluates the textbook expressions):
//   * p and p_m both come from e = exp(-|x|), so 1 - p is never formed by cancellation: for t = 1 and x = 20 (float32)
//     torchvision's (1 - p) rounds to 0 and its loss to 0, here q = p_m ~ 2e-9 and the loss is the true ~1e-26.
//   * softplus(z) = max(z, 0) + log1p(exp(-|z|)) shares the same e for z = x and z = -x.
//   * A term whose coefficient is exactly zero is skipped rather than multiplied, so that 0 * inf never appears:
//     x = +inf gives loss 0 for t = 1 and +inf for t = 0 (torchvision: NaN and +inf), x = -inf gives +inf for t = 1 and
//     0 for t = 0 (torchvision: NaN, NaN). The gradients are the finite limits: -a_t * (t - p) * q^gamma with the
//     q-derivative term vanishing, i.e. 0, 1 - alpha, -alpha, 0 for the four cases above. NaN in x or t gives NaN.
//     With alpha 0 (or 1) the targets 1 (or 0) weigh a_t = 0: their loss is 0 at every logit, infinite ones included.
//   * d loss / dx = a_t * [(p - t) * q^gamma + ce * gamma * q^(gamma - 1) * dq/dx],  dq/dx = (1 - 2t) * p * p_m.
//     The second term is taken as 0 where dq/dx == 0 or q == 0 (both mean p saturated at 0 or 1 with t in {0, 1}),
//     which is its limit for every gamma > 0; torchvision's autograd gives NaN there for gamma < 1 (0 * inf).
//   * gamma == 2 (the RetinaNet default) and gamma in {0, 1} avoid pow(): q * q is what torch's pow(q, 2) computes.
#include <torch/headeronly/macros/Macros.h>

#include <cmath>

namespace fastdet {
namespace focal {

template <typename T>
struct Params {
  T alpha;     // < 0: no alpha weighting
  T gamma;     // >= 0
  int gamma_kind;  // 0: gamma == 0, 1: gamma == 1, 2: gamma == 2, 3: general pow
};

inline int classify_gamma(double gamma) {
  return gamma == 0.0 ? 0 : gamma == 1.0 ? 1 : gamma == 2.0 ? 2 : 3;
}

template <typename T>
C10_HOST_DEVICE inline T pow_gamma(T q, const Params<T>& prm) {
  switch (prm.gamma_kind) {
    case 0: return T(1);
    case 1: return q;
    case 2: return q * q;
    default: return ::pow(q, prm.gamma);
  }
}

// gamma * q^(gamma - 1), only called with q > 0.
template <typename T>
C10_HOST_DEVICE inline T dpow_gamma(T q, const Params<T>& prm) {
  switch (prm.gamma_kind) {
    case 0: return T(0);
    case 1: return T(1);
    case 2: return T(2) * q;
    default: return prm.gamma * ::pow(q, prm.gamma - T(1));
  }
}

// Loss of one element; when WithGrad, also d loss / dx in *grad.
template <typename T, bool WithGrad>
C10_HOST_DEVICE inline T element(T x, T t, const Params<T>& prm, T* grad) {
  const T e = ::exp(-::fabs(x));
  const T inv = T(1) / (T(1) + e);
  const bool nonneg = x >= T(0);
  // NaN x: e, inv are NaN and so is everything derived from them, whichever branch is taken.
  const T p = nonneg ? inv : e * inv;
  const T pm = nonneg ? e * inv : inv;
  const T log_term = ::log1p(e);
  const T sp_pos = (x > T(0) ? x : T(0)) + log_term;   // softplus(x)
  const T sp_neg = (x < T(0) ? -x : T(0)) + log_term;  // softplus(-x)
  const T one_minus_t = T(1) - t;
  T ce = T(0);
  if (t != T(0)) ce += t * sp_neg;
  if (one_minus_t != T(0)) ce += one_minus_t * sp_pos;
  const T q = p * one_minus_t + pm * t;
  const T m = pow_gamma(q, prm);
  const T a_t = prm.alpha < T(0) ? T(1) : prm.alpha * t + (T(1) - prm.alpha) * one_minus_t;
  if (WithGrad) {
    const T dce = p * one_minus_t - pm * t;  // = p - t, without cancellation for t in {0, 1}
    const T dq = (T(1) - T(2) * t) * p * pm;
    T g = dce * m;
    if (dq != T(0) && q != T(0) && prm.gamma_kind != 0) {
      g += ce * dpow_gamma(q, prm) * dq;
    } else if (dq != dq || q != q) {
      g = dq + q;  // NaN stays NaN
    }
    *grad = a_t * g;
  }
  // alpha 0 or 1 gives one side the weight a_t == 0: its loss is 0 for every finite logit, so the limit at an infinite
  // one (ce = +inf) is 0 too, not 0 * inf. (Its gradient a_t * g is already 0: g is finite there.)
  if (a_t == T(0) && ce == T(INFINITY)) return T(0);
  return a_t * ce * m;
}

}  // namespace focal
}  // namespace fastdet
