// CUDA kernels of roi_pool.
//
// Forward: one thread per output element; for channels-last maps consecutive threads take consecutive channels (the
// warp's reads of one pixel are one contiguous run), for NCHW maps consecutive bins.
// Backward, two modes:
//   * default: each output element adds its gradient to its argmax pixel with atomicAdd (order varies between runs);
//   * deterministic (the backward op's argument, torch.are_deterministic_algorithms_enabled() from fastdet.ops.roi):
//     a gather with one thread per gradient row (image n, channel c, row y), channels fastest. The thread visits the
//     image's RoIs in index order, skips those whose pixel span misses row y, and for the bin rows covering y adds the
//     gradients whose argmax lies in row y, in (RoI, ph, pw) order -- the CPU kernel's order, so the result is
//     bitwise reproducible and equal to the CPU's. No atomics, no extra memory.
// Invalid batch indices cannot be reported without a host synchronisation: such RoIs pool to 0 (argmax -1) and pass
// no gradient. All offsets are 64-bit.
#include <cstdint>
#include <tuple>

#include "ops/cuda/cuda_utils.cuh"
#include "ops/roi_align.h"
#include "ops/roi_pool.h"

namespace fastdet {
namespace {

struct Shape4 {
  int64_t n, c, h, w;
};

template <typename scalar_t>
__global__ void pool_forward_kernel(const scalar_t* __restrict__ input, Shape4 is, int64_t N, int64_t C, int64_t H,
                                    int64_t W, const opmath_t<scalar_t>* __restrict__ rois, int64_t K,
                                    opmath_t<scalar_t> spatial_scale, int64_t PH, int64_t PW,
                                    bool channels_inner, scalar_t* __restrict__ out, int32_t* __restrict__ argmax,
                                    Shape4 os) {
  using T = opmath_t<scalar_t>;
  const int64_t total = K * C * PH * PW;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t c, bin;
    if (channels_inner) {
      c = idx % C;
      bin = (idx / C) % (PH * PW);
    } else {
      bin = idx % (PH * PW);
      c = (idx / (PH * PW)) % C;
    }
    const int64_t k = idx / (C * PH * PW);
    const int64_t ph = bin / PW, pw = bin % PW;
    const T* r = rois + k * 5;
    const int64_t n = roi::batch_index(r[0], N);
    T best = T(0);
    int32_t where = -1;
    if (n >= 0) {
      const auto g = roi::pool_geometry<T>(r + 1, spatial_scale, PH, PW);
      int64_t h0, h1, w0, w1;
      roi::pool_bin_range(g.start_h, g.bin_h, ph, H, &h0, &h1);
      roi::pool_bin_range(g.start_w, g.bin_w, pw, W, &w0, &w1);
      if (g.valid && h1 > h0 && w1 > w0) {
        best = roi::pool_init<T>();
        roi::pool_bin_max(input + n * is.n + c * is.c, is.h, is.w, W, h0, h1, w0, w1, &best, &where);
      }
    }
    const int64_t o = k * os.n + c * os.c + ph * os.h + pw * os.w;
    out[o] = static_cast<scalar_t>(best);
    argmax[o] = where;
  }
}

template <typename scalar_t>
__global__ void pool_backward_atomic_kernel(const scalar_t* __restrict__ grad, Shape4 gs,
                                            const int32_t* __restrict__ argmax, Shape4 as,
                                            const opmath_t<scalar_t>* __restrict__ rois, int64_t K, int64_t N,
                                            int64_t C, int64_t H, int64_t W, int64_t PH, int64_t PW,
                                            opmath_t<scalar_t>* __restrict__ buf, Shape4 bs) {
  using T = opmath_t<scalar_t>;
  const int64_t total = K * C * PH * PW;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t pw = idx % PW, ph = (idx / PW) % PH, c = (idx / (PW * PH)) % C, k = idx / (PW * PH * C);
    const int64_t n = roi::batch_index(rois[k * 5], N);
    const int64_t a = argmax[k * as.n + c * as.c + ph * as.h + pw * as.w];
    if (n < 0 || a < 0 || a >= H * W) {
      continue;
    }
    // bs.h == W * bs.w for both layouts of the buffer the launcher allocates, so pixel a = h * W + w is at a * bs.w.
    atomicAdd(buf + n * bs.n + c * bs.c + a * bs.w,
              static_cast<T>(grad[k * gs.n + c * gs.c + ph * gs.h + pw * gs.w]));
  }
}

