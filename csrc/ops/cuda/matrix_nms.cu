// CUDA kernel of Matrix NMS: one thread per candidate j loops over the candidates before it (compensation pass, then
// decay pass); O(N^2) work, O(N) memory, no host synchronisation.
#include <algorithm>
#include <optional>

#include "ops/cuda/cuda_utils.cuh"
#include "ops/matrix_nms_math.h"
#include "ops/stable.h"

namespace fastdet {
namespace {

template <typename T>
__global__ void compensation_kernel(const T* __restrict__ boxes, const int64_t* __restrict__ cat, int64_t B,
                                    int64_t N, T* __restrict__ comp) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < B * N;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = t / N, j = t % N;
    const T* base = boxes + b * N * 4;
    T c = T(0);
    for (int64_t i = 0; i < j; ++i) {
      if (cat == nullptr || cat[b * N + i] == cat[t]) {
        c = matrix_nms::nan_max(c, matrix_nms::pair_iou<T>(base + 4 * i, base + 4 * j));
      }
    }
    comp[t] = c;
  }
}

template <typename T>
__global__ void decay_kernel(const T* __restrict__ boxes, const int64_t* __restrict__ cat, const T* __restrict__ comp,
                             int64_t B, int64_t N, int64_t kernel, T neg_sigma, T* __restrict__ decay) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < B * N;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = t / N, j = t % N;
    const T* base = boxes + b * N * 4;
    T d = T(1);
    for (int64_t i = 0; i < j; ++i) {
      if (cat != nullptr && cat[b * N + i] != cat[t]) continue;
      const T iou = matrix_nms::pair_iou<T>(base + 4 * i, base + 4 * j);
      d = matrix_nms::nan_min(d, matrix_nms::ratio<T>(iou, comp[b * N + i], kernel, neg_sigma));
    }
    decay[t] = d;
  }
}

Tensor matrix_nms_kernel_cuda(const Tensor& boxes, const std::optional<Tensor>& categories, int64_t kernel,
                              double sigma) {
  const DeviceGuard device_guard(boxes.get_device_index());
  const int64_t B = boxes.size(0), N = boxes.size(1);
  auto decay = aten::empty({B, N}, boxes.scalar_type(), boxes);
  if (B == 0 || N == 0) return decay;
  auto comp = aten::empty({B, N}, boxes.scalar_type(), boxes);
  const int64_t* cat = categories.has_value() ? categories->const_data_ptr<int64_t>() : nullptr;
  const cudaStream_t stream = current_stream(boxes);
  const auto grid = blocks_for(B * N);
  FASTDET_DISPATCH_FLOAT_DOUBLE(boxes.scalar_type(), "matrix_nms", [&] {
    compensation_kernel<scalar_t><<<grid, kBlockThreads, 0, stream>>>(boxes.const_data_ptr<scalar_t>(), cat, B, N,
                                                                       comp.mutable_data_ptr<scalar_t>());
    FASTDET_CUDA_LAUNCH_CHECK();
    decay_kernel<scalar_t><<<grid, kBlockThreads, 0, stream>>>(boxes.const_data_ptr<scalar_t>(), cat,
                                                                comp.const_data_ptr<scalar_t>(), B, N, kernel,
                                                                static_cast<scalar_t>(-sigma),
                                                                decay.mutable_data_ptr<scalar_t>());
    FASTDET_CUDA_LAUNCH_CHECK();
  });
  return decay;
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_IMPL(fastdet, CUDA, m) {
  m.impl("_matrix_nms_kernel", TORCH_BOX(&fastdet::matrix_nms_kernel_cuda));
}
