// CPU kernel of box_iou_rotated: boxes2 of each image are prepared once (corner offsets, areas), then one parallel
// loop over output rows evaluates rotated::iou for every pair.
#include <algorithm>
#include <vector>

#include "ops/rotated.h"
#include "ops/rotated_math.h"

namespace fastdet {
namespace {

template <typename T>
void box_iou_rotated_cpu_impl(const T* b1, const T* b2, float* out, int64_t B, int64_t N, int64_t M) {
  std::vector<rotated::Rect<T>> rects2(static_cast<size_t>(B * M));
  parallel_for(0, B * M, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const T* p = b2 + 5 * j;
      rects2[j] = rotated::make_rect<T>(p[0], p[1], p[2], p[3], p[4]);
    }
  });
  // Each pair costs a polygon clip (a few hundred flops): small chunks already amortise the scheduling.
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(M, 1));
  parallel_for(0, B * N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / N;
      const T* p = b1 + 5 * row;
      const auto a = rotated::make_rect<T>(p[0], p[1], p[2], p[3], p[4]);
      const rotated::Rect<T>* r2 = rects2.data() + b * M;
      float* out_row = out + row * M;
      for (int64_t j = 0; j < M; ++j) {
        out_row[j] = static_cast<float>(rotated::iou<T>(a, r2[j]));
      }
    }
  });
}

// boxes1 [B, N, 5], boxes2 [B, M, 5]: contiguous, float32 or float64 (prepared by box_iou_rotated.cpp).
Tensor box_iou_rotated_cpu(const Tensor& boxes1, const Tensor& boxes2) {
  const int64_t B = boxes1.size(0), N = boxes1.size(1), M = boxes2.size(1);
  auto out = aten::empty({B, N, M}, kFloat, boxes1);
  if (out.numel() == 0) {
    return out;
  }
  FASTDET_DISPATCH_FLOAT_DOUBLE(boxes1.scalar_type(), "box_iou_rotated", [&] {
    box_iou_rotated_cpu_impl<scalar_t>(boxes1.const_data_ptr<scalar_t>(), boxes2.const_data_ptr<scalar_t>(),
                                       out.mutable_data_ptr<float>(), B, N, M);
  });
  return out;
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_IMPL(fastdet, CPU, m) {
  m.impl("_box_iou_rotated_kernel", TORCH_BOX(&fastdet::box_iou_rotated_cpu));
}
