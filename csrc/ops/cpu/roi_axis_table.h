#pragma once
// Separable sample tables of RoIAlign for the CPU kernels (roi_align, and project_masks_on_boxes, which is a
// one-channel roi_align over bool/uint8 masks): for every bin along one axis, the valid bilinear samples as pixel
// offsets and weights. A sample of bin (ph, pw) is one y entry times one x entry, so a RoI's tables cost
// O(PH * grid_h + PW * grid_w), however many channels are pooled with them.
#include <cstdint>
#include <vector>

#include "ops/roi_align_math.h"

namespace fastdet {
namespace roi {

template <typename T>
struct AxisEntry {
  int64_t off_low, off_high;  // pixel index times the axis stride
  T l, h;
};

// Valid samples of every bin along one axis: bin p owns entries [begin[p], begin[p + 1]).
template <typename T>
struct AxisTable {
  std::vector<AxisEntry<T>> entries;
  std::vector<int64_t> begin;

  void build(T start, T bin, int64_t pooled, int64_t grid, int64_t size, int64_t stride) {
    entries.clear();
    begin.assign(pooled + 1, 0);
    for (int64_t p = 0; p < pooled; ++p) {
      begin[p] = static_cast<int64_t>(entries.size());
      int64_t first = 0, last = 0;
      roi::sample_range(start, bin, p, grid, size, &first, &last);
      for (int64_t i = first; i < last; ++i) {
        const auto s = roi::axis_sample(roi::sample_coord(start, bin, p, i, grid), size);
        if (s.valid) {
          entries.push_back({s.low * stride, s.high * stride, s.l, s.h});
        }
      }
    }
    begin[pooled] = static_cast<int64_t>(entries.size());
  }
};

}  // namespace roi
}  // namespace fastdet
