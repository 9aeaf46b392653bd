#pragma once
// Argument checks shared by every op's schema file. Each message names the argument and what was expected, so a user
// sees "boxes1 must be a floating-point tensor of shape [N, 4] or [B, N, 4], got ..." rather than a kernel crash.
#include "ops/stable.h"

namespace fastdet {

inline void check_floating(const Tensor& t, const char* name) {
  FASTDET_CHECK(is_floating(t.scalar_type()), name,
                " must be a floating-point tensor (float16, bfloat16, float32 or float64), got ", t.scalar_type());
}

inline void check_same_device(const Tensor& a, const char* a_name, const Tensor& b, const char* b_name) {
  FASTDET_CHECK(a.device() == b.device(), a_name, " and ", b_name, " must be on the same device, got ", device_of(a),
                " and ", device_of(b));
}

inline void check_same_dtype(const Tensor& a, const char* a_name, const Tensor& b, const char* b_name) {
  FASTDET_CHECK(a.scalar_type() == b.scalar_type(), a_name, " and ", b_name, " must have the same dtype, got ",
                a.scalar_type(), " and ", b.scalar_type());
}

// boxes of shape [N, 4] or [B, N, 4] in (x1, y1, x2, y2).
inline void check_boxes(const Tensor& boxes, const char* name, bool allow_batched) {
  check_floating(boxes, name);
  const bool rank_ok = boxes.dim() == 2 || (allow_batched && boxes.dim() == 3);
  FASTDET_CHECK(rank_ok && boxes.size(-1) == 4, name, " must have shape [N, 4]", allow_batched ? " or [B, N, 4]" : "",
                " (x1, y1, x2, y2), got ", shape_of(boxes));
}

// Two box sets of a pairwise op, each already checked as [N, k] or [B, N, k]: one device, one dtype, and either both
// plain or both batched with the same B. Returns whether they are batched.
inline bool check_pairwise_sets(const Tensor& boxes1, const Tensor& boxes2, int k) {
  check_same_device(boxes1, "boxes1", boxes2, "boxes2");
  check_same_dtype(boxes1, "boxes1", boxes2, "boxes2");
  FASTDET_CHECK(boxes1.dim() == boxes2.dim(), "boxes1 and boxes2 must both be [N, ", k, "] / [M, ", k,
                "] or both be batched [B, N, ", k, "] / [B, M, ", k, "], got ", shape_of(boxes1), " and ",
                shape_of(boxes2));
  const bool batched = boxes1.dim() == 3;
  if (batched) {
    FASTDET_CHECK(boxes1.size(0) == boxes2.size(0), "boxes1 and boxes2 must have the same batch size B, got ",
                  boxes1.size(0), " and ", boxes2.size(0));
  }
  return batched;
}

inline void check_threshold(double value, const char* name) {
  FASTDET_CHECK(value >= 0.0, name, " must be a non-negative number, got ", value);
}

}  // namespace fastdet
