#pragma once
// The RoI ops (roi_align, multi_scale_roi_align, roi_pool). Public ops (schema files roi_align.cpp, roi_pool.cpp)
// check their arguments once and call the per-backend kernels
//   _roi_align_kernel(features [L x [N, C, H_l, W_l]], rois [K, 5], levels [K] or None, spatial_scales [L], ...)
//       -> [K, C, PH, PW]
//   _roi_align_backward_kernel(grad [K, C, PH, PW], rois, levels or None, spatial_scales, ...)
//       -> L x [N, C, H_l, W_l] in the accumulation dtype
//   _roi_pool_kernel(input [N, C, H, W], rois [K, 5], ...) -> ([K, C, PH, PW], argmax int32 [K, C, PH, PW])
//   _roi_pool_backward_kernel(grad [K, C, PH, PW], rois, argmax, ...) -> [N, C, H, W] in the accumulation dtype
// A single-level roi_align is a one-level multi-scale call (levels None). The kernels receive prepared tensors: every
// tensor on one device; rois contiguous in the accumulation dtype (accumulation_type of the feature dtype); levels
// contiguous int64 with values in [0, L) and batch indices valid on the CPU (checked by the schema files; the CUDA
// kernels pool a RoI with an invalid batch index or level to 0 instead, which needs no host synchronisation); 1 to
// roi::kMaxLevels levels of equal N, C and dtype; grad shaped [K, C, PH, PW] in the feature dtype. Kernels read
// features and grads through their strides, so any layout (contiguous, channels-last, sliced) is pooled without a
// copy; outputs and input gradients are allocated channels-last when the schema file says so (channels_last).
#include "ops/stable.h"

namespace fastdet {

// A new tensor on like's device, in the channels-last or the contiguous memory format.
inline Tensor roi_empty(IntArrayRef size, ScalarType dtype, const Tensor& like, bool channels_last) {
  using MemoryLayout = torch::headeronly::MemoryFormat;
  return torch::stable::empty(size, dtype, std::nullopt, like.device(), std::nullopt,
                              channels_last ? MemoryLayout::ChannelsLast : MemoryLayout::Contiguous);
}

// The same, filled with zeros (a zero-filled aten::zeros would ignore the memory format).
inline Tensor roi_zeros(IntArrayRef size, ScalarType dtype, const Tensor& like, bool channels_last) {
  Tensor t = roi_empty(size, dtype, like, channels_last);
  torch::stable::zero_(t);
  return t;
}

// ---------------------------------------------------------------------------------------------------------------------
// Argument checks shared by the schema files roi_align.cpp and roi_pool.cpp (defined in roi_align.cpp; the kernels
// never call them).

// Channels-last when the feature map is laid out that way (and not also plain contiguous, e.g. C == 1): torch's
// is_contiguous(memory_format=torch.channels_last) test for a 4-d tensor.
bool roi_channels_last(const Tensor& feature);

// feature must be a floating [N, C, H, W] tensor.
void check_roi_feature(const Tensor& feature, const char* name);

// rois must be a floating [K, 5] tensor (batch index, x1, y1, x2, y2) on feature's device. Returns it contiguous in
// the accumulation dtype of `acc_of` (boxes of any floating dtype are accepted and read in that precision).
Tensor prepare_rois(const Tensor& rois, const Tensor& feature, const char* feature_name, ScalarType acc_of);

void check_output_size(int64_t pooled_height, int64_t pooled_width);
void check_spatial_scale(double spatial_scale, const char* name);
void check_sampling_ratio(int64_t sampling_ratio);

// batch_size, channels and the map sizes given to a backward op must be non-negative.
void check_map_size(int64_t value, const char* name);

// The grad of a RoI op's output: floating [K, C, PH, PW] on rois' device.
void check_roi_grad(const Tensor& grad, const Tensor& rois, int64_t channels, int64_t pooled_height,
                    int64_t pooled_width);

// On the CPU, every batch index of the prepared rois (contiguous, accumulation dtype) must lie in [0, N) after
// truncation towards zero (on CUDA this would need a host synchronisation; the kernels pool such RoIs to 0 instead).
void check_batch_indices_on_cpu(const Tensor& rois, int64_t batch_size);

}  // namespace fastdet
