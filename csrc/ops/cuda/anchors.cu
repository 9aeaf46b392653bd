// CUDA kernels of the grid generators. One thread per output row in a grid-stride loop; the level table travels by
// value in the kernel parameters (anchors::Levels, < 1 KB), so a call is one launch with no host-to-device copy and
// no synchronisation. Each row is computed by the same anchors::*_row function as on the CPU, so both backends give
// the same bits (the formulas involve only single conversions and one add or multiply per operation, none of which
// nvcc can contract into a fused multiply-add that would change the rounding).
//
// The launchers receive prepared arguments (see anchors.h): a contiguous cell table and a validated level description.
#include <cstdint>
#include <type_traits>

#include "ops/anchors.h"
#include "ops/cuda/cuda_utils.cuh"

namespace fastdet {
namespace {

using DoubleArrayRef = torch::headeronly::HeaderOnlyArrayRef<double>;

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

Tensor grid_anchors_cuda(const Tensor& table, IntArrayRef anchors_per_level, IntArrayRef grid_sizes,
                         DoubleArrayRef strides, double offset) {
  const auto lv = anchors::build_levels(anchors_per_level, grid_sizes, strides);
  const DeviceGuard device_guard(table.get_device_index());
  const cudaStream_t stream = current_stream(table);
  const int64_t N = lv.start[lv.num_levels];
  auto out = aten::empty({N, 4}, table.scalar_type(), table);
  if (N == 0) {
    return out;
  }
  FASTDET_DISPATCH_FLOATING(out.scalar_type(), "grid_anchors_cuda", [&] {
    grid_anchors_kernel<scalar_t><<<blocks_for(N), kBlockThreads, 0, stream>>>(
        lv, table.const_data_ptr<scalar_t>(), offset, N, out.mutable_data_ptr<scalar_t>());
    FASTDET_CUDA_LAUNCH_CHECK();
  });
  return out;
}

Tensor ssd_default_boxes_cuda(const Tensor& table, IntArrayRef boxes_per_level, IntArrayRef grid_sizes,
                              DoubleArrayRef divisors, IntArrayRef image_size, ScalarType dtype) {
  const auto lv = anchors::build_levels(boxes_per_level, grid_sizes, divisors);
  const DeviceGuard device_guard(table.get_device_index());
  const cudaStream_t stream = current_stream(table);
  const int64_t N = lv.start[lv.num_levels];
  const auto out_dtype = anchors::ssd_output_dtype(dtype);
  auto out = aten::empty({N, 4}, out_dtype, table);
  if (N == 0) {
    return out;
  }
  const float* wh = table.const_data_ptr<float>();
  FASTDET_DISPATCH_FLOATING(dtype, "ssd_default_boxes_cuda", [&] {
    using T = scalar_t;
    auto launch = [&](auto* dst) {
      using O = std::remove_pointer_t<decltype(dst)>;
      ssd_default_boxes_kernel<T, O><<<blocks_for(N), kBlockThreads, 0, stream>>>(
          lv, wh, static_cast<O>(image_size[1]), static_cast<O>(image_size[0]), N, dst);
      FASTDET_CUDA_LAUNCH_CHECK();
    };
    if (out_dtype == kDouble) {
      launch(out.mutable_data_ptr<double>());
    } else {
      launch(out.mutable_data_ptr<float>());
    }
  });
  return out;
}

Tensor grid_priors_cuda(const Tensor& table, IntArrayRef priors_per_level, IntArrayRef grid_sizes,
                        DoubleArrayRef strides, double offset, bool xyxy, ScalarType dtype) {
  const auto lv = anchors::build_levels(priors_per_level, grid_sizes, strides);
  const DeviceGuard device_guard(table.get_device_index());
  const cudaStream_t stream = current_stream(table);
  const int64_t N = lv.start[lv.num_levels];
  auto out = aten::empty({N, 4}, dtype, table);
  if (N == 0) {
    return out;
  }
  FASTDET_DISPATCH_FLOATING(out.scalar_type(), "grid_priors_cuda", [&] {
    grid_priors_kernel<scalar_t><<<blocks_for(N), kBlockThreads, 0, stream>>>(
        lv, table.const_data_ptr<double>(), offset, xyxy, N, out.mutable_data_ptr<scalar_t>());
    FASTDET_CUDA_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_IMPL(fastdet, CUDA, m) {
  m.impl("_grid_anchors_kernel", TORCH_BOX(&fastdet::grid_anchors_cuda));
  m.impl("_ssd_default_boxes_kernel", TORCH_BOX(&fastdet::ssd_default_boxes_cuda));
  m.impl("_grid_priors_kernel", TORCH_BOX(&fastdet::grid_priors_cuda));
}
