// CUDA kernels of the aligned-pair IoU losses (GIoU, DIoU, CIoU): one thread per pair, evaluated by the same
// boxloss::pair_loss / pair_loss_backward as the CPU kernel. A reduced loss uses the deterministic two-pass sum of
// loss_reduce.cuh over the same fixed chunks as the CPU kernel.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

#include "ops/box_loss_math.h"
#include "ops/box_losses.h"
#include "ops/checks.h"
#include "ops/cuda/loss_reduce.cuh"
#include "ops/loss_reduction.h"

namespace fastdet {
namespace {

using cuda_reduce::kThreads;

template <typename T>
__device__ inline void load4(const T* p, T out[4]) {
  out[0] = p[0];
  out[1] = p[1];
  out[2] = p[2];
  out[3] = p[3];
}

// Block b owns pairs [b * kLossChunk, (b + 1) * kLossChunk); thread k evaluates pairs k, k + kThreads, ...
template <typename T, bool Reduce>
__global__ void __launch_bounds__(kThreads)
    box_pair_loss_kernel(const T* __restrict__ b1, const T* __restrict__ b2, int64_t pairs, int64_t variant, T eps,
                         T* __restrict__ out, T* __restrict__ partial) {
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * kLossChunk;
  const int64_t p1 = p0 + kLossChunk < pairs ? p0 + kLossChunk : pairs;
  T acc = T(0);
  for (int64_t p = p0 + threadIdx.x; p < p1; p += kThreads) {
    T a[4], b[4];
    load4(b1 + 4 * p, a);
    load4(b2 + 4 * p, b);
    const T l = boxloss::pair_loss<T>(a, b, variant, eps);
    if (Reduce) {
      acc += l;
    } else {
      out[p] = l;
    }
  }
  if (Reduce) {
    const T total = cuda_reduce::block_sum<T>(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = total;
  }
}

// grad: per pair ('none'), or one value shared by all pairs (sum), divided by the number of pairs (mean).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    box_pair_loss_backward_kernel(const T* __restrict__ grad, const T* __restrict__ b1, const T* __restrict__ b2,
                                  int64_t pairs, int64_t variant, int64_t reduction, T eps, T* __restrict__ g1,
                                  T* __restrict__ g2) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  T shared = T(0);
  if (reduction != kReduceNone) {
    shared = reduction == kReduceMean ? grad[0] / static_cast<T>(pairs) : grad[0];
  }
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < pairs; p += stride) {
    T a[4], b[4], ga[4], gb[4];
    load4(b1 + 4 * p, a);
    load4(b2 + 4 * p, b);
    const T g = reduction == kReduceNone ? grad[p] : shared;
    boxloss::pair_loss_backward<T>(a, b, variant, eps, g, ga, gb);
    for (int k = 0; k < 4; ++k) {
      g1[4 * p + k] = ga[k];
      g2[4 * p + k] = gb[k];
    }
  }
}

at::Tensor box_pair_loss_cuda(const at::Tensor& boxes1, const at::Tensor& boxes2, int64_t variant, int64_t reduction,
                              double eps) {
  auto args = prepare_box_pair_loss_args(boxes1, boxes2, variant, reduction, eps);
  const c10::cuda::CUDAGuard device_guard(args.boxes1.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t P = args.pairs;
  const auto opts = args.boxes1.options();
  const bool reduce = reduction != kReduceNone;
  at::Tensor out = reduce ? at::empty({}, opts) : at::empty(box_pair_loss_shape(boxes1), opts);
  const int64_t chunks = (P + kLossChunk - 1) / kLossChunk;
  TORCH_CHECK(chunks <= std::numeric_limits<int32_t>::max(), "box_pair_loss: too many pairs (", P, ")");
  if (!reduce && P == 0) {
    return out;
  }
  at::Tensor partial = reduce ? at::empty({std::max<int64_t>(chunks, 1)}, opts) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "box_pair_loss_cuda", [&] {
    const auto* b1 = args.boxes1.const_data_ptr<scalar_t>();
    const auto* b2 = args.boxes2.const_data_ptr<scalar_t>();
    const auto eps_t = static_cast<scalar_t>(eps);
    if (reduce) {
      if (chunks > 0) {
        box_pair_loss_kernel<scalar_t, true><<<static_cast<unsigned int>(chunks), kThreads, 0, stream>>>(
            b1, b2, P, variant, eps_t, nullptr, partial.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      // torchvision: the mean of no pairs is 0 (0.0 * sum), so scale 0 rather than 1 / 0.
      const double scale = reduction == kReduceMean ? (P > 0 ? 1.0 / static_cast<double>(P) : 0.0) : 1.0;
      cuda_reduce::finish_sum_kernel<scalar_t, scalar_t><<<1, kThreads, 0, stream>>>(
          partial.const_data_ptr<scalar_t>(), chunks, nullptr, scale, out.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      box_pair_loss_kernel<scalar_t, false><<<static_cast<unsigned int>(chunks), kThreads, 0, stream>>>(
          b1, b2, P, variant, eps_t, out.mutable_data_ptr<scalar_t>(), nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> box_pair_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& boxes1,
                                                               const at::Tensor& boxes2, int64_t variant,
                                                               int64_t reduction, double eps) {
  auto args = prepare_box_pair_loss_args(boxes1, boxes2, variant, reduction, eps);
  const int64_t P = args.pairs;
  TORCH_CHECK(reduction == kReduceNone ? grad.numel() == P : grad.numel() == 1, "grad must have shape ",
              reduction == kReduceNone ? "[...] (the loss' shape)" : "[] (a reduced loss)", ", got ", grad.sizes());
  // The dispatcher sends mixed-device calls here too; the CPU kernel only ever sees CPU tensors.
  check_same_device(grad, "grad", boxes1, "boxes1");
  const c10::cuda::CUDAGuard device_guard(args.boxes1.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto g1 = at::empty_like(args.boxes1);
  auto g2 = at::empty_like(args.boxes2);
  if (P > 0) {
    auto g = grad.to(args.boxes1.scalar_type()).contiguous();
    const int64_t blocks = std::min<int64_t>((P + kThreads - 1) / kThreads, 65536);
    AT_DISPATCH_FLOATING_TYPES(g1.scalar_type(), "box_pair_loss_backward_cuda", [&] {
      box_pair_loss_backward_kernel<scalar_t><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), args.boxes1.const_data_ptr<scalar_t>(),
          args.boxes2.const_data_ptr<scalar_t>(), P, variant, reduction, static_cast<scalar_t>(eps),
          g1.mutable_data_ptr<scalar_t>(), g2.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {g1.view(boxes1.sizes()).to(boxes1.scalar_type()), g2.view(boxes2.sizes()).to(boxes2.scalar_type())};
}

}  // namespace
}  // namespace fastdet

TORCH_LIBRARY_IMPL(fastdet, CUDA, m) {
  m.impl("box_pair_loss", &fastdet::box_pair_loss_cuda);
  m.impl("_box_pair_loss_backward", &fastdet::box_pair_loss_backward_cuda);
}
