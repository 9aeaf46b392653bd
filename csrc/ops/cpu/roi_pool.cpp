// CPU kernels of roi_pool. Forward: one task per (RoI, block of channels), in roi_cpu::task_roi's order; each bin's
// pixel range is computed once per task and reused by the block's channels (channel-inner for channels-last maps, plane
// by plane otherwise). Backward: one task per (image, block of channels), visiting the image's RoIs in index order, so
// every gradient element is written by one thread in one fixed order (deterministic, no atomics) -- the order of
// torchvision's sequential loop.
#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "ops/cpu/roi_tasks.h"
#include "ops/roi_align.h"
#include "ops/roi_pool.h"

namespace fastdet {
namespace {

using roi_cpu::batch_indices;
using roi_cpu::grain_for;

constexpr int64_t kBlock = 16;
// _roi_pool_kernel: rois are contiguous in the accumulation dtype; the plane size fits argmax's int32.
std::tuple<Tensor, Tensor> roi_pool_kernel(const Tensor& input, const Tensor& rois, double spatial_scale, int64_t PH,
                                           int64_t PW, bool channels_last) {
  const int64_t K = rois.size(0), N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  auto out = roi_empty({K, C, PH, PW}, input.scalar_type(), input, channels_last);
  auto argmax = roi_empty({K, C, PH, PW}, kInt, input, channels_last);
  if (out.numel() == 0) {
    return {out, argmax};
  }
  const auto batch = batch_indices(rois, N);
  const int64_t blocks = (C + kBlock - 1) / kBlock;
  FASTDET_DISPATCH_FLOATING(input.scalar_type(), "roi_pool_cpu", [&] {
    using T = opmath_t<scalar_t>;
    const T* r = rois.const_data_ptr<T>();
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    int32_t* am = argmax.mutable_data_ptr<int32_t>();
    const int64_t isn = input.stride(0), isc = input.stride(1), ish = input.stride(2), isw = input.stride(3);
    const int64_t osn = out.stride(0), osc = out.stride(1), osh = out.stride(2), osw = out.stride(3);
    parallel_for(0, K * blocks, grain_for(kBlock * PH * PW), [&](int64_t begin, int64_t end) {
      T best[kBlock];
      int32_t where[kBlock];
      std::vector<int64_t> h0(PH), h1(PH), w0(PW), w1(PW);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t k = roi_cpu::task_roi(item, K, blocks, isc != 1);
        const int64_t c0 = roi_cpu::task_block(item, K, blocks, isc != 1) * kBlock;
        const int64_t nc = std::min(kBlock, C - c0);
        auto g = roi::pool_geometry<T>(r + k * 5 + 1, static_cast<T>(spatial_scale), PH, PW);
        g.valid = g.valid && batch[k] >= 0;  // an invalid batch index pools to 0, as a non-finite box
        const scalar_t* base = in + (batch[k] >= 0 ? batch[k] : 0) * isn + c0 * isc;
        for (int64_t p = 0; p < PH; ++p) {
          roi::pool_bin_range(g.start_h, g.bin_h, p, H, &h0[p], &h1[p]);
        }
        for (int64_t p = 0; p < PW; ++p) {
          roi::pool_bin_range(g.start_w, g.bin_w, p, W, &w0[p], &w1[p]);
        }
        if (isc == 1) {
          // channels-last: the block's channels are contiguous at every pixel, so they are the inner loop
          for (int64_t ph = 0; ph < PH; ++ph) {
            for (int64_t pw = 0; pw < PW; ++pw) {
              const bool empty = !g.valid || h1[ph] <= h0[ph] || w1[pw] <= w0[pw];
              for (int64_t c = 0; c < nc; ++c) {
                best[c] = empty ? T(0) : roi::pool_init<T>();
                where[c] = -1;
              }
              if (!empty) {
                for (int64_t h = h0[ph]; h < h1[ph]; ++h) {
                  for (int64_t w = w0[pw]; w < w1[pw]; ++w) {
                    const scalar_t* px = base + h * ish + w * isw;
                    roi_cpu::pool_pixel<kBlock>(px, static_cast<int32_t>(h * W + w), nc, best, where);
                  }
                }
              }
              const int64_t off = k * osn + c0 * osc + ph * osh + pw * osw;
              for (int64_t c = 0; c < nc; ++c) {
                o[off + c * osc] = static_cast<scalar_t>(best[c]);
                am[off + c * osc] = where[c];
              }
            }
          }
        } else {
          // planar layouts: one channel plane at a time, scanning rows of the bin (contiguous when isw == 1)
          for (int64_t c = 0; c < nc; ++c) {
            const scalar_t* plane = base + c * isc;
            for (int64_t ph = 0; ph < PH; ++ph) {
              for (int64_t pw = 0; pw < PW; ++pw) {
                const bool empty = !g.valid || h1[ph] <= h0[ph] || w1[pw] <= w0[pw];
                T top = empty ? T(0) : roi::pool_init<T>();
                int32_t at = -1;
                if (!empty) {
                  roi::pool_bin_max(plane, ish, isw, W, h0[ph], h1[ph], w0[pw], w1[pw], &top, &at);
                }
                const int64_t off = k * osn + (c0 + c) * osc + ph * osh + pw * osw;
                o[off] = static_cast<scalar_t>(top);
                am[off] = at;
              }
            }
          }
        }
      }
    });
  });
  return {out, argmax};
}

// _roi_pool_backward_kernel: grad and argmax are [K, C, PH, PW] (any strides); returns the accumulation-dtype
// gradient of the input.
Tensor roi_pool_backward_kernel(const Tensor& grad, const Tensor& rois, const Tensor& argmax_in,
                                double /*spatial_scale: only the CUDA gather uses it*/, int64_t N, int64_t C,
                                int64_t H, int64_t W, bool channels_last, bool /*deterministic: the CPU always is*/) {
  const auto acc = accumulation_type(grad.scalar_type());
  auto buf = roi_zeros({N, C, H, W}, acc, grad, channels_last);
  const int64_t K = rois.size(0), PH = grad.size(2), PW = grad.size(3);
  // An empty map (H or W == 0) has no pixel an argmax can name: its gradient is the empty buffer (whose strides need
  // not satisfy the layout test below).
  if (K > 0 && C > 0 && PH > 0 && PW > 0 && buf.numel() > 0) {
    const auto batch = batch_indices(rois, N);
    // RoIs of each image in index order; RoIs with an invalid batch index are left out.
    const roi_cpu::RoisByImage groups = roi_cpu::rois_by_image(batch, N);
    const std::vector<int64_t>& first = groups.first;
    const std::vector<int64_t>& order = groups.order;
    const int64_t blocks = (C + kBlock - 1) / kBlock;
    FASTDET_DISPATCH_FLOATING(grad.scalar_type(), "roi_pool_backward_cpu", [&] {
      using T = opmath_t<scalar_t>;
      const scalar_t* g = grad.const_data_ptr<scalar_t>();
      const int32_t* am = argmax_in.const_data_ptr<int32_t>();
      T* gi = buf.mutable_data_ptr<T>();
      const int64_t gsn = grad.stride(0), gsc = grad.stride(1), gsh = grad.stride(2), gsw = grad.stride(3);
      const int64_t asn = argmax_in.stride(0), asc = argmax_in.stride(1), ash = argmax_in.stride(2),
                    asw = argmax_in.stride(3);
      const int64_t bsn = buf.stride(0), bsc = buf.stride(1), bsw = buf.stride(3);
      FASTDET_CHECK(H <= 1 || buf.stride(2) == W * bsw, "roi_pool_backward_cpu: unexpected gradient buffer strides");
      const int64_t rois_per_image = (K + N - 1) / std::max<int64_t>(N, 1);
      parallel_for(0, N * blocks, grain_for(rois_per_image * kBlock * PH * PW), [&](int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; ++item) {
          const int64_t n = item / blocks;
          const int64_t c0 = (item % blocks) * kBlock;
          const int64_t c1 = std::min(C, c0 + kBlock);
          for (int64_t j = first[n]; j < first[n + 1]; ++j) {
            const int64_t k = order[j];
            for (int64_t c = c0; c < c1; ++c) {
              for (int64_t ph = 0; ph < PH; ++ph) {
                for (int64_t pw = 0; pw < PW; ++pw) {
                  const int64_t a = am[k * asn + c * asc + ph * ash + pw * asw];
                  if (a < 0 || a >= H * W) {
                    continue;  // empty bin (or an argmax that does not belong to this map): no gradient
                  }
                  // bsh == W * bsw for both layouts of the buffer we allocated, so the pixel h * W + w sits at
                  // a * bsw: no division per element.
                  gi[n * bsn + c * bsc + a * bsw] +=
                      static_cast<T>(g[k * gsn + c * gsc + ph * gsh + pw * gsw]);
                }
              }
            }
          }
        }
      });
    });
  }
  return buf;
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_IMPL(fastdet, CPU, m) {
  m.impl("_roi_pool_kernel", TORCH_BOX(&fastdet::roi_pool_kernel));
  m.impl("_roi_pool_backward_kernel", TORCH_BOX(&fastdet::roi_pool_backward_kernel));
}
