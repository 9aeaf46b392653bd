// CPU kernels of the pairwise IoU family: one parallel loop over output rows; boxes2 is laid out as four coordinate
// planes so the inner loop over M is a plain vectorisable sweep.
#include <algorithm>

#include "ops/box_iou.h"
#include "ops/box_iou_math.h"

namespace fastdet {
namespace {

// Aim for chunks of ~32k pair evaluations per task so both cores stay busy without scheduling overhead.
int64_t grain_for(int64_t inner) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(inner, 1));
}

// The variant is a template parameter so the inner loop has no branches left and the compiler can vectorise it.
template <typename T, int64_t variant>
void pairwise_forward_kernel(const T* b1, const T* b2_planes, T* out, int64_t B, int64_t N, int64_t M, T eps) {
  parallel_for(0, B * N, grain_for(M), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / N;
      const T* a_ptr = b1 + row * 4;
      const iou::Box<T> a{a_ptr[0], a_ptr[1], a_ptr[2], a_ptr[3]};
      const T* x1 = b2_planes + b * 4 * M;
      const T* y1 = x1 + M;
      const T* x2 = y1 + M;
      const T* y2 = x2 + M;
      T* out_row = out + row * M;
      for (int64_t j = 0; j < M; ++j) {
        out_row[j] = iou::pair_forward<T>(a, iou::Box<T>{x1[j], y1[j], x2[j], y2[j]}, variant, eps);
      }
    }
  });
}

// grad_a[b, i] = sum_j d f(a_i, b_j) / d a_i * grad[b, i, j], and symmetrically for grad_b. Each output box is
// reduced by one task in a fixed order, so the result is deterministic and needs no atomics.
template <typename T>
void pairwise_backward_kernel(const T* grad, const T* b1, const T* b2, T* g1, T* g2, int64_t B, int64_t N, int64_t M,
                              int64_t variant, T eps) {
  auto load = [](const T* p) { return iou::Box<T>{p[0], p[1], p[2], p[3]}; };
  parallel_for(0, B * N, grain_for(M), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / N;
      const auto a = load(b1 + row * 4);
      T acc[4] = {0, 0, 0, 0};
      for (int64_t j = 0; j < M; ++j) {
        const T g = grad[row * M + j];
        if (g == T(0)) continue;  // common for masked losses; skipping is exact (every term is linear in g)
        T ga[4], gb[4];
        iou::pair_backward<T>(a, load(b2 + (b * M + j) * 4), variant, eps, g, ga, gb);
        for (int k = 0; k < 4; ++k) acc[k] += ga[k];
      }
      for (int k = 0; k < 4; ++k) g1[row * 4 + k] = acc[k];
    }
  });
  parallel_for(0, B * M, grain_for(N), [&](int64_t begin, int64_t end) {
    for (int64_t col = begin; col < end; ++col) {
      const int64_t b = col / M;
      const int64_t j = col % M;
      const auto bx = load(b2 + col * 4);
      T acc[4] = {0, 0, 0, 0};
      for (int64_t i = 0; i < N; ++i) {
        const T g = grad[(b * N + i) * M + j];
        if (g == T(0)) continue;
        T ga[4], gb[4];
        iou::pair_backward<T>(load(b1 + (b * N + i) * 4), bx, variant, eps, g, ga, gb);
        for (int k = 0; k < 4; ++k) acc[k] += gb[k];
      }
      for (int k = 0; k < 4; ++k) g2[col * 4 + k] = acc[k];
    }
  });
}

Tensor pairwise_box_iou_kernel(const Tensor& boxes1, const Tensor& boxes2, int64_t variant, double eps) {
  const int64_t B = boxes1.size(0), N = boxes1.size(1), M = boxes2.size(1);
  auto out = aten::empty({B, N, M}, boxes1.scalar_type(), boxes1);
  if (out.numel() == 0) {
    return out;
  }
  auto planes = aten::contiguous(aten::transpose(boxes2, 1, 2));  // [B, 4, M]
  FASTDET_DISPATCH_FLOAT_DOUBLE(out.scalar_type(), "pairwise_box_iou", [&] {
    const scalar_t* b1 = boxes1.const_data_ptr<scalar_t>();
    const scalar_t* b2 = planes.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const auto e = static_cast<scalar_t>(eps);
    switch (variant) {
      case iou::kIoU:
        pairwise_forward_kernel<scalar_t, iou::kIoU>(b1, b2, o, B, N, M, e);
        break;
      case iou::kGIoU:
        pairwise_forward_kernel<scalar_t, iou::kGIoU>(b1, b2, o, B, N, M, e);
        break;
      case iou::kDIoU:
        pairwise_forward_kernel<scalar_t, iou::kDIoU>(b1, b2, o, B, N, M, e);
        break;
      default:
        pairwise_forward_kernel<scalar_t, iou::kCIoU>(b1, b2, o, B, N, M, e);
    }
  });
  return out;
}

std::tuple<Tensor, Tensor> pairwise_box_iou_backward_kernel(const Tensor& grad, const Tensor& boxes1,
                                                            const Tensor& boxes2, int64_t variant, double eps) {
  const int64_t B = boxes1.size(0), N = boxes1.size(1), M = boxes2.size(1);
  auto g1 = aten::empty_like(boxes1);
  auto g2 = aten::empty_like(boxes2);
  FASTDET_DISPATCH_FLOAT_DOUBLE(g1.scalar_type(), "_pairwise_box_iou_backward", [&] {
    pairwise_backward_kernel<scalar_t>(grad.const_data_ptr<scalar_t>(), boxes1.const_data_ptr<scalar_t>(),
                                       boxes2.const_data_ptr<scalar_t>(), g1.mutable_data_ptr<scalar_t>(),
                                       g2.mutable_data_ptr<scalar_t>(), B, N, M, variant,
                                       static_cast<scalar_t>(eps));
  });
  return {g1, g2};
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_IMPL(fastdet, CPU, m) {
  m.impl("_pairwise_box_iou_kernel", TORCH_BOX(&fastdet::pairwise_box_iou_kernel));
  m.impl("_pairwise_box_iou_backward_kernel", TORCH_BOX(&fastdet::pairwise_box_iou_backward_kernel));
}
