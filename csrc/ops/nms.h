#pragma once
// The NMS family is one pipeline: sort candidates by (score desc, index asc), group them stably by category, compute
// keep flags with the backend's kernel, and map the flags back to score order. Only the keep-flag kernel differs
// between CPU and CUDA; everything else is the device-agnostic composite in the schema file nms.cpp, which checks the
// public ops' arguments once and calls the private per-backend op
//   _nms_keep_flags(boxes [B, N, 4], categories [B, N] or None, iou_threshold, sync_free) -> flags [B, N] bool
// with boxes in visit order, contiguous, in the accumulation dtype (float32, or float64 for float64 input), and
// categories (when given) int64, contiguous, on the boxes' device and non-decreasing within each image.
//
// This header is included by both libraries (fastdet._C and fastdet._C_cuda), so everything in it is inline.
#include <cstdint>
#include <vector>

#include "ops/stable.h"

namespace fastdet {
namespace nms {

// Segments of equal category in visit order, flattened as (image, begin, end) triples; one segment per image when
// categories is nullptr. categories points at B * N int64 values in host memory.
inline std::vector<int64_t> find_segments(const int64_t* categories, int64_t B, int64_t N) {
  std::vector<int64_t> seg;
  if (categories == nullptr) {
    seg.reserve(3 * B);
    for (int64_t b = 0; b < B; ++b) {
      seg.insert(seg.end(), {b, 0, N});
    }
    return seg;
  }
  for (int64_t b = 0; b < B; ++b) {
    const int64_t* row = categories + b * N;
    int64_t start = 0;
    for (int64_t i = 1; i <= N; ++i) {
      if (i == N || row[i] != row[start]) {
        // The composite sorts the categories, so this only guards direct calls of the private op.
        FASTDET_CHECK(i == N || row[i] > row[start], "categories must be sorted within each image");
        seg.insert(seg.end(), {b, start, i});
        start = i;
      }
    }
  }
  return seg;
}

}  // namespace nms
}  // namespace fastdet
