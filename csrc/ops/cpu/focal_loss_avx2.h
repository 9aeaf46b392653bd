#pragma once
// AVX2 evaluation of focal::element for 8 float elements at a time, used by the CPU kernel when the machine has AVX2
// and FMA (checked at run time, so the extension still loads and runs everywhere; other machines take the scalar
// path). The transcendental functions are SLEEF's 1-ulp AVX2 versions that libtorch_cpu already ships; they are looked
// up at run time (dlsym), so a torch build that does not export them costs speed, never an import failure.
//
// The arithmetic is focal::element's, operation for operation (same products, same order, comparisons with the same
// NaN behaviour), so the two paths differ only by SLEEF's exp/log1p/pow against libm's (<= 1 ulp each).
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define FASTDET_FOCAL_AVX2 1
#include <dlfcn.h>
#include <cstdlib>
#include <immintrin.h>

namespace fastdet {
namespace focal_avx2 {

// Looked up once; compiled for the baseline ISA, so calling it is safe on any x86-64 machine.
struct Sleef {
  void* exp = nullptr;
  void* log1p = nullptr;
  void* pow = nullptr;
  bool ok = false;
};

inline const Sleef& sleef() {
  static const Sleef s = [] {
    Sleef r;
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return r;
    // FASTDET_FOCAL_SCALAR=1 forces the scalar path (the code the CUDA kernel shares), so tests can compare the two.
    const char* force_scalar = std::getenv("FASTDET_FOCAL_SCALAR");
    if (force_scalar != nullptr && force_scalar[0] != '\0' && force_scalar[0] != '0') return r;
    void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
    if (lib == nullptr) return r;
    r.exp = dlsym(lib, "Sleef_expf8_u10avx2");
    r.log1p = dlsym(lib, "Sleef_log1pf8_u10avx2");
    r.pow = dlsym(lib, "Sleef_powf8_u10avx2");
    r.ok = r.exp != nullptr && r.log1p != nullptr && r.pow != nullptr;
    return r;
  }();
  return s;
}

#pragma GCC push_options
#pragma GCC target("avx2,fma")

using vexp_t = __m256 (*)(__m256);
using vpow_t = __m256 (*)(__m256, __m256);

// l[k], g[k] (if g) for x[k], t[k], k < 8.
__attribute__((target("avx2,fma"))) inline void element8(const float* xp, const float* tp, float alpha, float gamma,
                                                           int gamma_kind, float* lp, float* gp) {
  const Sleef& sl = sleef();
  const auto vexp = reinterpret_cast<vexp_t>(sl.exp);
  const auto vlog1p = reinterpret_cast<vexp_t>(sl.log1p);
  const auto vpow = reinterpret_cast<vpow_t>(sl.pow);
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f);
  const __m256 x = _mm256_loadu_ps(xp), t = _mm256_loadu_ps(tp);
  const __m256 ax = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  const __m256 e = vexp(_mm256_sub_ps(zero, ax));
  const __m256 inv = _mm256_div_ps(one, _mm256_add_ps(one, e));
  const __m256 nonneg = _mm256_cmp_ps(x, zero, _CMP_GE_OQ);
  const __m256 e_inv = _mm256_mul_ps(e, inv);
  const __m256 p = _mm256_blendv_ps(e_inv, inv, nonneg);
  const __m256 pm = _mm256_blendv_ps(inv, e_inv, nonneg);
  const __m256 log_term = vlog1p(e);
  const __m256 sp_pos = _mm256_add_ps(_mm256_blendv_ps(zero, x, _mm256_cmp_ps(x, zero, _CMP_GT_OQ)), log_term);
  const __m256 neg_x = _mm256_sub_ps(zero, x);
  const __m256 sp_neg = _mm256_add_ps(_mm256_blendv_ps(zero, neg_x, _mm256_cmp_ps(x, zero, _CMP_LT_OQ)), log_term);
  const __m256 omt = _mm256_sub_ps(one, t);
  // ce = [t != 0] t * sp_neg + [1 - t != 0] (1 - t) * sp_pos; != is true for NaN, as in C++.
  const __m256 ce = _mm256_add_ps(
      _mm256_blendv_ps(zero, _mm256_mul_ps(t, sp_neg), _mm256_cmp_ps(t, zero, _CMP_NEQ_UQ)),
      _mm256_blendv_ps(zero, _mm256_mul_ps(omt, sp_pos), _mm256_cmp_ps(omt, zero, _CMP_NEQ_UQ)));
  const __m256 q = _mm256_add_ps(_mm256_mul_ps(p, omt), _mm256_mul_ps(pm, t));
  __m256 m;
  switch (gamma_kind) {
    case 0: m = one; break;
    case 1: m = q; break;
    case 2: m = _mm256_mul_ps(q, q); break;
    default: m = vpow(q, _mm256_set1_ps(gamma));
  }
  const __m256 a_t = alpha < 0.0f ? one
                                  : _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(alpha), t),
                                                  _mm256_mul_ps(_mm256_set1_ps(1.0f - alpha), omt));
  _mm256_storeu_ps(lp, _mm256_mul_ps(_mm256_mul_ps(a_t, ce), m));
  if (gp == nullptr) return;
  const __m256 dce = _mm256_sub_ps(_mm256_mul_ps(p, omt), _mm256_mul_ps(pm, t));
  const __m256 dq = _mm256_mul_ps(_mm256_mul_ps(_mm256_sub_ps(one, _mm256_mul_ps(two, t)), p), pm);
  __m256 g = _mm256_mul_ps(dce, m);
  if (gamma_kind != 0) {
    __m256 dpow;
    switch (gamma_kind) {
      case 1: dpow = one; break;
      case 2: dpow = _mm256_mul_ps(two, q); break;
      default: dpow = _mm256_mul_ps(_mm256_set1_ps(gamma), vpow(q, _mm256_set1_ps(gamma - 1.0f)));
    }
    const __m256 take = _mm256_and_ps(_mm256_cmp_ps(dq, zero, _CMP_NEQ_UQ), _mm256_cmp_ps(q, zero, _CMP_NEQ_UQ));
    g = _mm256_blendv_ps(g, _mm256_add_ps(g, _mm256_mul_ps(_mm256_mul_ps(ce, dpow), dq)), take);
    // In the scalar code the NaN fallback only runs when the term was not taken; NaN dq or q always takes it here.
  } else {
    const __m256 nan_in = _mm256_or_ps(_mm256_cmp_ps(dq, dq, _CMP_UNORD_Q), _mm256_cmp_ps(q, q, _CMP_UNORD_Q));
    g = _mm256_blendv_ps(g, _mm256_add_ps(dq, q), nan_in);
  }
  _mm256_storeu_ps(gp, _mm256_mul_ps(a_t, g));
}

#pragma GCC pop_options

}  // namespace focal_avx2
}  // namespace fastdet
#endif
