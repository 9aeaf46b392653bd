// CPU kernel of Matrix NMS: two passes over the pairs of each image (compensation c_i, then decay), each parallel over
// candidates, O(N^2) work and O(N) memory: the dense N x N matrices of the tensor formulation are never formed.
#include <optional>

#include "ops/matrix_nms_math.h"
#include "ops/stable.h"

namespace fastdet {
namespace {

// boxes [B, N, 4] float32/float64 contiguous in visit order, categories [B, N] int64 contiguous or None.
Tensor matrix_nms_kernel_cpu(const Tensor& boxes, const std::optional<Tensor>& categories, int64_t kernel,
                             double sigma) {
  const int64_t B = boxes.size(0), N = boxes.size(1);
  auto decay = aten::empty({B, N}, boxes.scalar_type(), boxes);
  if (B == 0 || N == 0) return decay;
  auto comp = aten::empty({B, N}, boxes.scalar_type(), boxes);
  const int64_t* cat = categories.has_value() ? categories->const_data_ptr<int64_t>() : nullptr;
  FASTDET_DISPATCH_FLOAT_DOUBLE(boxes.scalar_type(), "matrix_nms", [&] {
    using T = scalar_t;
    const T* bx = boxes.const_data_ptr<T>();
    T* cp = comp.mutable_data_ptr<T>();
    T* dc = decay.mutable_data_ptr<T>();
    const T neg_sigma = static_cast<T>(-sigma);
    auto same = [&](int64_t b, int64_t i, int64_t j) { return cat == nullptr || cat[b * N + i] == cat[b * N + j]; };
    parallel_for(0, B * N, 64, [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t b = t / N, j = t % N;
        const T* base = bx + b * N * 4;
        T c = T(0);
        for (int64_t i = 0; i < j; ++i) {
          if (same(b, i, j)) c = matrix_nms::nan_max(c, matrix_nms::pair_iou<T>(base + 4 * i, base + 4 * j));
        }
        cp[t] = c;
      }
    });
    parallel_for(0, B * N, 64, [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t b = t / N, j = t % N;
        const T* base = bx + b * N * 4;
        T d = T(1);
        for (int64_t i = 0; i < j; ++i) {
          if (!same(b, i, j)) continue;
          const T iou = matrix_nms::pair_iou<T>(base + 4 * i, base + 4 * j);
          d = matrix_nms::nan_min(d, matrix_nms::ratio<T>(iou, cp[b * N + i], kernel, neg_sigma));
        }
        dc[t] = d;
      }
    });
  });
  return decay;
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_IMPL(fastdet, CPU, m) {
  m.impl("_matrix_nms_kernel", TORCH_BOX(&fastdet::matrix_nms_kernel_cpu));
}
