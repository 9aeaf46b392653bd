// CUDA kernels of box coding. Every element is computed by the coder::*_one functions the CPU kernels use, whose
// products and sums go through the _rn intrinsics on the device, so nvcc cannot fuse dx * w + cx into an FMA and the
// bits match the CPU kernel's except where exp/log differ (CUDA's expf/logf, within 2 ulp / 1 ulp).
//
// Decode backward: grad_rel_codes is elementwise (one thread per (row, class)); grad_boxes is one thread per box,
// summing the rows that share it (rows j, j + Rb, ...) and their classes in a fixed order, so the result is bitwise
// reproducible and needs no atomics.
//
// The launchers receive prepared arguments (see box_coder.h): contiguous, one device, one dtype, valid weights.
#include <torch/headeronly/macros/Macros.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "ops/box_coder.h"
#include "ops/cuda/cuda_utils.cuh"

namespace fastdet {
namespace {

using coder::Params;

#define FASTDET_GRID_STRIDE(i, n)                                                                   \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

// Box of element i = (row, class): row = i / C, box = row % Rb. The common layouts (C == 1; one box per row) need
// no 64-bit division, which the GPU emulates in dozens of instructions.
__device__ inline int64_t box_of(int64_t i, int64_t C, int64_t Rb) {
  const int64_t row = C == 1 ? i : i / C;
  return row < Rb ? row : row % Rb;
}

template <typename T, typename A>
__device__ inline void load4(const T* p, A v[4]) {
#pragma unroll
  for (int k = 0; k < 4; ++k) v[k] = static_cast<A>(p[k]);
}

template <typename T>
__global__ void decode_kernel(const T* __restrict__ rel, const T* __restrict__ boxes, int64_t total, int64_t C,
                              int64_t Rb, const Params<opmath_t<T>> p, T* __restrict__ out) {
  using A = opmath_t<T>;
  FASTDET_GRID_STRIDE(i, total) {
    A rv[4], bv[4], ov[4];
    load4(rel + i * 4, rv);
    load4(boxes + box_of(i, C, Rb) * 4, bv);
    coder::decode_one<A>(rv, bv, p, ov);
#pragma unroll
    for (int k = 0; k < 4; ++k) out[i * 4 + k] = static_cast<T>(ov[k]);
  }
}

template <typename T>
__global__ void decode_backward_rel_kernel(const T* __restrict__ grad, const T* __restrict__ rel,
                                           const T* __restrict__ boxes, int64_t total, int64_t C, int64_t Rb,
                                           const Params<opmath_t<T>> p, T* __restrict__ grad_rel) {
  using A = opmath_t<T>;
  FASTDET_GRID_STRIDE(i, total) {
    A rv[4], bv[4], gv[4], grv[4], gbv[4];
    load4(rel + i * 4, rv);
    load4(boxes + box_of(i, C, Rb) * 4, bv);
    load4(grad + i * 4, gv);
    coder::decode_one_backward<A>(rv, bv, p, gv, grv, gbv);
#pragma unroll
    for (int k = 0; k < 4; ++k) grad_rel[i * 4 + k] = static_cast<T>(grv[k]);
  }
}

template <typename T>
__global__ void decode_backward_boxes_kernel(const T* __restrict__ grad, const T* __restrict__ rel,
                                             const T* __restrict__ boxes, int64_t R, int64_t C, int64_t Rb,
                                             const Params<opmath_t<T>> p, T* __restrict__ grad_boxes) {
  using A = opmath_t<T>;
  FASTDET_GRID_STRIDE(j, Rb) {
    A bv[4], acc[4] = {A(0), A(0), A(0), A(0)};
    load4(boxes + j * 4, bv);
    for (int64_t row = j; row < R; row += Rb) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = row * C + c;
        A rv[4], gv[4], grv[4], gbv[4];
        load4(rel + i * 4, rv);
        load4(grad + i * 4, gv);
        coder::decode_one_backward<A>(rv, bv, p, gv, grv, gbv);
#pragma unroll
        for (int k = 0; k < 4; ++k) acc[k] += gbv[k];
      }
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) grad_boxes[j * 4 + k] = static_cast<T>(acc[k]);
  }
}

