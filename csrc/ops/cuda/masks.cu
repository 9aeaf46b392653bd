// CUDA kernels of the mask ops.
//
// paste_masks_in_image: one thread per output pixel of all detections (grid-stride, 64-bit offsets); consecutive
// threads write consecutive pixels of a row. Each thread works out its detection's patch and taps with the same
// masks_math.h functions as the CPU kernel (explicitly rounded and fused operations), so both backends give bitwise
// equal results. Memory is the output alone: no per-detection temporary, no chunking needed.
//
// project_masks_on_boxes: one thread per (proposal, bin); the thread sums its bin's samples in torchvision's order,
// reading the bool/uint8 ground-truth mask directly. Only sample indices that can land on the mask are visited
// (roi::sample_range), so a huge proposal costs O(H + W) per bin axis rather than its full adaptive grid.
#include <algorithm>
#include <cstdint>

#include "ops/cuda/cuda_utils.cuh"
#include "ops/masks_math.h"
#include "ops/roi_align_math.h"

namespace fastdet {
namespace {

template <typename T, typename B>
__global__ void paste_kernel(const T* __restrict__ masks, const B* __restrict__ boxes, T* __restrict__ out,
                             int64_t total, int64_t mh, int64_t mw, int64_t H, int64_t W, int64_t pad, double scale) {
  using A = opmath_t<T>;
  using AB = opmath_t<B>;
  const int64_t ph = mh + 2 * pad, pw = mw + 2 * pad;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t x = i % W;
    const int64_t y = (i / W) % H;
    const int64_t n = i / (W * H);
    const auto p = masks::expand_box<B, AB>(boxes + n * 4, static_cast<AB>(scale));
    A value = A(0);
    if (p.valid) {
      int64_t y_first, y_last, x_first, x_last;
      masks::clip_span(p.y0, p.h, H, &y_first, &y_last);
      masks::clip_span(p.x0, p.w, W, &x_first, &x_last);
      if (y >= y_first && y < y_last && x >= x_first && x < x_last) {
        const auto ty = masks::taps<T, A>(y - p.y0, ph, p.h, masks::resize_ratio<A>(ph, p.h));
        const auto tx = masks::taps<T, A>(x - p.x0, pw, p.w, masks::resize_ratio<A>(pw, p.w));
        value = masks::resized_value<T, A>(masks + n * mh * mw, mh, mw, pad, ty, tx);
      }
    }
    out[i] = static_cast<T>(value);
  }
}

Tensor paste_masks_in_image_cuda(const Tensor& masks, const Tensor& boxes, int64_t H, int64_t W, int64_t padding,
                                 double scale) {
  const DeviceGuard device_guard(masks.get_device_index());
  const int64_t N = masks.size(0), mh = masks.size(1), mw = masks.size(2);
  auto out = aten::empty({N, 1, H, W}, masks.scalar_type(), masks);
  const int64_t total = out.numel();
  if (total == 0) {
    return out;
  }
  const cudaStream_t stream = current_stream(masks);
  FASTDET_DISPATCH_FLOATING(boxes.scalar_type(), "paste_masks_in_image_boxes", [&] {
    using B = scalar_t;
    FASTDET_DISPATCH_FLOATING(masks.scalar_type(), "paste_masks_in_image", [&] {
      paste_kernel<scalar_t, B><<<blocks_for(total), kBlockThreads, 0, stream>>>(
          masks.const_data_ptr<scalar_t>(), boxes.const_data_ptr<B>(), out.mutable_data_ptr<scalar_t>(), total, mh,
          mw, H, W, padding, scale);
      FASTDET_CUDA_LAUNCH_CHECK();
    });
  });
  return out;
}

template <typename V, typename T>
__global__ void project_kernel(const V* __restrict__ gt, const T* __restrict__ boxes,
                               const int64_t* __restrict__ idx, T* __restrict__ out, int64_t total, int64_t G,
                               int64_t H, int64_t W, int64_t M) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t px = i % M;
    const int64_t py = (i / M) % M;
    const int64_t k = i / (M * M);
    const auto g = roi::align_geometry<T>(boxes + k * 4, T(1), M, M, /*sampling_ratio=*/-1, /*aligned=*/false);
    const int64_t gi = idx[k];
    T sum = T(0);
    if (g.valid && gi >= 0 && gi < G) {
      const V* m = gt + gi * H * W;
      int64_t y_first, y_last, x_first, x_last;
      roi::sample_range(g.start_h, g.bin_h, py, g.grid_h, H, &y_first, &y_last);
      roi::sample_range(g.start_w, g.bin_w, px, g.grid_w, W, &x_first, &x_last);
      for (int64_t iy = y_first; iy < y_last; ++iy) {
        const auto sy = roi::axis_sample(roi::sample_coord(g.start_h, g.bin_h, py, iy, g.grid_h), H);
        if (!sy.valid) continue;
        for (int64_t ix = x_first; ix < x_last; ++ix) {
          const auto sx = roi::axis_sample(roi::sample_coord(g.start_w, g.bin_w, px, ix, g.grid_w), W);
          if (!sx.valid) continue;
          sum += sy.h * sx.h * static_cast<T>(m[sy.low * W + sx.low]) +
                 sy.h * sx.l * static_cast<T>(m[sy.low * W + sx.high]) +
                 sy.l * sx.h * static_cast<T>(m[sy.high * W + sx.low]) +
                 sy.l * sx.l * static_cast<T>(m[sy.high * W + sx.high]);
        }
      }
    }
    out[i] = sum / g.count;
  }
}

Tensor project_masks_on_boxes_cuda(const Tensor& gt_masks, const Tensor& boxes, const Tensor& idx, int64_t M) {
  const DeviceGuard device_guard(boxes.get_device_index());
  const int64_t P = boxes.size(0), G = gt_masks.size(0), H = gt_masks.size(1), W = gt_masks.size(2);
  auto out = aten::empty({P, M, M}, boxes.scalar_type(), boxes);
  const int64_t total = out.numel();
  if (total == 0) {
    return out;
  }
  const cudaStream_t stream = current_stream(boxes);
  FASTDET_DISPATCH_FLOAT_DOUBLE(boxes.scalar_type(), "project_masks_on_boxes", [&] {
    using T = scalar_t;
    const T* b = boxes.const_data_ptr<T>();
    const int64_t* ix = idx.const_data_ptr<int64_t>();
    T* o = out.mutable_data_ptr<T>();
    switch (gt_masks.scalar_type()) {
      case kBool:
        project_kernel<bool, T><<<blocks_for(total), kBlockThreads, 0, stream>>>(
            gt_masks.const_data_ptr<bool>(), b, ix, o, total, G, H, W, M);
        break;
      case ScalarType::Byte:
        project_kernel<uint8_t, T><<<blocks_for(total), kBlockThreads, 0, stream>>>(
            gt_masks.const_data_ptr<uint8_t>(), b, ix, o, total, G, H, W, M);
        break;
      default:
        FASTDET_DISPATCH_FLOATING(gt_masks.scalar_type(), "project_masks_on_boxes_masks", [&] {
          project_kernel<scalar_t, T><<<blocks_for(total), kBlockThreads, 0, stream>>>(
              gt_masks.const_data_ptr<scalar_t>(), b, ix, o, total, G, H, W, M);
        });
    }
    FASTDET_CUDA_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_IMPL(fastdet, CUDA, m) {
  m.impl("_paste_masks_in_image_kernel", TORCH_BOX(&fastdet::paste_masks_in_image_cuda));
  m.impl("_project_masks_on_boxes_kernel", TORCH_BOX(&fastdet::project_masks_on_boxes_cuda));
}