template <typename scalar_t>
__global__ void pool_backward_gather_kernel(const scalar_t* __restrict__ grad, Shape4 gs,
                                            const int32_t* __restrict__ argmax, Shape4 as,
                                            const opmath_t<scalar_t>* __restrict__ rois, int64_t K, int64_t N,
                                            int64_t C, int64_t H, int64_t W, int64_t PH, int64_t PW,
                                            opmath_t<scalar_t> spatial_scale,
                                            opmath_t<scalar_t>* __restrict__ buf, Shape4 bs) {
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
      const auto g = roi::pool_geometry<T>(rois + k * 5 + 1, spatial_scale, PH, PW);
      if (!g.valid) {
        continue;
      }
      int64_t top, unused, bottom;
      roi::pool_bin_range(g.start_h, g.bin_h, 0, H, &top, &unused);
      roi::pool_bin_range(g.start_h, g.bin_h, PH - 1, H, &unused, &bottom);
      if (y < top || y >= bottom) {
        continue;
      }
      for (int64_t ph = 0; ph < PH; ++ph) {
        int64_t h0, h1;
        roi::pool_bin_range(g.start_h, g.bin_h, ph, H, &h0, &h1);
        if (y < h0 || y >= h1) {
          continue;
        }
        for (int64_t pw = 0; pw < PW; ++pw) {
          const int64_t a = argmax[k * as.n + c * as.c + ph * as.h + pw * as.w];
          if (a >= y * W && a < (y + 1) * W) {
            row[(a - y * W) * bs.w] += static_cast<T>(grad[k * gs.n + c * gs.c + ph * gs.h + pw * gs.w]);
          }
        }
      }
    }
  }
}

Shape4 strides_of(const Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// _roi_pool_kernel: rois are contiguous in the accumulation dtype; the plane size fits argmax's int32.
std::tuple<Tensor, Tensor> roi_pool_kernel(const Tensor& input, const Tensor& rois, double spatial_scale, int64_t PH,
                                           int64_t PW, bool channels_last) {
  const DeviceGuard device_guard(input.get_device_index());
  const cudaStream_t stream = current_stream(input);
  const int64_t K = rois.size(0), N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  auto out = roi_empty({K, C, PH, PW}, input.scalar_type(), input, channels_last);
  auto argmax = roi_empty({K, C, PH, PW}, kInt, input, channels_last);
  if (out.numel() == 0) {
    return {out, argmax};
  }
  FASTDET_DISPATCH_FLOATING(input.scalar_type(), "roi_pool_cuda", [&] {
    using T = opmath_t<scalar_t>;
    pool_forward_kernel<scalar_t><<<blocks_for(out.numel()), kBlockThreads, 0, stream>>>(
        input.const_data_ptr<scalar_t>(), strides_of(input), N, C, H, W, rois.const_data_ptr<T>(), K,
        static_cast<T>(spatial_scale), PH, PW, channels_last, out.mutable_data_ptr<scalar_t>(),
        argmax.mutable_data_ptr<int32_t>(), strides_of(out));
    FASTDET_CUDA_LAUNCH_CHECK();
  });
  return {out, argmax};
}

// _roi_pool_backward_kernel: grad and argmax are [K, C, PH, PW] (any strides); returns the accumulation-dtype
// gradient of the input. deterministic selects the gather kernel.
Tensor roi_pool_backward_kernel(const Tensor& grad, const Tensor& rois, const Tensor& argmax, double spatial_scale,
                                int64_t N, int64_t C, int64_t H, int64_t W, bool channels_last, bool deterministic) {
  const DeviceGuard device_guard(grad.get_device_index());
  const cudaStream_t stream = current_stream(grad);
  const auto acc = accumulation_type(grad.scalar_type());
  auto buf = roi_zeros({N, C, H, W}, acc, grad, channels_last);
  const int64_t K = rois.size(0), PH = grad.size(2), PW = grad.size(3);
  if (K > 0 && C > 0 && PH > 0 && PW > 0 && buf.numel() > 0) {
    FASTDET_DISPATCH_FLOATING(grad.scalar_type(), "roi_pool_backward_cuda", [&] {
      using T = opmath_t<scalar_t>;
      if (deterministic) {
        pool_backward_gather_kernel<scalar_t><<<blocks_for(N * C * H), kBlockThreads, 0, stream>>>(
            grad.const_data_ptr<scalar_t>(), strides_of(grad), argmax.const_data_ptr<int32_t>(), strides_of(argmax),
            rois.const_data_ptr<T>(), K, N, C, H, W, PH, PW, static_cast<T>(spatial_scale),
            buf.mutable_data_ptr<T>(), strides_of(buf));
      } else {
        pool_backward_atomic_kernel<scalar_t><<<blocks_for(K * C * PH * PW), kBlockThreads, 0, stream>>>(
            grad.const_data_ptr<scalar_t>(), strides_of(grad), argmax.const_data_ptr<int32_t>(), strides_of(argmax),
            rois.const_data_ptr<T>(), K, N, C, H, W, PH, PW, buf.mutable_data_ptr<T>(), strides_of(buf));
      }
      FASTDET_CUDA_LAUNCH_CHECK();
    });
  }
  return buf;
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_IMPL(fastdet, CUDA, m) {
  m.impl("_roi_pool_kernel", TORCH_BOX(&fastdet::roi_pool_kernel));
  m.impl("_roi_pool_backward_kernel", TORCH_BOX(&fastdet::roi_pool_backward_kernel));
}