template <typename T>
__global__ void encode_kernel(const T* __restrict__ gt, const T* __restrict__ ex, int64_t N,
                              const Params<opmath_t<T>> p, T* __restrict__ out) {
  using A = opmath_t<T>;
  FASTDET_GRID_STRIDE(i, N) {
    A gv[4], ev[4], ov[4];
    load4(gt + i * 4, gv);
    load4(ex + i * 4, ev);
    coder::encode_one<A>(gv, ev, p, ov);
#pragma unroll
    for (int k = 0; k < 4; ++k) out[i * 4 + k] = static_cast<T>(ov[k]);
  }
}

template <typename T>
__global__ void decode_select_kernel(const T* __restrict__ rel, const T* __restrict__ anchors,
                                     const int64_t* __restrict__ index, const double* __restrict__ sizes, int64_t B,
                                     int64_t N, int64_t K, bool shared_anchors, const Params<opmath_t<T>> p,
                                     T* __restrict__ out) {
  using A = opmath_t<T>;
  FASTDET_GRID_STRIDE(s, B * K) {
    const int64_t b = s / K;
    const int64_t n = index[s];
    // An index outside [-1, N) cannot be raised here without a host sync, and a device assert would kill the CUDA
    // context (every later call in the process fails). The slot is written as a NaN box instead -- the bad index
    // shows up in the output, as a bad label does in the focal loss -- and nothing outside the tensors is read.
    // (The CPU raises; the public caller, fastdet.ops.decode_and_select, only passes indices from its top-k.)
    if (n < -1 || n >= N) {
      const T nan = static_cast<T>(std::numeric_limits<A>::quiet_NaN());
#pragma unroll
      for (int k = 0; k < 4; ++k) out[s * 4 + k] = nan;
      continue;
    }
    A ov[4] = {A(0), A(0), A(0), A(0)};
    if (n >= 0) {
      A rv[4], av[4];
      load4(rel + (b * N + n) * 4, rv);
      load4(anchors + ((shared_anchors ? 0 : b) * N + n) * 4, av);
      coder::decode_one<A>(rv, av, p, ov);
      if (sizes != nullptr) {
        // torchvision's clip_boxes_to_image: clamp(min=0, max=size); NaN stays NaN.
        const A h = static_cast<A>(sizes[b * 2]), w = static_cast<A>(sizes[b * 2 + 1]);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const A hi = (k % 2 == 0) ? w : h;
          ov[k] = ov[k] < A(0) ? A(0) : (ov[k] > hi ? hi : ov[k]);
        }
      }
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) out[s * 4 + k] = static_cast<T>(ov[k]);
  }
}

