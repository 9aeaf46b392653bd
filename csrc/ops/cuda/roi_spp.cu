// CUDA kernels of roi_spp.
//
// Forward: one thread per output element, in the output's order (level, channel, bin of each RoI), so consecutive
// threads write consecutive columns; each thread computes its level's roi_pool geometry (roi_pool.h) and the bin's
// maximum (roi_spp_math.h). The level table travels by value.
// Backward, two modes (as roi_pool's):
//   * default: each (RoI, channel, bin) adds its gradient to its argmax pixel with atomicAdd (order varies);
//   * deterministic (torch.are_deterministic_algorithms_enabled() from fastdet.ops.roi_spp): one thread per gradient
//     row (image n, channel c, row y) visits the image's RoIs in index order and their bins in (level, ph, pw) order,
//     adding the gradients whose argmax lies in row y -- the CPU kernel's order, so the result equals the CPU's.
// Invalid batch indices cannot be reported without a host synchronisation: such RoIs pool to 0 (argmax -1) and pass
// no gradient. All offsets are 64-bit.
#include <cstdint>
#include <tuple>
#include <vector>

#include "ops/cuda/cuda_utils.cuh"
#include "ops/roi_align.h"
#include "ops/roi_spp.h"

namespace fastdet {
namespace {

struct Shape4 {
  int64_t n, c, h, w;
};

Shape4 strides_of(const Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

template <typename scalar_t>
__global__ void spp_forward_kernel(const scalar_t* __restrict__ input, Shape4 is, int64_t N, int64_t C, int64_t H,
                                   int64_t W, const opmath_t<scalar_t>* __restrict__ rois, int64_t K,
                                   opmath_t<scalar_t> spatial_scale, spp::Levels lv, scalar_t* __restrict__ out,
                                   int32_t* __restrict__ argmax) {
  using T = opmath_t<scalar_t>;
  const int64_t B = lv.offset[lv.count];
  const int64_t total = K * C * B;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t k = idx / (C * B);
    int64_t j, c, ph, pw;
    spp::locate_column(lv, C, idx % (C * B), &j, &c, &ph, &pw);
    const int64_t l = lv.size[j];
    const T* r = rois + k * 5;
    const int64_t n = roi::batch_index(r[0], N);
    T best = T(0);
    int32_t where = -1;
    if (n >= 0) {
      const auto g = roi::pool_geometry<T>(r + 1, spatial_scale, l, l);
      int64_t h0, h1, w0, w1;
      roi::pool_bin_range(g.start_h, g.bin_h, ph, H, &h0, &h1);
      roi::pool_bin_range(g.start_w, g.bin_w, pw, W, &w0, &w1);
      if (g.valid && h1 > h0 && w1 > w0) {
        best = roi::pool_init<T>();
        roi::pool_bin_max(input + n * is.n + c * is.c, is.h, is.w, W, h0, h1, w0, w1, &best, &where);
      }
    }
    out[idx] = static_cast<scalar_t>(best);
    argmax[(k * C + c) * B + lv.offset[j] + ph * l + pw] = where;
  }
}

template <typename scalar_t>
__global__ void spp_backward_atomic_kernel(const scalar_t* __restrict__ grad, int64_t gsk, int64_t gsc,
                                           const int32_t* __restrict__ argmax, int64_t ask, int64_t asc, int64_t asb,
                                           const opmath_t<scalar_t>* __restrict__ rois, int64_t K, int64_t N,
                                           int64_t C, int64_t H, int64_t W, spp::Levels lv,
                                           opmath_t<scalar_t>* __restrict__ buf, Shape4 bs) {
  using T = opmath_t<scalar_t>;
  const int64_t B = lv.offset[lv.count];
  const int64_t total = K * C * B;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t k = idx / (C * B), col = idx % (C * B);
    int64_t j, c, ph, pw;
    spp::locate_column(lv, C, col, &j, &c, &ph, &pw);
    const int64_t n = roi::batch_index(rois[k * 5], N);
    const int64_t a = argmax[k * ask + c * asc + (lv.offset[j] + ph * lv.size[j] + pw) * asb];
    if (n < 0 || a < 0 || a >= H * W) {
      continue;
    }
    // bs.h == W * bs.w for both layouts of the buffer the launcher allocates, so pixel a = h * W + w is at a * bs.w.
    atomicAdd(buf + n * bs.n + c * bs.c + a * bs.w, static_cast<T>(grad[k * gsk + col * gsc]));
  }
}

template <typename scalar_t>
__global__ void spp_backward_gather_kernel(const scalar_t* __restrict__ grad, int64_t gsk, int64_t gsc,
                                           const int32_t* __restrict__ argmax, int64_t ask, int64_t asc, int64_t asb,
                                           const opmath_t<scalar_t>* __restrict__ rois, int64_t K, int64_t N,
                                           int64_t C, int64_t H, int64_t W, spp::Levels lv,
                                           opmath_t<scalar_t> spatial_scale, opmath_t<scalar_t>* __restrict__ buf,
                                           Shape4 bs) {
  using T = opmath_t<scalar_t>;
  const int64_t total = N * C * H;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = idx % C, y = (idx / C) % H, n = idx / (C * H);
    T* row = buf + n * bs.n + c * bs.c + y * bs.h;
    for (int64_t k = 0; k < K; ++k) {
      if (roi::batch_index(rois[k * 5], N) != n) {
        continue;
      }
      for (int32_t j = 0; j < lv.count; ++j) {
        const int64_t l = lv.size[j];
        const auto g = roi::pool_geometry<T>(rois + k * 5 + 1, spatial_scale, l, l);
        if (!g.valid) {
          break;  // the same box at every level: non-finite everywhere
        }
        for (int64_t ph = 0; ph < l; ++ph) {
          int64_t h0, h1;
          roi::pool_bin_range(g.start_h, g.bin_h, ph, H, &h0, &h1);
          if (y < h0 || y >= h1) {
            continue;
          }
          for (int64_t pw = 0; pw < l; ++pw) {
            const int64_t a = argmax[k * ask + c * asc + (lv.offset[j] + ph * l + pw) * asb];
            if (a >= y * W && a < (y + 1) * W) {
              const int64_t col = static_cast<int64_t>(lv.offset[j]) * C + c * l * l + ph * l + pw;
              row[(a - y * W) * bs.w] += static_cast<T>(grad[k * gsk + col * gsc]);
            }
          }
        }
      }
    }
  }
}

