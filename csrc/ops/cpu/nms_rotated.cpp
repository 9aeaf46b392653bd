// CPU keep-flag kernel of the rotated NMS family: greedy NMS per segment (one category of one image, in visit order),
// each candidate tested against the boxes kept before it in its segment; independent segments run in parallel. The
// boxes are prepared once (corner offsets, areas) and every pair is decided by rotated::iou(kept, candidate), the
// order the CUDA kernel uses too.
#include <algorithm>
#include <vector>

#include "ops/nms.h"
#include "ops/nms_math.h"
#include "ops/rotated.h"
#include "ops/rotated_math.h"

namespace fastdet {
namespace {

template <typename T>
void keep_flags_impl(const T* boxes, const std::vector<int64_t>& seg, int64_t N, T threshold, bool* keep) {
  const int64_t S = static_cast<int64_t>(seg.size() / 3);
  parallel_for(0, S, 1, [&](int64_t sb, int64_t se) {
    std::vector<rotated::Rect<T>> kept;
    for (int64_t s = sb; s < se; ++s) {
      const int64_t image = seg[3 * s], begin = seg[3 * s + 1], end = seg[3 * s + 2];
      kept.clear();
      for (int64_t i = begin; i < end; ++i) {
        const T* p = boxes + (image * N + i) * 5;
        const auto candidate = rotated::make_rect<T>(p[0], p[1], p[2], p[3], p[4]);
        bool suppressed = false;
        for (const auto& k : kept) {
          // A NaN IoU never suppresses.
          if (rotated::iou<T>(k, candidate) > threshold) {
            suppressed = true;
            break;
          }
        }
        keep[image * N + i] = !suppressed;
        if (!suppressed) kept.push_back(candidate);
      }
    }
  });
}

Tensor nms_rotated_keep_flags_cpu(const Tensor& boxes, const std::optional<Tensor>& categories, double iou_threshold) {
  const int64_t B = boxes.size(0), N = boxes.size(1);
  auto keep = aten::zeros({B, N}, kBool, boxes);
  if (B == 0 || N == 0) {
    return keep;
  }
  const auto segments =
      nms::find_segments(categories.has_value() ? categories->const_data_ptr<int64_t>() : nullptr, B, N);
  FASTDET_DISPATCH_FLOAT_DOUBLE(boxes.scalar_type(), "_nms_rotated_keep_flags", [&] {
    const scalar_t threshold = std::is_same_v<scalar_t, double>
                                   ? static_cast<scalar_t>(iou_threshold)
                                   : static_cast<scalar_t>(nms::threshold_as_float(iou_threshold));
    keep_flags_impl<scalar_t>(boxes.const_data_ptr<scalar_t>(), segments, N, threshold,
                              keep.mutable_data_ptr<bool>());
  });
  return keep;
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_IMPL(fastdet, CPU, m) {
  m.impl("_nms_rotated_keep_flags", TORCH_BOX(&fastdet::nms_rotated_keep_flags_cpu));
}
