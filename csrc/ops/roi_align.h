#pragma once
// Argument checks and shared helpers of the RoI ops (roi_align, multi_scale_roi_align, roi_pool), used by every
// backend. Kernels read features through their strides, so any layout (contiguous, channels-last, sliced) is pooled
// without a copy; outputs and input gradients are allocated in the feature's suggested memory format.
#include <ATen/core/Tensor.h>

#include <vector>

namespace fastdet {

// float32 for float16/bfloat16/float32 features, float64 for float64: the precision of coordinates, weights and sums.
at::ScalarType roi_acc_type(at::ScalarType feature);

// Channels-last when the feature map is laid out that way (and not also plain contiguous, e.g. C == 1).
at::MemoryFormat roi_memory_format(const at::Tensor& feature);

// feature must be a floating [N, C, H, W] tensor.
void check_roi_feature(const at::Tensor& feature, const char* name);

// rois must be a floating [K, 5] tensor (batch index, x1, y1, x2, y2) on feature's device. Returns it contiguous in
// the accumulation dtype (boxes of any floating dtype are accepted and read in that precision).
at::Tensor prepare_rois(const at::Tensor& rois, const at::Tensor& feature);

void check_output_size(int64_t pooled_height, int64_t pooled_width);
void check_spatial_scale(double spatial_scale, const char* name);

// Checks the per-level arguments of multi_scale_roi_align: 1..kMaxLevels levels, equal N, C, dtype and device; levels
// an int64 [K] tensor on that device. Returns levels contiguous.
at::Tensor check_multi_scale_args(const std::vector<at::Tensor>& features, const at::Tensor& rois,
                                  const at::Tensor& levels, const std::vector<double>& spatial_scales);

// The grad of a RoI op's output: [K, C, PH, PW] on rois' device, floating.
void check_roi_grad(const at::Tensor& grad, const at::Tensor& rois, int64_t channels, int64_t pooled_height,
                    int64_t pooled_width);

}  // namespace fastdet
