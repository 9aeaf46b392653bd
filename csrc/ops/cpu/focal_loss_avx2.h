#pragma once
// AVX2 evaluation of focal::element for 8 elements at a time (float32, or float16/bfloat16 widened to float32), used
// by the CPU kernel when the machine has AVX2 and FMA (checked at run time, so the extension still loads and runs
// everywhere; other machines take the scalar path). The transcendental functions are SLEEF's 1-ulp AVX2 versions
// that libtorch_cpu already ships; they are looked up at run time (dlsym), so a torch build that does not export them
// costs speed, never an import failure. Only stable-ABI headers are needed: the 16-bit types are torch's headeronly
// ones (fastdet::Half / fastdet::BFloat16), and AVX2 is enabled per function (target attributes), not by a flag.
//
// The arithmetic is focal::element's, operation for operation (same products, same order, comparisons with the same
// NaN behaviour), so the two paths differ only by SLEEF's exp/log1p/pow against libm's (<= 1 ulp each).
#include "ops/cpu/sleef.h"
#if defined(FASTDET_SLEEF_LOOKUP)
#define FASTDET_FOCAL_AVX2 1

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <immintrin.h>

#include "ops/stable.h"  // fastdet::Half, fastdet::BFloat16

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
    // FASTDET_FOCAL_SCALAR=1 forces the scalar path (the code the CUDA kernel shares), so tests can compare the two.
    if (!fastdet::sleef::avx2_fma_f16c() || fastdet::sleef::scalar_forced("FASTDET_FOCAL_SCALAR")) return r;
    r.exp = fastdet::sleef::lookup("Sleef_expf8_u10avx2");
    r.log1p = fastdet::sleef::lookup("Sleef_log1pf8_u10avx2");
    r.pow = fastdet::sleef::lookup("Sleef_powf8_u10avx2");
    r.ok = r.exp != nullptr && r.log1p != nullptr && r.pow != nullptr;
    return r;
  }();
  return s;
}

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

using vexp_t = __m256 (*)(__m256);
using vpow_t = __m256 (*)(__m256, __m256);

// Loss (and, when g != nullptr, gradient) of 8 elements.
template <bool WithGrad>
__attribute__((target("avx2,fma,f16c"))) inline __m256 element8(__m256 x, __m256 t, float alpha, float gamma,
                                                                 int gamma_kind, __m256* g_out) {
  const Sleef& sl = sleef();
  const auto vexp = reinterpret_cast<vexp_t>(sl.exp);
  const auto vlog1p = reinterpret_cast<vexp_t>(sl.log1p);
  const auto vpow = reinterpret_cast<vpow_t>(sl.pow);
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f);
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
  // a_t == 0 and ce == +inf (alpha 0 or 1, an infinite logit on the zero-weighted side): the limit 0, as in
  // focal::element.
  const __m256 zero_weight_inf = _mm256_and_ps(_mm256_cmp_ps(a_t, zero, _CMP_EQ_OQ),
                                               _mm256_cmp_ps(ce, _mm256_set1_ps(INFINITY), _CMP_EQ_OQ));
  const __m256 loss = _mm256_blendv_ps(_mm256_mul_ps(_mm256_mul_ps(a_t, ce), m), zero, zero_weight_inf);
  if constexpr (!WithGrad) return loss;
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
  *g_out = _mm256_mul_ps(a_t, g);
  return loss;
}

// Loads and stores of n <= 8 elements as 8 float lanes (lanes >= n read as 0 and are not written). bfloat16 widens
// exactly by a shift; narrowing rounds to nearest even, NaN staying a quiet NaN -- fastdet::BFloat16's conversion, so
// the results are bitwise those of the element-by-element casts. float16 uses F16C's conversions (also RNE).
template <typename scalar_t>
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const scalar_t* p, int n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (n == 8) return _mm256_loadu_ps(p);
    alignas(32) float buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(buf, p, sizeof(float) * n);
    return _mm256_load_ps(buf);
  } else {
    __m128i raw;
    if (n == 8) {
      raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    } else {
      alignas(16) uint16_t buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      std::memcpy(buf, p, sizeof(uint16_t) * n);
      raw = _mm_load_si128(reinterpret_cast<const __m128i*>(buf));
    }
    if constexpr (std::is_same_v<scalar_t, fastdet::Half>) {
      return _mm256_cvtph_ps(raw);
    } else {
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
    }
  }
}

template <typename scalar_t>
__attribute__((target("avx2,fma,f16c"))) inline void store8(scalar_t* p, __m256 v, int n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (n == 8) {
      _mm256_storeu_ps(p, v);
    } else {
      alignas(32) float buf[8];
      _mm256_store_ps(buf, v);
      std::memcpy(p, buf, sizeof(float) * n);
    }
  } else {
    __m128i packed;
    if constexpr (std::is_same_v<scalar_t, fastdet::Half>) {
      packed = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
      const __m256i bits = _mm256_castps_si256(v);
      // Round to nearest even on the 16 dropped bits: add 0x7FFF plus the lowest kept bit, then shift.
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
      __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
      const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), is_nan);
      // Values are < 2^16, so the unsigned-saturating pack is exact.
      packed = _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
    }
    if (n == 8) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
    } else {
      alignas(16) uint16_t buf[8];
      _mm_store_si128(reinterpret_cast<__m128i*>(buf), packed);
      std::memcpy(p, buf, sizeof(uint16_t) * n);
    }
  }
}

// Lanes k < n of v, others 0.
__attribute__((target("avx2,fma,f16c"))) inline __m256 first_lanes(__m256 v, int n) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane)));
}

// Sum of 8 float lanes into 4 double lanes: acc[j] += v[j] + v[j + 4] (each float widened exactly).
__attribute__((target("avx2,fma,f16c"))) inline __m256d accumulate8(__m256d acc, __m256 v) {
  acc = _mm256_add_pd(acc, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
  return _mm256_add_pd(acc, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
}

// (acc[0] + acc[1]) + (acc[2] + acc[3]): a fixed order, so a chunk's sum never depends on threads.
__attribute__((target("avx2,fma,f16c"))) inline double horizontal_sum(__m256d acc) {
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, acc);
  return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
}

// Target vector of the label form: lane k is 1 where label == c0 + k.
__attribute__((target("avx2,fma,f16c"))) inline __m256 one_hot8(int64_t label, int64_t c0) {
  const __m256i cls = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                       _mm256_set1_epi32(static_cast<int32_t>(c0)));
  const __m256i hit = _mm256_cmpeq_epi32(cls, _mm256_set1_epi32(static_cast<int32_t>(label)));
  return _mm256_and_ps(_mm256_castsi256_ps(hit), _mm256_set1_ps(1.0f));
}

#pragma GCC pop_options

}  // namespace focal_avx2
}  // namespace fastdet
#endif