std::tuple<Tensor, Tensor> roi_spp_kernel(const Tensor& input, const Tensor& rois, const std::vector<int64_t>& levels,
                                          double spatial_scale, bool /*channels_last: read through the strides*/) {
  const DeviceGuard device_guard(input.get_device_index());
  const cudaStream_t stream = current_stream(input);
  const int64_t K = rois.size(0), N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const spp::Levels lv = spp::make_levels(levels);
  const int64_t B = lv.offset[lv.count];
  auto out = torch::stable::empty({K, C * B}, input.scalar_type(), std::nullopt, input.device());
  auto argmax = torch::stable::empty({K, C, B}, kInt, std::nullopt, input.device());
  if (out.numel() == 0) {
    return {out, argmax};
  }
  FASTDET_DISPATCH_FLOATING(input.scalar_type(), "roi_spp_cuda", [&] {
    using T = opmath_t<scalar_t>;
    spp_forward_kernel<scalar_t><<<blocks_for(out.numel()), kBlockThreads, 0, stream>>>(
        input.const_data_ptr<scalar_t>(), strides_of(input), N, C, H, W, rois.const_data_ptr<T>(), K,
        static_cast<T>(spatial_scale), lv, out.mutable_data_ptr<scalar_t>(), argmax.mutable_data_ptr<int32_t>());
    FASTDET_CUDA_LAUNCH_CHECK();
  });
  return {out, argmax};
}

Tensor roi_spp_backward_kernel(const Tensor& grad, const Tensor& rois, const Tensor& argmax,
                               const std::vector<int64_t>& levels, double spatial_scale, int64_t N, int64_t C,
                               int64_t H, int64_t W, bool channels_last, bool deterministic) {
  const DeviceGuard device_guard(grad.get_device_index());
  const cudaStream_t stream = current_stream(grad);
  const auto acc = accumulation_type(grad.scalar_type());
  auto buf = roi_zeros({N, C, H, W}, acc, grad, channels_last);
  const spp::Levels lv = spp::make_levels(levels);
  const int64_t K = rois.size(0), B = lv.offset[lv.count];
  if (K > 0 && C > 0 && buf.numel() > 0) {
    FASTDET_DISPATCH_FLOATING(grad.scalar_type(), "roi_spp_backward_cuda", [&] {
      using T = opmath_t<scalar_t>;
      if (deterministic) {
        spp_backward_gather_kernel<scalar_t><<<blocks_for(N * C * H), kBlockThreads, 0, stream>>>(
            grad.const_data_ptr<scalar_t>(), grad.stride(0), grad.stride(1), argmax.const_data_ptr<int32_t>(),
            argmax.stride(0), argmax.stride(1), argmax.stride(2), rois.const_data_ptr<T>(), K, N, C, H, W, lv,
            static_cast<T>(spatial_scale), buf.mutable_data_ptr<T>(), strides_of(buf));
      } else {
        spp_backward_atomic_kernel<scalar_t><<<blocks_for(K * C * B), kBlockThreads, 0, stream>>>(
            grad.const_data_ptr<scalar_t>(), grad.stride(0), grad.stride(1), argmax.const_data_ptr<int32_t>(),
            argmax.stride(0), argmax.stride(1), argmax.stride(2), rois.const_data_ptr<T>(), K, N, C, H, W, lv,
            buf.mutable_data_ptr<T>(), strides_of(buf));
      }
      FASTDET_CUDA_LAUNCH_CHECK();
    });
  }
  return buf;
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_IMPL(fastdet, CUDA, m) {
  m.impl("_roi_spp_kernel", TORCH_BOX(&fastdet::roi_spp_kernel));
  m.impl("_roi_spp_backward_kernel", TORCH_BOX(&fastdet::roi_spp_backward_kernel));
}
