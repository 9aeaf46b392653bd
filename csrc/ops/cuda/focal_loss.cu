// CUDA kernels of the sigmoid focal loss. One kernel reads the logits (and float targets, or one int64 label per row)
// once and writes the per-element loss, or a per-block partial sum of it, and, when the caller needs a gradient, the
// gradient in the same pass; a second tiny kernel finishes a reduced loss (see loss_reduce.cuh). The scale (1 /
// normalizer, 1 / count) is read from device memory, so nothing here synchronises with the host.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "ops/cuda/cuda_utils.cuh"
#include "ops/cuda/loss_reduce.cuh"
#include "ops/focal_loss.h"
#include "ops/focal_loss_math.h"
#include "ops/loss_reduction.h"

namespace fastdet {
namespace {

using cuda_reduce::kThreads;

// Block b covers rows [b * rows_per_chunk, ...) (the float form is the label form with C = 1), i.e. at most
// kLossChunk consecutive elements; thread k handles elements k, k + kThreads, ... of that range: coalesced loads and
// stores, and the labels of neighbouring threads mostly coincide (served by the read-only cache).
template <typename scalar_t, bool WithLabels, bool Reduce, bool WithGrad>
__global__ void __launch_bounds__(kThreads)
    focal_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ tf, const int64_t* __restrict__ labels,
                 int64_t rows, int64_t classes, int64_t rows_per_chunk, int64_t ignore_index,
                 focal::Params<opmath_t<scalar_t>> prm, const opmath_t<scalar_t>* __restrict__ scale_ptr,
                 double scale_host, scalar_t* __restrict__ loss, scalar_t* __restrict__ grad,
                 opmath_t<scalar_t>* __restrict__ partial) {
  using T = opmath_t<scalar_t>;
  const T s = scale_ptr != nullptr ? *scale_ptr : static_cast<T>(scale_host);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
  const int64_t base = r0 * classes;
  // A chunk holds at most max(kLossChunk, C) elements and the launcher checks C < 2^31, so in-chunk offsets and the
  // per-element division by C are 32-bit (a 64-bit division would cost more than the loss itself).
  const int count = static_cast<int>((r1 - r0) * classes);
  const int C32 = static_cast<int>(classes);
  const T nan = std::numeric_limits<T>::quiet_NaN();
  T acc = T(0);
#pragma unroll 4
  for (int k = threadIdx.x; k < count; k += kThreads) {
    const int64_t i = base + k;
    T t;
    bool ignored = false, bad = false;
    if (WithLabels) {
      const int row_in_chunk = k / C32;
      const int c = k - row_in_chunk * C32;
      const int64_t label = labels[r0 + row_in_chunk];
      ignored = label == ignore_index;
      bad = !ignored && (label < -1 || label > classes);
      t = label == c ? T(1) : T(0);
    } else {
      t = static_cast<T>(tf[i]);
    }
    T g = T(0);
    T l = focal::element<T, WithGrad>(static_cast<T>(x[i]), t, prm, &g);
    if (WithLabels) {
      // An ignored row contributes nothing; a label outside [-1, C] makes its row NaN (the CPU kernel raises instead,
      // which CUDA cannot do without a host sync).
      if (ignored) {
        l = T(0);
        g = T(0);
      } else if (bad) {
        l = nan;
        g = nan;
      }
    }
    // An ignored row's outputs are written as 0, not 0 * s: the scale may be inf or NaN (a zero normalizer), and the
    // CPU kernel writes 0 there too.
    if (Reduce) {
      acc += l;
    } else {
      loss[i] = ignored ? scalar_t(0) : static_cast<scalar_t>(l * s);
    }
    if (WithGrad) {
      grad[i] = ignored ? scalar_t(0) : static_cast<scalar_t>(g * s);
    }
  }
  if (Reduce) {
    const T total = cuda_reduce::block_sum<T>(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = total;
  }
}

template <typename scalar_t, bool WithLabels, bool Reduce, bool WithGrad>
void launch(const FocalKernelArgs& a, int64_t rows_per_chunk, int64_t chunks, const std::optional<Tensor>& partial,
            cudaStream_t stream) {
  using T = opmath_t<scalar_t>;
  const focal::Params<T> prm{static_cast<T>(a.params.alpha), static_cast<T>(a.params.gamma), a.params.gamma_kind};
  const T* scale_ptr = a.scale_tensor.has_value() ? a.scale_tensor->const_data_ptr<T>() : nullptr;
  focal_kernel<scalar_t, WithLabels, Reduce, WithGrad><<<static_cast<unsigned int>(chunks), kThreads, 0, stream>>>(
      a.inputs.const_data_ptr<scalar_t>(), WithLabels ? nullptr : a.targets.const_data_ptr<scalar_t>(),
      WithLabels ? a.targets.const_data_ptr<int64_t>() : nullptr, a.rows, a.classes, rows_per_chunk, a.ignore_index,
      prm, scale_ptr, a.scale, Reduce ? nullptr : a.loss.mutable_data_ptr<scalar_t>(),
      WithGrad ? a.grad.mutable_data_ptr<scalar_t>() : nullptr, Reduce ? partial->mutable_data_ptr<T>() : nullptr);
  FASTDET_CUDA_LAUNCH_CHECK();
}

template <typename scalar_t, bool WithLabels>
void launch_flags(const FocalKernelArgs& a, int64_t rows_per_chunk, int64_t chunks,
                  const std::optional<Tensor>& partial, cudaStream_t stream) {
  const bool reduce = a.reduction != kReduceNone;
  const bool with_grad = a.grad.numel() > 0;
  if (reduce && with_grad) launch<scalar_t, WithLabels, true, true>(a, rows_per_chunk, chunks, partial, stream);
  else if (reduce) launch<scalar_t, WithLabels, true, false>(a, rows_per_chunk, chunks, partial, stream);
  else if (with_grad) launch<scalar_t, WithLabels, false, true>(a, rows_per_chunk, chunks, partial, stream);
  else launch<scalar_t, WithLabels, false, false>(a, rows_per_chunk, chunks, partial, stream);
}

std::tuple<Tensor, Tensor> sigmoid_focal_loss_kernel(const Tensor& inputs, const Tensor& targets,
                                                     const std::optional<Tensor>& scale, double scale_host,
                                                     int64_t ignore_index, double alpha, double gamma,
                                                     int64_t reduction, bool need_grad) {
  const DeviceGuard device_guard(inputs.get_device_index());
  const cudaStream_t stream = current_stream(inputs);
  const auto a =
      focal_kernel_args(inputs, targets, scale, scale_host, ignore_index, alpha, gamma, reduction, need_grad);
  const bool reduce = a.reduction != kReduceNone;
  const int64_t C = a.classes;
  const int64_t rows_per_chunk = std::max<int64_t>(1, kLossChunk / std::max<int64_t>(C, 1));
  const int64_t chunks = (C == 0 || a.rows == 0) ? 0 : (a.rows + rows_per_chunk - 1) / rows_per_chunk;
  // A launch limit of this kernel (grid size, 32-bit in-chunk offsets), not an argument check.
  FASTDET_CHECK(chunks <= std::numeric_limits<int32_t>::max() && C <= std::numeric_limits<int32_t>::max(),
                "sigmoid_focal_loss: input too large (", a.rows, " rows of ", C, " classes)");
  const auto acc = accumulation_type(a.inputs.scalar_type());
  const std::optional<Tensor> partial =
      reduce ? std::optional<Tensor>(aten::empty({std::max<int64_t>(chunks, 1)}, acc, a.inputs)) : std::nullopt;
  FASTDET_DISPATCH_FLOATING(a.inputs.scalar_type(), "sigmoid_focal_loss_cuda", [&] {
    using T = opmath_t<scalar_t>;
    if (chunks > 0) {
      if (a.with_labels) launch_flags<scalar_t, true>(a, rows_per_chunk, chunks, partial, stream);
      else launch_flags<scalar_t, false>(a, rows_per_chunk, chunks, partial, stream);
    }
    if (reduce) {
      // Also for empty input: the sum of nothing is 0, times the scale (NaN for the float form's mean, as torch).
      const T* scale_ptr = a.scale_tensor.has_value() ? a.scale_tensor->const_data_ptr<T>() : nullptr;
      cuda_reduce::finish_sum_kernel<scalar_t, T><<<1, kThreads, 0, stream>>>(
          partial->const_data_ptr<T>(), chunks, scale_ptr, a.scale, a.loss.mutable_data_ptr<scalar_t>());
      FASTDET_CUDA_LAUNCH_CHECK();
    }
  });
  return {a.loss, a.grad};
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_IMPL(fastdet, CUDA, m) {
  m.impl("_sigmoid_focal_loss_kernel", TORCH_BOX(&fastdet::sigmoid_focal_loss_kernel));
}