Tensor box_decode_kernel(const Tensor& rel, const Tensor& bx, std::vector<double> weights, double clip) {
  const DeviceGuard device_guard(rel.get_device_index());
  const cudaStream_t stream = current_stream(rel);
  auto out = aten::empty_like(rel);
  const int64_t R = rel.size(0), C = rel.size(1) / 4, Rb = bx.size(0);
  if (out.numel() == 0) {
    return out;
  }
  FASTDET_DISPATCH_FLOATING(rel.scalar_type(), "box_decode_cuda", [&] {
    using A = opmath_t<scalar_t>;
    decode_kernel<scalar_t><<<blocks_for(R * C), kBlockThreads, 0, stream>>>(
        rel.const_data_ptr<scalar_t>(), bx.const_data_ptr<scalar_t>(), R * C, C, Rb,
        coder::make_params<A>(weights, clip), out.mutable_data_ptr<scalar_t>());
    FASTDET_CUDA_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<Tensor, Tensor> box_decode_backward_kernel(const Tensor& g, const Tensor& rel, const Tensor& bx,
                                                      std::vector<double> weights, double clip) {
  const DeviceGuard device_guard(rel.get_device_index());
  const cudaStream_t stream = current_stream(rel);
  auto grad_rel = aten::empty_like(rel);
  auto grad_boxes = aten::empty_like(bx);
  const int64_t R = rel.size(0), C = rel.size(1) / 4, Rb = bx.size(0);
  if (Rb == 0) {
    return {grad_rel, grad_boxes};  // R == 0 too (checked): nothing to compute
  }
  FASTDET_DISPATCH_FLOATING(rel.scalar_type(), "box_decode_backward_cuda", [&] {
    using A = opmath_t<scalar_t>;
    const auto p = coder::make_params<A>(weights, clip);
    if (R * C > 0) {
      decode_backward_rel_kernel<scalar_t><<<blocks_for(R * C), kBlockThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), rel.const_data_ptr<scalar_t>(), bx.const_data_ptr<scalar_t>(), R * C, C, Rb,
          p, grad_rel.mutable_data_ptr<scalar_t>());
      FASTDET_CUDA_LAUNCH_CHECK();
    }
    // also writes zeros for boxes no row uses (C == 0)
    decode_backward_boxes_kernel<scalar_t><<<blocks_for(Rb), kBlockThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), rel.const_data_ptr<scalar_t>(), bx.const_data_ptr<scalar_t>(), R, C, Rb, p,
        grad_boxes.mutable_data_ptr<scalar_t>());
    FASTDET_CUDA_LAUNCH_CHECK();
  });
  return {grad_rel, grad_boxes};
}

Tensor box_encode_kernel(const Tensor& gt, const Tensor& ex, std::vector<double> weights) {
  const DeviceGuard device_guard(gt.get_device_index());
  const cudaStream_t stream = current_stream(gt);
  auto out = aten::empty_like(gt);
  const int64_t N = gt.size(0);
  if (N == 0) {
    return out;
  }
  FASTDET_DISPATCH_FLOATING(gt.scalar_type(), "box_encode_cuda", [&] {
    using A = opmath_t<scalar_t>;
    encode_kernel<scalar_t><<<blocks_for(N), kBlockThreads, 0, stream>>>(
        gt.const_data_ptr<scalar_t>(), ex.const_data_ptr<scalar_t>(), N, coder::make_params<A>(weights, 0.0),
        out.mutable_data_ptr<scalar_t>());
    FASTDET_CUDA_LAUNCH_CHECK();
  });
  return out;
}

// image_sizes: float64 [B, 2] on the device, or absent. An index value outside [-1, N) gives a NaN box (see the
// kernel).
Tensor decode_select_boxes_kernel(const Tensor& rel, const Tensor& anc, const Tensor& idx,
                                  const std::optional<Tensor>& image_sizes, std::vector<double> weights,
                                  double clip) {
  const DeviceGuard device_guard(rel.get_device_index());
  const cudaStream_t stream = current_stream(rel);
  const int64_t B = rel.size(0), N = rel.size(1), K = idx.size(1);
  auto out = aten::empty({B, K, 4}, rel.scalar_type(), rel);
  if (out.numel() == 0) {
    return out;
  }
  const double* sp = image_sizes.has_value() ? image_sizes->const_data_ptr<double>() : nullptr;
  FASTDET_DISPATCH_FLOATING(rel.scalar_type(), "decode_select_boxes_cuda", [&] {
    using A = opmath_t<scalar_t>;
    decode_select_kernel<scalar_t><<<blocks_for(B * K), kBlockThreads, 0, stream>>>(
        rel.const_data_ptr<scalar_t>(), anc.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(), sp, B, N, K,
        anc.size(0) == 1, coder::make_params<A>(weights, clip), out.mutable_data_ptr<scalar_t>());
    FASTDET_CUDA_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_IMPL(fastdet, CUDA, m) {
  m.impl("_box_decode_kernel", TORCH_BOX(&fastdet::box_decode_kernel));
  m.impl("_box_decode_backward_kernel", TORCH_BOX(&fastdet::box_decode_backward_kernel));
  m.impl("_box_encode_kernel", TORCH_BOX(&fastdet::box_encode_kernel));
  m.impl("_decode_select_boxes_kernel", TORCH_BOX(&fastdet::decode_select_boxes_kernel));
}
