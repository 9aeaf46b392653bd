// CPU kernels of roi_pool. Forward: one task per (RoI, block of channels); each bin's pixel range is computed once
// per task and reused by the block's channels (channel-inner for channels-last maps, plane by plane otherwise). Backward: one task per (image, block of channels), visiting the
// image's RoIs in index order, so every gradient element is written by one thread in one fixed order (deterministic,
// no atomics) -- the order of torchvision's sequential loop.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "ops/checks.h"
#include "ops/roi_align.h"
#include "ops/roi_pool.h"

namespace fastdet {
namespace {

constexpr int64_t kBlock = 16;
// Tasks smaller than this many (channel x bin) cells are grouped, so tiny calls run on one thread instead of paying
// for waking the pool.
constexpr int64_t kMinCellsPerTask = 16384;

int64_t grain_for(int64_t cells_per_item) {
  return std::max<int64_t>(1, kMinCellsPerTask / std::max<int64_t>(cells_per_item, 1));
}

std::vector<int64_t> checked_batch(const at::Tensor& rois, int64_t N) {
  const int64_t K = rois.size(0);
  std::vector<int64_t> batch(K);
  AT_DISPATCH_FLOATING_TYPES(rois.scalar_type(), "roi_pool_batch_index", [&] {
    const auto* r = rois.const_data_ptr<scalar_t>();
    for (int64_t k = 0; k < K; ++k) {
      batch[k] = roi::batch_index(r[k * 5], N);
      TORCH_CHECK(batch[k] >= 0, "rois[", k, ", 0] = ", r[k * 5], " is not a valid batch index for an input of ",
                  "batch size ", N, " (expected a value in [0, ", N, "))");
    }
  });
  return batch;
}

std::tuple<at::Tensor, at::Tensor> roi_pool_cpu(const at::Tensor& input, const at::Tensor& rois_in,
                                                double spatial_scale, int64_t PH, int64_t PW) {
  check_roi_feature(input, "input");
  check_output_size(PH, PW);
  check_spatial_scale(spatial_scale, "spatial_scale");
  const auto rois = prepare_rois(rois_in, input);
  const int64_t K = rois.size(0), N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  TORCH_CHECK(H * W <= INT32_MAX, "roi_pool: feature planes of more than 2^31 - 1 pixels are not supported (argmax ",
              "is an int32 index inside the plane, as in torchvision), got ", H, " x ", W);
  const auto fmt = roi_memory_format(input);
  auto out = at::empty({K, C, PH, PW}, input.options().memory_format(fmt));
  auto argmax = at::empty({K, C, PH, PW}, input.options().dtype(at::kInt).memory_format(fmt));
  if (out.numel() == 0) {
    return {out, argmax};
  }
  const auto batch = checked_batch(rois, N);
  const int64_t blocks = (C + kBlock - 1) / kBlock;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "roi_pool_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const T* r = rois.const_data_ptr<T>();
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    int32_t* am = argmax.mutable_data_ptr<int32_t>();
    const int64_t isn = input.stride(0), isc = input.stride(1), ish = input.stride(2), isw = input.stride(3);
    const int64_t osn = out.stride(0), osc = out.stride(1), osh = out.stride(2), osw = out.stride(3);
    at::parallel_for(0, K * blocks, grain_for(kBlock * PH * PW), [&](int64_t begin, int64_t end) {
      T best[kBlock];
      int32_t where[kBlock];
      std::vector<int64_t> h0(PH), h1(PH), w0(PW), w1(PW);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t k = item / blocks;
        const int64_t c0 = (item % blocks) * kBlock;
        const int64_t nc = std::min(kBlock, C - c0);
        const auto g = roi::pool_geometry<T>(r + k * 5 + 1, static_cast<T>(spatial_scale), PH, PW);
        const scalar_t* base = in + batch[k] * isn + c0 * isc;
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
                    const int32_t idx = static_cast<int32_t>(h * W + w);
                    for (int64_t c = 0; c < nc; ++c) {
                      const T v = static_cast<T>(px[c]);
                      const bool better = v > best[c];  // branch-free, as in the planar loop below
                      best[c] = better ? v : best[c];
                      where[c] = better ? idx : where[c];
                    }
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
                  for (int64_t h = h0[ph]; h < h1[ph]; ++h) {
                    const scalar_t* line = plane + h * ish;
                    const int32_t row = static_cast<int32_t>(h * W);
                    for (int64_t w = w0[pw]; w < w1[pw]; ++w) {
                      // Branch-free running maximum: bins hold a handful of pixels, so a data-dependent branch would
                      // mispredict about half the time. Same result as `if (v > top)` (NaN never wins).
                      const T v = static_cast<T>(line[w * isw]);
                      const bool better = v > top;
                      top = better ? v : top;
                      at = better ? row + static_cast<int32_t>(w) : at;
                    }
                  }
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

at::Tensor roi_pool_backward_cpu(const at::Tensor& grad, const at::Tensor& rois_in, const at::Tensor& argmax_in,
                                 double spatial_scale, int64_t N, int64_t C, int64_t H, int64_t W,
                                 bool channels_last) {
  TORCH_CHECK(rois_in.dim() == 2 && rois_in.size(1) == 5, "rois must have shape [K, 5], got ", rois_in.sizes());
  check_roi_grad(grad, rois_in, C, grad.dim() == 4 ? grad.size(2) : 0, grad.dim() == 4 ? grad.size(3) : 0);
  TORCH_CHECK(argmax_in.scalar_type() == at::kInt && argmax_in.sizes() == grad.sizes(),
              "argmax must be an int32 tensor shaped like grad ", grad.sizes(), ", got ", argmax_in.scalar_type(), " ",
              argmax_in.sizes());
  const auto rois = rois_in.to(roi_acc_type(grad.scalar_type())).contiguous();
  const auto acc = roi_acc_type(grad.scalar_type());
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  // at::zeros ignores the memory format of its options; empty + zero_ keeps it.
  auto buf = at::empty({N, C, H, W}, grad.options().dtype(acc).memory_format(fmt)).zero_();
  const int64_t K = rois.size(0), PH = grad.size(2), PW = grad.size(3);
  if (K > 0 && C > 0 && PH > 0 && PW > 0) {
    const auto batch = checked_batch(rois, N);
    std::vector<int64_t> first(N + 1, 0), order(K);
    for (int64_t k = 0; k < K; ++k) ++first[batch[k] + 1];
    for (int64_t n = 0; n < N; ++n) first[n + 1] += first[n];
    {
      std::vector<int64_t> fill(first.begin(), first.end() - 1);
      for (int64_t k = 0; k < K; ++k) order[fill[batch[k]]++] = k;
    }
    const int64_t blocks = (C + kBlock - 1) / kBlock;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_pool_backward_cpu", [&] {
      using T = at::opmath_type<scalar_t>;
      const scalar_t* g = grad.const_data_ptr<scalar_t>();
      const int32_t* am = argmax_in.const_data_ptr<int32_t>();
      T* gi = buf.mutable_data_ptr<T>();
      const int64_t gsn = grad.stride(0), gsc = grad.stride(1), gsh = grad.stride(2), gsw = grad.stride(3);
      const int64_t asn = argmax_in.stride(0), asc = argmax_in.stride(1), ash = argmax_in.stride(2),
                    asw = argmax_in.stride(3);
      const int64_t bsn = buf.stride(0), bsc = buf.stride(1), bsw = buf.stride(3);
      TORCH_INTERNAL_ASSERT(H <= 1 || buf.stride(2) == W * bsw);
      const int64_t rois_per_image = (K + N - 1) / std::max<int64_t>(N, 1);
      at::parallel_for(0, N * blocks, grain_for(rois_per_image * kBlock * PH * PW), [&](int64_t begin, int64_t end) {
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
  return buf.to(grad.scalar_type());
}

}  // namespace
}  // namespace fastdet

TORCH_LIBRARY_IMPL(fastdet, CPU, m) {
  m.impl("roi_pool", &fastdet::roi_pool_cpu);
  m.impl("_roi_pool_backward", &fastdet::roi_pool_backward_cpu);
}
