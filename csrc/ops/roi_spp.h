#pragma once
// roi_spp (SPP-Net's spatial pyramid pooling over RoIs). The schema file roi_spp.cpp checks the arguments once and
// calls the per-backend kernels
//   _roi_spp_kernel(input [N, C, H, W], rois [K, 5], levels, spatial_scale, channels_last)
//       -> (output [K, C * B] in input's dtype, argmax int32 [K, C, B])
//   _roi_spp_backward_kernel(grad [K, C * B], rois, argmax [K, C, B], levels, ...)
//       -> [N, C, H, W] in the accumulation dtype, in the input's memory format
// with B = sum(l * l) and the layout of roi_spp_math.h. Kernels receive prepared arguments: rois contiguous in the
// accumulation dtype, batch indices valid on the CPU, levels validated (1 to spp::kMaxLevels positive sizes, at most
// spp::kMaxBins bins), the plane size below 2^31; feature maps and grads are read through their strides.
#include <vector>

#include "ops/roi_spp_math.h"
#include "ops/stable.h"

namespace fastdet {
namespace spp {

// The level table of validated levels.
inline Levels make_levels(const std::vector<int64_t>& levels) {
  Levels lv{};
  lv.count = static_cast<int32_t>(levels.size());
  lv.offset[0] = 0;
  for (size_t j = 0; j < levels.size(); ++j) {
    lv.size[j] = static_cast<int32_t>(levels[j]);
    lv.offset[j + 1] = lv.offset[j] + static_cast<int32_t>(levels[j] * levels[j]);
  }
  return lv;
}

}  // namespace spp
}  // namespace fastdet
