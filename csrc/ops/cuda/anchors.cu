// CUDA kernels of the grid generators. One thread per output row in a grid-stride loop; the level table travels by
// value in the kernel parameters (anchors::Levels, < 1 KB), so a call is one launch with no host-to-device copy and
// no synchronisation. Each row is computed by the same anchors::*_row function as on the CPU, so both backends give
// the same bits (the formulas involve only single conversions and one add or multiply per operation, none of which
// nvcc can contract into a fused multiply-add that would change the rounding).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

#include "ops/anchors.h"

namespace fastdet {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;  // grid-stride beyond this; plenty to fill any current GPU

unsigned int blocks_for(int64_t rows) {
  const int64_t wanted = (rows + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(wanted < 1 ? 1 : (wanted > kMaxBlocks ? kMaxBlocks : wanted));
}

template <typename T>
__global__ void grid_anchors_kernel(const anchors::Levels lv, const T* __restrict__ cells, double offset, int64_t N,
                                    T* __restrict__ out) {
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; n < N;
       n += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    anchors::grid_anchor_row<T>(lv, cells, offset, anchors::locate(lv, n), out + n * 4);
  }
}

template <typename T, typename O>
__global__ void ssd_default_boxes_kernel(const anchors::Levels lv, const float* __restrict__ wh, O image_w, O image_h,
                                         int64_t N, O* __restrict__ out) {
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; n < N;
       n += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    anchors::ssd_default_box_row<T, O>(lv, wh, image_w, image_h, anchors::locate(lv, n), out + n * 4);
  }
}

template <typename T>
__global__ void grid_priors_kernel(const anchors::Levels lv, const double* __restrict__ wh, double offset, bool xyxy,
                                   int64_t N, T* __restrict__ out) {
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; n < N;
       n += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    anchors::grid_prior_row<T>(lv, wh, offset, xyxy, anchors::locate(lv, n), out + n * 4);
  }
}

at::Tensor grid_anchors_cuda(const at::Tensor& cell_anchors, c10::IntArrayRef anchors_per_level,
                             c10::IntArrayRef grid_sizes, c10::ArrayRef<double> strides, double offset) {
  const auto lv = anchors::check_grid_anchors_args(cell_anchors, anchors_per_level, grid_sizes, strides, offset);
  const c10::cuda::CUDAGuard device_guard(cell_anchors.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t N = lv.start[lv.num_levels];
  auto table = cell_anchors.contiguous();
  auto out = at::empty({N, 4}, table.options());
  if (N == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "grid_anchors_cuda", [&] {
    grid_anchors_kernel<scalar_t><<<blocks_for(N), kThreads, 0, stream>>>(
        lv, table.const_data_ptr<scalar_t>(), offset, N, out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor ssd_default_boxes_cuda(const at::Tensor& wh_pairs, c10::IntArrayRef boxes_per_level,
                                  c10::IntArrayRef grid_sizes, c10::ArrayRef<double> divisors,
                                  c10::IntArrayRef image_size, at::ScalarType dtype) {
  const auto lv =
      anchors::check_ssd_default_boxes_args(wh_pairs, boxes_per_level, grid_sizes, divisors, image_size, dtype);
  const c10::cuda::CUDAGuard device_guard(wh_pairs.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t N = lv.start[lv.num_levels];
  auto table = wh_pairs.contiguous();
  const auto out_dtype = anchors::ssd_output_dtype(dtype);
  auto out = at::empty({N, 4}, table.options().dtype(out_dtype));
  if (N == 0) {
    return out;
  }
  const float* wh = table.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "ssd_default_boxes_cuda", [&] {
    using T = scalar_t;
    auto launch = [&](auto* dst) {
      using O = std::remove_pointer_t<decltype(dst)>;
      ssd_default_boxes_kernel<T, O><<<blocks_for(N), kThreads, 0, stream>>>(
          lv, wh, static_cast<O>(image_size[1]), static_cast<O>(image_size[0]), N, dst);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (out_dtype == at::kDouble) {
      launch(out.mutable_data_ptr<double>());
    } else {
      launch(out.mutable_data_ptr<float>());
    }
  });
  return out;
}

at::Tensor grid_priors_cuda(const at::Tensor& wh, c10::IntArrayRef priors_per_level, c10::IntArrayRef grid_sizes,
                            c10::ArrayRef<double> strides, double offset, bool xyxy, at::ScalarType dtype) {
  const auto lv = anchors::check_grid_priors_args(wh, priors_per_level, grid_sizes, strides, offset, dtype);
  const c10::cuda::CUDAGuard device_guard(wh.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t N = lv.start[lv.num_levels];
  auto table = wh.contiguous();
  auto out = at::empty({N, 4}, table.options().dtype(dtype));
  if (N == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "grid_priors_cuda", [&] {
    grid_priors_kernel<scalar_t><<<blocks_for(N), kThreads, 0, stream>>>(
        lv, table.const_data_ptr<double>(), offset, xyxy, N, out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace fastdet

TORCH_LIBRARY_IMPL(fastdet, CUDA, m) {
  m.impl("grid_anchors", &fastdet::grid_anchors_cuda);
  m.impl("ssd_default_boxes", &fastdet::ssd_default_boxes_cuda);
  m.impl("grid_priors", &fastdet::grid_priors_cuda);
}
