// CPU kernels of roi_spp. Forward: one task per (RoI, block of channels), in roi_cpu::task_roi's order; the pixel
// ranges of every bin of every level are computed once per task and reused by the block's channels (channel-inner for
// channels-last maps, plane by plane otherwise), so all levels are pooled in one pass over the RoI. Backward: one task
// per (image, block of channels), visiting the image's RoIs in index order and each RoI's bins in (level, ph, pw)
// order, so every gradient element is written by one thread in one fixed order (deterministic, no atomics).
#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "ops/cpu/roi_tasks.h"
#include "ops/roi_align.h"
#include "ops/roi_spp.h"

namespace fastdet {
namespace {

using roi_cpu::batch_indices;
using roi_cpu::grain_for;

constexpr int64_t kBlock = 16;
std::tuple<Tensor, Tensor> roi_spp_kernel(const Tensor& input, const Tensor& rois, const std::vector<int64_t>& levels,
                                          double spatial_scale, bool /*channels_last: read through the strides*/) {
  const int64_t K = rois.size(0), N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const spp::Levels lv = spp::make_levels(levels);
  const int64_t B = lv.offset[lv.count];
  auto out = torch::stable::empty({K, C * B}, input.scalar_type(), std::nullopt, input.device());
  auto argmax = torch::stable::empty({K, C, B}, kInt, std::nullopt, input.device());
  if (out.numel() == 0) {
    return {out, argmax};
  }
  // Per level j, its rows' ranges live at [row_first[j], row_first[j] + l_j) of h0/h1 (same for columns).
  std::vector<int64_t> row_first(lv.count + 1, 0);
  for (int32_t j = 0; j < lv.count; ++j) row_first[j + 1] = row_first[j] + lv.size[j];
  const int64_t sides = row_first[lv.count];
  const auto batch = batch_indices(rois, N);
  const int64_t blocks = (C + kBlock - 1) / kBlock;
  FASTDET_DISPATCH_FLOATING(input.scalar_type(), "roi_spp_cpu", [&] {
    using T = opmath_t<scalar_t>;
    const T* r = rois.const_data_ptr<T>();
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    int32_t* am = argmax.mutable_data_ptr<int32_t>();
    const int64_t isn = input.stride(0), isc = input.stride(1), ish = input.stride(2), isw = input.stride(3);
    parallel_for(0, K * blocks, grain_for(kBlock * B), [&](int64_t begin, int64_t end) {
      T best[kBlock];
      int32_t where[kBlock];
      std::vector<int64_t> h0(sides), h1(sides), w0(sides), w1(sides);
      std::vector<char> valid(lv.count);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t k = roi_cpu::task_roi(item, K, blocks, isc != 1);
        const int64_t c0 = roi_cpu::task_block(item, K, blocks, isc != 1) * kBlock;
        const int64_t nc = std::min(kBlock, C - c0);
        for (int32_t j = 0; j < lv.count; ++j) {
          const int64_t l = lv.size[j];
          // roi_pool's geometry for an l x l output: bit-identical bins to roi_pool(x, boxes, (l, l)).
          const auto g = roi::pool_geometry<T>(r + k * 5 + 1, static_cast<T>(spatial_scale), l, l);
          valid[j] = g.valid && batch[k] >= 0;  // an invalid batch index pools to 0, as a non-finite box
          for (int64_t p = 0; p < l; ++p) {
            roi::pool_bin_range(g.start_h, g.bin_h, p, H, &h0[row_first[j] + p], &h1[row_first[j] + p]);
            roi::pool_bin_range(g.start_w, g.bin_w, p, W, &w0[row_first[j] + p], &w1[row_first[j] + p]);
          }
        }
        const scalar_t* base = in + (batch[k] >= 0 ? batch[k] : 0) * isn + c0 * isc;
        scalar_t* orow = o + k * C * B;
        int32_t* arow = am + (k * C + c0) * B;
        for (int32_t j = 0; j < lv.count; ++j) {
          const int64_t l = lv.size[j], first = row_first[j];
          const int64_t col0 = static_cast<int64_t>(lv.offset[j]) * C + c0 * l * l;
          for (int64_t ph = 0; ph < l; ++ph) {
            for (int64_t pw = 0; pw < l; ++pw) {
              const int64_t y0 = h0[first + ph], y1 = h1[first + ph], x0 = w0[first + pw], x1 = w1[first + pw];
              const bool empty = !valid[j] || y1 <= y0 || x1 <= x0;
              const int64_t bin = ph * l + pw;
              if (isc == 1 && !empty) {
                // channels-last: the block's channels are contiguous at every pixel, so they are the inner loop
                for (int64_t c = 0; c < nc; ++c) {
                  best[c] = roi::pool_init<T>();
                  where[c] = -1;
                }
                for (int64_t h = y0; h < y1; ++h) {
                  for (int64_t w = x0; w < x1; ++w) {
                    roi_cpu::pool_pixel<kBlock>(base + h * ish + w * isw, static_cast<int32_t>(h * W + w), nc, best,
                                                where);
                  }
                }
              } else {
                for (int64_t c = 0; c < nc; ++c) {
                  best[c] = empty ? T(0) : roi::pool_init<T>();
                  where[c] = -1;
                  if (!empty) {
                    roi::pool_bin_max(base + c * isc, ish, isw, W, y0, y1, x0, x1, &best[c], &where[c]);
                  }
                }
              }
              for (int64_t c = 0; c < nc; ++c) {
                orow[col0 + c * l * l + bin] = static_cast<scalar_t>(best[c]);
                arow[c * B + lv.offset[j] + bin] = where[c];
              }
            }
          }
        }
      }
    });
  });
  return {out, argmax};
}

// grad [K, C * B] and argmax [K, C, B] (any strides); returns the accumulation-dtype gradient of the input.
Tensor roi_spp_backward_kernel(const Tensor& grad, const Tensor& rois, const Tensor& argmax_in,
                               const std::vector<int64_t>& levels,
                               double /*spatial_scale: only the CUDA gather uses it*/, int64_t N, int64_t C, int64_t H,
                               int64_t W, bool channels_last, bool /*deterministic: the CPU always is*/) {
  const auto acc = accumulation_type(grad.scalar_type());
  auto buf = roi_zeros({N, C, H, W}, acc, grad, channels_last);
  const spp::Levels lv = spp::make_levels(levels);
  const int64_t K = rois.size(0), B = lv.offset[lv.count];
  if (K == 0 || C == 0 || buf.numel() == 0) {
    return buf;
  }
  const auto batch = batch_indices(rois, N);
  // RoIs of each image in index order; RoIs with an invalid batch index are left out.
  const roi_cpu::RoisByImage groups = roi_cpu::rois_by_image(batch, N);
  const std::vector<int64_t>& first = groups.first;
  const std::vector<int64_t>& order = groups.order;
  // Output column of bin b for channel c: col_base[b] + c * bin_area[b] (layout of roi_spp_math.h).
  std::vector<int64_t> col_base(B), bin_area(B);
  for (int32_t j = 0; j < lv.count; ++j) {
    const int64_t l = lv.size[j];
    for (int64_t i = 0; i < l * l; ++i) {
      col_base[lv.offset[j] + i] = static_cast<int64_t>(lv.offset[j]) * C + i;
      bin_area[lv.offset[j] + i] = l * l;
    }
  }
  const int64_t blocks = (C + kBlock - 1) / kBlock;
  FASTDET_DISPATCH_FLOATING(grad.scalar_type(), "roi_spp_backward_cpu", [&] {
    using T = opmath_t<scalar_t>;
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const int32_t* am = argmax_in.const_data_ptr<int32_t>();
    T* gi = buf.mutable_data_ptr<T>();
    const int64_t gsk = grad.stride(0), gsc = grad.stride(1);
    const int64_t ask = argmax_in.stride(0), asc = argmax_in.stride(1), asb = argmax_in.stride(2);
    const int64_t bsn = buf.stride(0), bsc = buf.stride(1), bsw = buf.stride(3);
    FASTDET_CHECK(H <= 1 || buf.stride(2) == W * bsw, "roi_spp_backward_cpu: unexpected gradient buffer strides");
    const int64_t rois_per_image = (K + N - 1) / std::max<int64_t>(N, 1);
    parallel_for(0, N * blocks, grain_for(rois_per_image * kBlock * B), [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / blocks;
        const int64_t c0 = (item % blocks) * kBlock;
        const int64_t c1 = std::min(C, c0 + kBlock);
        for (int64_t j = first[n]; j < first[n + 1]; ++j) {
          const int64_t k = order[j];
          for (int64_t c = c0; c < c1; ++c) {
            T* plane = gi + n * bsn + c * bsc;
            for (int64_t b = 0; b < B; ++b) {
              const int64_t a = am[k * ask + c * asc + b * asb];
              if (a < 0 || a >= H * W) {
                continue;  // empty bin (or an argmax that does not belong to this map): no gradient
              }
              // the buffer's row stride is W * bsw in both layouts, so pixel h * W + w sits at a * bsw
              plane[a * bsw] += static_cast<T>(g[k * gsk + (col_base[b] + c * bin_area[b]) * gsc]);
            }
          }
        }
      }
    });
  });
  return buf;
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_IMPL(fastdet, CPU, m) {
  m.impl("_roi_spp_kernel", TORCH_BOX(&fastdet::roi_spp_kernel));
  m.impl("_roi_spp_backward_kernel", TORCH_BOX(&fastdet::roi_spp_backward_kernel));
}
