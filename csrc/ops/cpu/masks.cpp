// CPU kernels of the mask ops.
//
// paste_masks_in_image: one parallel loop over the output rows of all detections ([N * H] rows). A row works out its
// detection's integer patch (a few flops), then writes every pixel of the row exactly once: the resized mask inside
// the patch, 0 elsewhere. No per-detection temporary is allocated, so memory is the output alone however many
// detections and however large the image (torchvision resizes each mask to its full box size first).
//
// project_masks_on_boxes: one task per proposal; the proposal's separable sample tables (roi::AxisTable) are built
// once and each of the M x M bins sums its samples in torchvision's roi_align order, reading the bool/uint8 mask of
// the matched ground truth directly (torchvision first converts every mask of the image to a float copy).
#include <algorithm>
#include <cstdint>
#include <vector>

#include "ops/cpu/roi_axis_table.h"
#include "ops/masks_math.h"
#include "ops/roi_align_math.h"
#include "ops/stable.h"

namespace fastdet {
namespace {

template <typename T, typename B>
void paste_rows(const T* masks, const B* boxes, T* out, int64_t N, int64_t mh, int64_t mw, int64_t H, int64_t W,
                int64_t pad, double scale) {
  using A = opmath_t<T>;
  using AB = opmath_t<B>;
  const int64_t ph = mh + 2 * pad, pw = mw + 2 * pad;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(W, 1));
  parallel_for(0, N * H, grain, [&](int64_t begin, int64_t end) {
    // A chunk holds consecutive rows, mostly of one detection: its patch and column taps are computed once.
    int64_t cached = -1;
    masks::Patch p{};
    int64_t y_first = 0, y_last = 0, x_first = 0, x_last = 0;
    std::vector<masks::Taps<A>> xtaps;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / H, y = row % H;
      T* dst = out + row * W;
      if (n != cached) {
        cached = n;
        p = masks::expand_box<B, AB>(boxes + n * 4, static_cast<AB>(scale));
        y_first = y_last = x_first = x_last = 0;
        if (p.valid) {
          masks::clip_span(p.y0, p.h, H, &y_first, &y_last);
          masks::clip_span(p.x0, p.w, W, &x_first, &x_last);
        }
        xtaps.clear();
        const A ratio_w = masks::resize_ratio<A>(pw, p.w);
        for (int64_t x = x_first; x < x_last; ++x) {
          xtaps.push_back(masks::taps<T, A>(x - p.x0, pw, p.w, ratio_w));
        }
      }
      if (y < y_first || y >= y_last || x_first >= x_last) {
        std::fill(dst, dst + W, T(0));
        continue;
      }
      const T* mask = masks + n * mh * mw;
      const auto ty = masks::taps<T, A>(y - p.y0, ph, p.h, masks::resize_ratio<A>(ph, p.h));
      std::fill(dst, dst + x_first, T(0));
      for (int64_t x = x_first; x < x_last; ++x) {
        dst[x] = static_cast<T>(masks::resized_value<T, A>(mask, mh, mw, pad, ty, xtaps[x - x_first]));
      }
      std::fill(dst + x_last, dst + W, T(0));
    }
  });
}

Tensor paste_masks_in_image_cpu(const Tensor& masks, const Tensor& boxes, int64_t H, int64_t W, int64_t padding,
                                double scale) {
  const int64_t N = masks.size(0), mh = masks.size(1), mw = masks.size(2);
  auto out = aten::empty({N, 1, H, W}, masks.scalar_type(), masks);
  if (out.numel() == 0) {
    return out;
  }
  FASTDET_DISPATCH_FLOATING(boxes.scalar_type(), "paste_masks_in_image_boxes", [&] {
    using B = scalar_t;
    FASTDET_DISPATCH_FLOATING(masks.scalar_type(), "paste_masks_in_image", [&] {
      paste_rows<scalar_t, B>(masks.const_data_ptr<scalar_t>(), boxes.const_data_ptr<B>(),
                              out.mutable_data_ptr<scalar_t>(), N, mh, mw, H, W, padding, scale);
    });
  });
  return out;
}

