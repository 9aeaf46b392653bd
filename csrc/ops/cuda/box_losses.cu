// CUDA kernels of the aligned-pair IoU losses (GIoU, DIoU, CIoU): one thread per pair, evaluated by the same
// boxloss::pair_loss / pair_loss_backward as the CPU kernel. A reduced loss uses the deterministic two-pass sum of
// loss_reduce.cuh over the same fixed chunks as the CPU kernel.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "ops/box_loss_math.h"
#include "ops/box_losses.h"
#include "ops/cuda/cuda_utils.cuh"
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

Tensor box_pair_loss_cuda(const Tensor& boxes1, const Tensor& boxes2, int64_t variant, int64_t reduction,
                          double eps) {
  const DeviceGuard device_guard(boxes1.get_device_index());
  const cudaStream_t stream = current_stream(boxes1);
  const int64_t P = boxes1.size(0);
  const auto dtype = boxes1.scalar_type();
  const bool reduce = reduction != kReduceNone;
  Tensor out = reduce ? aten::empty({}, dtype, boxes1) : aten::empty({P}, dtype, boxes1);
  const int64_t chunks = (P + kLossChunk - 1) / kLossChunk;
  // A launch limit of this kernel (grid size), not an argument check.
  FASTDET_CHECK(chunks <= std::numeric_limits<int32_t>::max(), "box_pair_loss: too many pairs (", P, ")");
  if (!reduce && P == 0) {
    return out;
  }
  const std::optional<Tensor> partial =
      reduce ? std::optional<Tensor>(aten::empty({std::max<int64_t>(chunks, 1)}, dtype, boxes1)) : std::nullopt;
  FASTDET_DISPATCH_FLOAT_DOUBLE(dtype, "box_pair_loss_cuda", [&] {
    const auto* b1 = boxes1.const_data_ptr<scalar_t>();
    const auto* b2 = boxes2.const_data_ptr<scalar_t>();
    const auto eps_t = static_cast<scalar_t>(eps);
    if (reduce) {
      if (chunks > 0) {
        box_pair_loss_kernel<scalar_t, true><<<static_cast<unsigned int>(chunks), kThreads, 0, stream>>>(
            b1, b2, P, variant, eps_t, nullptr, partial->mutable_data_ptr<scalar_t>());
        FASTDET_CUDA_LAUNCH_CHECK();
      }
      // torchvision: the mean of no pairs is 0 (0.0 * sum), so scale 0 rather than 1 / 0.
      const double scale = reduction == kReduceMean ? (P > 0 ? 1.0 / static_cast<double>(P) : 0.0) : 1.0;
      cuda_reduce::finish_sum_kernel<scalar_t, scalar_t><<<1, kThreads, 0, stream>>>(
          partial->const_data_ptr<scalar_t>(), chunks, nullptr, scale, out.mutable_data_ptr<scalar_t>());
      FASTDET_CUDA_LAUNCH_CHECK();
    } else {
      box_pair_loss_kernel<scalar_t, false><<<static_cast<unsigned int>(chunks), kThreads, 0, stream>>>(
          b1, b2, P, variant, eps_t, out.mutable_data_ptr<scalar_t>(), nullptr);
      FASTDET_CUDA_LAUNCH_CHECK();
    }
  });
  return out;
}

std::tuple<Tensor, Tensor> box_pair_loss_backward_cuda(const Tensor& grad, const Tensor& boxes1,
                                                       const Tensor& boxes2, int64_t variant, int64_t reduction,
                                                       double eps) {
  const DeviceGuard device_guard(boxes1.get_device_index());
  const cudaStream_t stream = current_stream(boxes1);
  const int64_t P = boxes1.size(0);
  auto g1 = aten::empty_like(boxes1);
  auto g2 = aten::empty_like(boxes2);
  if (P > 0) {
    const int64_t blocks = std::min<int64_t>((P + kThreads - 1) / kThreads, 65536);
    FASTDET_DISPATCH_FLOAT_DOUBLE(g1.scalar_type(), "box_pair_loss_backward_cuda", [&] {
      box_pair_loss_backward_kernel<scalar_t><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
          grad.const_data_ptr<scalar_t>(), boxes1.const_data_ptr<scalar_t>(), boxes2.const_data_ptr<scalar_t>(), P,
          variant, reduction, static_cast<scalar_t>(eps), g1.mutable_data_ptr<scalar_t>(),
          g2.mutable_data_ptr<scalar_t>());
      FASTDET_CUDA_LAUNCH_CHECK();
    });
  }
  return {g1, g2};
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_IMPL(fastdet, CUDA, m) {
  m.impl("_box_pair_loss_kernel", TORCH_BOX(&fastdet::box_pair_loss_cuda));
  m.impl("_box_pair_loss_backward_kernel", TORCH_BOX(&fastdet::box_pair_loss_backward_cuda));
}
