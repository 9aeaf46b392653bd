// Schemas of roi_align and multi_scale_roi_align (forward and registered backward ops), and the argument checks every
// backend shares. Numerics live in roi_align_math.h.
#include "ops/roi_align.h"

#include <torch/library.h>

#include <cmath>

#include "ops/checks.h"
#include "ops/roi_align_math.h"

namespace fastdet {

at::ScalarType roi_acc_type(at::ScalarType feature) {
  return feature == at::kDouble ? at::kDouble : at::kFloat;
}

at::MemoryFormat roi_memory_format(const at::Tensor& feature) {
  if (feature.dim() == 4 && !feature.is_contiguous() && feature.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

void check_roi_feature(const at::Tensor& feature, const char* name) {
  check_floating(feature, name);
  TORCH_CHECK(feature.dim() == 4, name, " must have shape [N, C, H, W], got ", feature.sizes());
}

at::Tensor prepare_rois(const at::Tensor& rois, const at::Tensor& feature) {
  check_floating(rois, "rois");
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5, "rois must have shape [K, 5] (batch index, x1, y1, x2, y2), got ",
              rois.sizes());
  check_same_device(feature, "input", rois, "rois");
  return rois.to(roi_acc_type(feature.scalar_type())).contiguous();
}

void check_output_size(int64_t pooled_height, int64_t pooled_width) {
  TORCH_CHECK(pooled_height > 0 && pooled_width > 0, "output_size must be positive (pooled_height, pooled_width), got (",
              pooled_height, ", ", pooled_width, ")");
}

void check_spatial_scale(double spatial_scale, const char* name) {
  TORCH_CHECK(std::isfinite(spatial_scale) && spatial_scale > 0.0, name, " must be a positive finite number, got ",
              spatial_scale);
}

at::Tensor check_multi_scale_args(const std::vector<at::Tensor>& features, const at::Tensor& rois,
                                  const at::Tensor& levels, const std::vector<double>& spatial_scales) {
  const auto L = static_cast<int64_t>(features.size());
  TORCH_CHECK(L >= 1 && L <= roi::kMaxLevels, "features must hold 1 to ", roi::kMaxLevels, " levels, got ", L);
  TORCH_CHECK(static_cast<int64_t>(spatial_scales.size()) == L, "spatial_scales must have one entry per level (", L,
              "), got ", spatial_scales.size());
  for (int64_t l = 0; l < L; ++l) {
    check_roi_feature(features[l], "features[l]");
    check_spatial_scale(spatial_scales[l], "spatial_scales[l]");
    TORCH_CHECK(features[l].size(0) == features[0].size(0) && features[l].size(1) == features[0].size(1),
                "all feature levels must have the same batch size and channels, got ", features[0].sizes(), " and ",
                features[l].sizes(), " (level ", l, ")");
    check_same_dtype(features[0], "features[0]", features[l], "features[l]");
    check_same_device(features[0], "features[0]", features[l], "features[l]");
  }
  TORCH_CHECK(levels.scalar_type() == at::kLong, "levels must be an int64 tensor, got ", levels.scalar_type());
  TORCH_CHECK(levels.dim() == 1 && levels.size(0) == rois.size(0), "levels must have shape [K] = [", rois.size(0),
              "], got ", levels.sizes());
  check_same_device(features[0], "features", levels, "levels");
  return levels.contiguous();
}

void check_roi_grad(const at::Tensor& grad, const at::Tensor& rois, int64_t channels, int64_t pooled_height,
                    int64_t pooled_width) {
  check_floating(grad, "grad");
  check_same_device(grad, "grad", rois, "rois");
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == rois.size(0) && grad.size(1) == channels &&
                  grad.size(2) == pooled_height && grad.size(3) == pooled_width,
              "grad must have shape [K, C, pooled_height, pooled_width] = [", rois.size(0), ", ", channels, ", ",
              pooled_height, ", ", pooled_width, "], got ", grad.sizes());
}

}  // namespace fastdet

TORCH_LIBRARY_FRAGMENT(fastdet, m) {
  // rois: [K, 5] (batch index, x1, y1, x2, y2). Output [K, C, pooled_height, pooled_width] in input's dtype and
  // memory format.
  m.def("roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
        "int sampling_ratio, bool aligned) -> Tensor");
  // Gradient with respect to input only (boxes get none, as in torchvision). channels_last selects the layout of the
  // returned gradient, which the op cannot otherwise know because the input itself is not saved.
  m.def("_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, int sampling_ratio, "
        "bool aligned, bool channels_last) -> Tensor");
  // One pass over all RoIs of all levels: RoI k is pooled from features[levels[k]] with spatial_scales[levels[k]].
  m.def("multi_scale_roi_align(Tensor[] features, Tensor rois, Tensor levels, float[] spatial_scales, "
        "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor");
  m.def("_multi_scale_roi_align_backward(Tensor grad, Tensor rois, Tensor levels, float[] spatial_scales, "
        "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt[] heights, "
        "SymInt[] widths, int sampling_ratio, bool aligned, bool channels_last) -> Tensor[]");
}
