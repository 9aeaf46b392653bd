#pragma once
// Rotated boxes (cx, cy, w, h, angle in degrees counter-clockwise; see rotated_math.h). Public ops (schema files
// box_iou_rotated.cpp and nms_rotated.cpp) check their arguments once and call the per-backend kernels
//   _box_iou_rotated_kernel(boxes1 [B, N, 5], boxes2 [B, M, 5]) -> [B, N, M] float32
//   _nms_rotated_keep_flags(boxes [B, N, 5], categories [B, N] or None, iou_threshold) -> flags [B, N] bool
// with every tensor contiguous and on one device, boxes in the computation dtype (float32, or float64 for float64
// input); for the keep flags, boxes in visit order and categories (when given) int64 and non-decreasing within each
// image (the order and grouping of the NMS family, nms.h).
#include "ops/stable.h"
#include "ops/checks.h"

namespace fastdet {

// boxes of shape [N, 5] or [B, N, 5] in (cx, cy, w, h, angle).
inline void check_rotated_boxes(const Tensor& boxes, const char* name, bool allow_batched) {
  check_floating(boxes, name);
  const bool rank_ok = boxes.dim() == 2 || (allow_batched && boxes.dim() == 3);
  FASTDET_CHECK(rank_ok && boxes.size(-1) == 5, name, " must have shape [N, 5]", allow_batched ? " or [B, N, 5]" : "",
                " (cx, cy, w, h, angle in degrees), got ", shape_of(boxes));
}

}  // namespace fastdet
