// CUDA kernels of box coding. Every element is computed by the coder::*_one functions the CPU kernels use, whose
// products and sums go through the _rn intrinsics on the device, so nvcc cannot fuse dx * w + cx into an FMA and the
// bits match the CPU kernel's except where exp/log differ (CUDA's expf/logf, within 2 ulp / 1 ulp).
//
// Decode backward: grad_rel_codes is elementwise (one thread per (row, class)); grad_boxes is one thread per box,
// summing the rows that share it (rows j, j + Rb, ...) and their classes in a fixed order, so the result is bitwise
// reproducible and needs no atomics.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/headeronly/macros/Macros.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "ops/box_coder.h"
#include "ops/checks.h"

namespace fastdet {
namespace {

using coder::Params;

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;

unsigned int blocks_for(int64_t items) {
  const int64_t wanted = (items + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(wanted < 1 ? 1 : (wanted > kMaxBlocks ? kMaxBlocks : wanted));
}

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
                              int64_t Rb, const Params<at::opmath_type<T>> p, T* __restrict__ out) {
  using A = at::opmath_type<T>;
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
                                           const Params<at::opmath_type<T>> p, T* __restrict__ grad_rel) {
  using A = at::opmath_type<T>;
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
                                             const Params<at::opmath_type<T>> p, T* __restrict__ grad_boxes) {
  using A = at::opmath_type<T>;
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
                              const Params<at::opmath_type<T>> p, T* __restrict__ out) {
  using A = at::opmath_type<T>;
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
                                     int64_t N, int64_t K, bool shared_anchors, const Params<at::opmath_type<T>> p,
                                     T* __restrict__ out) {
  using A = at::opmath_type<T>;
  FASTDET_GRID_STRIDE(s, B * K) {
    const int64_t b = s / K;
    const int64_t n = index[s];
    CUDA_KERNEL_ASSERT(n >= -1 && n < N);
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

at::Tensor box_decode_cuda(const at::Tensor& rel_codes, const at::Tensor& boxes, c10::ArrayRef<double> weights,
                           double clip) {
  coder::check_decode_args(rel_codes, boxes, weights, clip);
  const c10::cuda::CUDAGuard device_guard(rel_codes.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto rel = rel_codes.contiguous();
  auto bx = boxes.contiguous();
  auto out = at::empty_like(rel);
  const int64_t R = rel.size(0), C = rel.size(1) / 4, Rb = bx.size(0);
  if (out.numel() == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rel.scalar_type(), "box_decode_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    decode_kernel<scalar_t><<<blocks_for(R * C), kThreads, 0, stream>>>(
        rel.const_data_ptr<scalar_t>(), bx.const_data_ptr<scalar_t>(), R * C, C, Rb,
        coder::make_params<A>(weights, clip), out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> box_decode_backward_cuda(const at::Tensor& grad, const at::Tensor& rel_codes,
                                                            const at::Tensor& boxes, c10::ArrayRef<double> weights,
                                                            double clip) {
  coder::check_decode_args(rel_codes, boxes, weights, clip);
  TORCH_CHECK(grad.sizes() == rel_codes.sizes(), "grad must have the shape of rel_codes ", rel_codes.sizes(),
              ", got ", grad.sizes());
  check_same_device(grad, "grad", rel_codes, "rel_codes");
  const c10::cuda::CUDAGuard device_guard(rel_codes.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto rel = rel_codes.contiguous();
  auto bx = boxes.contiguous();
  auto g = grad.to(rel.scalar_type()).contiguous();
  auto grad_rel = at::empty_like(rel);
  auto grad_boxes = at::empty_like(bx);
  const int64_t R = rel.size(0), C = rel.size(1) / 4, Rb = bx.size(0);
  if (Rb == 0) {
    return {grad_rel, grad_boxes};  // R == 0 too (checked): nothing to compute
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rel.scalar_type(), "box_decode_backward_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const auto p = coder::make_params<A>(weights, clip);
    if (R * C > 0) {
      decode_backward_rel_kernel<scalar_t><<<blocks_for(R * C), kThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), rel.const_data_ptr<scalar_t>(), bx.const_data_ptr<scalar_t>(), R * C, C, Rb,
          p, grad_rel.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    // also writes zeros for boxes no row uses (C == 0)
    decode_backward_boxes_kernel<scalar_t><<<blocks_for(Rb), kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), rel.const_data_ptr<scalar_t>(), bx.const_data_ptr<scalar_t>(), R, C, Rb, p,
        grad_boxes.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_rel, grad_boxes};
}

at::Tensor box_encode_cuda(const at::Tensor& reference_boxes, const at::Tensor& proposals,
                           c10::ArrayRef<double> weights) {
  coder::check_encode_args(reference_boxes, proposals, weights);
  const c10::cuda::CUDAGuard device_guard(reference_boxes.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto gt = reference_boxes.contiguous();
  auto ex = proposals.contiguous();
  auto out = at::empty_like(gt);
  const int64_t N = gt.size(0);
  if (N == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gt.scalar_type(), "box_encode_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    encode_kernel<scalar_t><<<blocks_for(N), kThreads, 0, stream>>>(
        gt.const_data_ptr<scalar_t>(), ex.const_data_ptr<scalar_t>(), N, coder::make_params<A>(weights, 0.0),
        out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor decode_select_boxes_cuda(const at::Tensor& rel_codes, const at::Tensor& anchors, const at::Tensor& index,
                                    const std::optional<at::Tensor>& image_sizes, c10::ArrayRef<double> weights,
                                    double clip) {
  coder::check_decode_select_args(rel_codes, anchors, index, image_sizes, weights, clip);
  const c10::cuda::CUDAGuard device_guard(rel_codes.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto rel = rel_codes.contiguous();
  auto anc = anchors.contiguous();
  auto idx = index.contiguous();
  const int64_t B = rel.size(0), N = rel.size(1), K = idx.size(1);
  auto out = at::empty({B, K, 4}, rel.options());
  if (out.numel() == 0) {
    return out;
  }
  at::Tensor sizes;
  if (image_sizes.has_value()) {
    sizes = image_sizes->to(at::kDouble).contiguous();  // on the device already (checked): no host round trip
  }
  const double* sp = image_sizes.has_value() ? sizes.const_data_ptr<double>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rel.scalar_type(), "decode_select_boxes_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    decode_select_kernel<scalar_t><<<blocks_for(B * K), kThreads, 0, stream>>>(
        rel.const_data_ptr<scalar_t>(), anc.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(), sp, B, N, K,
        anc.size(0) == 1, coder::make_params<A>(weights, clip), out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace fastdet

TORCH_LIBRARY_IMPL(fastdet, CUDA, m) {
  m.impl("box_decode", &fastdet::box_decode_cuda);
  m.impl("_box_decode_backward", &fastdet::box_decode_backward_cuda);
  m.impl("box_encode", &fastdet::box_encode_cuda);
  m.impl("_decode_select_boxes", &fastdet::decode_select_boxes_cuda);
}
