// CUDA kernel of box_iou_rotated. Every pair is evaluated by the same rotated::iou as the CPU kernel, in the
// computation dtype (float or double); results agree with the CPU to rounding (the device's sin/cos round differently).
//
// Threads along x own consecutive columns j (coalesced float32 stores) and prepare their boxes2 box once; a tile of
// boxes1 rows is prepared into shared memory and read as broadcasts. Batches, row tiles and column tiles are
// grid-stride loops, so grids stay within the hardware limits for any size, and all offsets are 64-bit.
#include <algorithm>
#include <cstdint>

#include "ops/cuda/cuda_utils.cuh"
#include "ops/rotated.h"
#include "ops/rotated_math.h"

namespace fastdet {
namespace {

constexpr int kThreads = 256;
constexpr int kRows = 32;
constexpr int64_t kMaxGridX = 1 << 30;
constexpr int64_t kMaxGridYZ = 65535;

template <typename T>
__device__ inline rotated::Rect<T> load_rect(const T* p) {
  return rotated::make_rect<T>(p[0], p[1], p[2], p[3], p[4]);
}

template <typename T>
__global__ void box_iou_rotated_kernel(const T* __restrict__ boxes1, const T* __restrict__ boxes2,
                                       float* __restrict__ out, int64_t B, int64_t N, int64_t M) {
  __shared__ rotated::Rect<T> rows[kRows];
  const int64_t col_tiles = (M + kThreads - 1) / kThreads;
  const int64_t row_tiles = (N + kRows - 1) / kRows;
  // Loop bounds depend only on block indices, so every thread of the block reaches every __syncthreads().
  for (int64_t b = blockIdx.z; b < B; b += gridDim.z) {
    for (int64_t ct = blockIdx.x; ct < col_tiles; ct += gridDim.x) {
      const int64_t j = ct * kThreads + threadIdx.x;
      const bool active = j < M;
      rotated::Rect<T> col{};
      if (active) col = load_rect(boxes2 + (b * M + j) * 5);
      for (int64_t rt = blockIdx.y; rt < row_tiles; rt += gridDim.y) {
        const int64_t i0 = rt * kRows;
        const int rows_here = static_cast<int>(N - i0 < kRows ? N - i0 : kRows);
        __syncthreads();  // the previous tile's rows are no longer read
        if (threadIdx.x < rows_here) rows[threadIdx.x] = load_rect(boxes1 + (b * N + i0 + threadIdx.x) * 5);
        __syncthreads();
        if (active) {
          float* dst = out + (b * N + i0) * M + j;
          for (int r = 0; r < rows_here; ++r) {
            dst[r * M] = static_cast<float>(rotated::iou<T>(rows[r], col));
          }
        }
      }
    }
  }
}

// boxes1 [B, N, 5], boxes2 [B, M, 5]: contiguous, float32 or float64 (prepared by box_iou_rotated.cpp).
Tensor box_iou_rotated_cuda(const Tensor& boxes1, const Tensor& boxes2) {
  const DeviceGuard device_guard(boxes1.get_device_index());
  const int64_t B = boxes1.size(0), N = boxes1.size(1), M = boxes2.size(1);
  auto out = aten::empty({B, N, M}, kFloat, boxes1);
  if (out.numel() == 0) {
    return out;
  }
  const cudaStream_t stream = current_stream(boxes1);
  const dim3 grid(static_cast<unsigned int>(std::min<int64_t>((M + kThreads - 1) / kThreads, kMaxGridX)),
                  static_cast<unsigned int>(std::min<int64_t>((N + kRows - 1) / kRows, kMaxGridYZ)),
                  static_cast<unsigned int>(std::min<int64_t>(B, kMaxGridYZ)));
  FASTDET_DISPATCH_FLOAT_DOUBLE(boxes1.scalar_type(), "box_iou_rotated", [&] {
    box_iou_rotated_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        boxes1.const_data_ptr<scalar_t>(), boxes2.const_data_ptr<scalar_t>(), out.mutable_data_ptr<float>(), B, N, M);
    FASTDET_CUDA_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_IMPL(fastdet, CUDA, m) {
  m.impl("_box_iou_rotated_kernel", TORCH_BOX(&fastdet::box_iou_rotated_cuda));
}