// gt masks M_g [G, H, W] of storage type V; boxes and output in the accumulation type T.
template <typename V, typename T>
void project_kernel(const V* gt, const T* boxes, const int64_t* idx, T* out, int64_t P, int64_t G, int64_t H,
                    int64_t W, int64_t M) {
  parallel_for(0, P, std::max<int64_t>(1, 4096 / (M * M)), [&](int64_t begin, int64_t end) {
    roi::AxisTable<T> ytab, xtab;
    for (int64_t k = begin; k < end; ++k) {
      T* o = out + k * M * M;
      const auto g = roi::align_geometry<T>(boxes + k * 4, T(1), M, M, /*sampling_ratio=*/-1, /*aligned=*/false);
      const int64_t gi = idx[k];
      if (!g.valid || gi < 0 || gi >= G) {
        std::fill(o, o + M * M, T(0));
        continue;
      }
      ytab.build(g.start_h, g.bin_h, M, g.grid_h, H, W);
      xtab.build(g.start_w, g.bin_w, M, g.grid_w, W, 1);
      const V* m = gt + gi * H * W;
      for (int64_t py = 0; py < M; ++py) {
        for (int64_t px = 0; px < M; ++px) {
          T sum = T(0);
          for (int64_t iy = ytab.begin[py]; iy < ytab.begin[py + 1]; ++iy) {
            const auto& ey = ytab.entries[iy];
            for (int64_t ix = xtab.begin[px]; ix < xtab.begin[px + 1]; ++ix) {
              const auto& ex = xtab.entries[ix];
              // torchvision's sample: ((w1 v1 + w2 v2) + w3 v3) + w4 v4 with w = hy hx, hy lx, ly hx, ly lx
              sum += ey.h * ex.h * static_cast<T>(m[ey.off_low + ex.off_low]) +
                     ey.h * ex.l * static_cast<T>(m[ey.off_low + ex.off_high]) +
                     ey.l * ex.h * static_cast<T>(m[ey.off_high + ex.off_low]) +
                     ey.l * ex.l * static_cast<T>(m[ey.off_high + ex.off_high]);
            }
          }
          o[py * M + px] = sum / g.count;
        }
      }
    }
  });
}

Tensor project_masks_on_boxes_cpu(const Tensor& gt_masks, const Tensor& boxes, const Tensor& idx, int64_t M) {
  const int64_t P = boxes.size(0), G = gt_masks.size(0), H = gt_masks.size(1), W = gt_masks.size(2);
  auto out = aten::empty({P, M, M}, boxes.scalar_type(), boxes);
  if (P == 0) {
    return out;
  }
  FASTDET_DISPATCH_FLOAT_DOUBLE(boxes.scalar_type(), "project_masks_on_boxes", [&] {
    using T = scalar_t;
    const T* b = boxes.const_data_ptr<T>();
    const int64_t* i = idx.const_data_ptr<int64_t>();
    T* o = out.mutable_data_ptr<T>();
    switch (gt_masks.scalar_type()) {
      case kBool:
        project_kernel<bool, T>(gt_masks.const_data_ptr<bool>(), b, i, o, P, G, H, W, M);
        break;
      case ScalarType::Byte:
        project_kernel<uint8_t, T>(gt_masks.const_data_ptr<uint8_t>(), b, i, o, P, G, H, W, M);
        break;
      default:
        FASTDET_DISPATCH_FLOATING(gt_masks.scalar_type(), "project_masks_on_boxes_masks", [&] {
          project_kernel<scalar_t, T>(gt_masks.const_data_ptr<scalar_t>(), b, i, o, P, G, H, W, M);
        });
    }
  });
  return out;
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_IMPL(fastdet, CPU, m) {
  m.impl("_paste_masks_in_image_kernel", TORCH_BOX(&fastdet::paste_masks_in_image_cpu));
  m.impl("_project_masks_on_boxes_kernel", TORCH_BOX(&fastdet::project_masks_on_boxes_cpu));
}
