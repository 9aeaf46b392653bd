// Schema of roi_spp (SPP-Net spatial pyramid pooling over RoIs) and its registered backward op: argument checks and
// layout decisions, written once for every backend. The kernels (cpu/roi_spp.cpp, cuda/roi_spp.cu) receive prepared
// tensors only; the layout and per-bin math live in roi_spp_math.h, the bin geometry is roi_pool's (roi_pool.h).
#include "ops/roi_spp.h"

#include <climits>
#include <cstdint>
#include <tuple>
#include <vector>

#include "ops/checks.h"
#include "ops/roi_align.h"

namespace fastdet {
namespace {

// levels: 1 to spp::kMaxLevels positive sizes with at most spp::kMaxBins bins in all (the work and the output width
// grow with sum(l * l), so the pyramid is bounded).
void check_levels(const std::vector<int64_t>& levels) {
  FASTDET_CHECK(!levels.empty() && static_cast<int64_t>(levels.size()) <= spp::kMaxLevels,
                "levels must hold 1 to ", spp::kMaxLevels, " pyramid levels, got ", levels.size());
  int64_t bins = 0;
  for (size_t j = 0; j < levels.size(); ++j) {
    FASTDET_CHECK(levels[j] > 0 && levels[j] <= 64, "levels[", j, "] must be a positive number of bins per side (at ",
                  "most 64), got ", levels[j]);
    bins += levels[j] * levels[j];
  }
  FASTDET_CHECK(bins <= spp::kMaxBins, "levels must have at most ", spp::kMaxBins,
                " bins in all (sum of l * l over the levels), got ", bins);
}

int64_t total_bins(const std::vector<int64_t>& levels) {
  int64_t bins = 0;
  for (const int64_t l : levels) bins += l * l;
  return bins;
}

void check_plane(int64_t H, int64_t W) {
  FASTDET_CHECK(H * W <= INT32_MAX, "roi_spp: feature planes of more than 2^31 - 1 pixels are not supported (argmax ",
                "is an int32 index inside the plane, as roi_pool's), got ", H, " x ", W);
}

std::tuple<Tensor, Tensor> roi_spp(const Tensor& input, const Tensor& rois, const std::vector<int64_t>& levels,
                                   double spatial_scale) {
  check_roi_feature(input, "input");
  check_levels(levels);
  check_spatial_scale(spatial_scale, "spatial_scale");
  const auto r = prepare_rois(rois, input, "input", input.scalar_type());
  check_plane(input.size(2), input.size(3));
  check_batch_indices_on_cpu(r, input.size(0));
  return call_op<std::tuple<Tensor, Tensor>>("fastdet::_roi_spp_kernel", input, r, levels, spatial_scale,
                                             roi_channels_last(input));
}

Tensor roi_spp_backward(const Tensor& grad, const Tensor& rois, const Tensor& argmax,
                        const std::vector<int64_t>& levels, double spatial_scale, int64_t N, int64_t C, int64_t H,
                        int64_t W, bool channels_last, bool deterministic) {
  check_levels(levels);
  check_spatial_scale(spatial_scale, "spatial_scale");
  check_map_size(N, "batch_size");
  check_map_size(C, "channels");
  check_map_size(H, "height");
  check_map_size(W, "width");
  check_plane(H, W);
  check_floating(grad, "grad");
  const auto r = prepare_rois(rois, grad, "grad", grad.scalar_type());
  const int64_t K = r.size(0), B = total_bins(levels);
  FASTDET_CHECK(grad.dim() == 2 && grad.size(0) == K && grad.size(1) == C * B,
                "grad must have shape [K, C * sum(l * l)] = [", K, ", ", C * B, "], got ", shape_of(grad));
  FASTDET_CHECK(argmax.scalar_type() == kInt && argmax.dim() == 3 && argmax.size(0) == K && argmax.size(1) == C &&
                    argmax.size(2) == B,
                "argmax must be an int32 tensor of shape [K, C, sum(l * l)] = [", K, ", ", C, ", ", B, "], got ",
                argmax.scalar_type(), " ", shape_of(argmax));
  check_same_device(grad, "grad", argmax, "argmax");
  check_batch_indices_on_cpu(r, N);
  auto buf = call_op<Tensor>("fastdet::_roi_spp_backward_kernel", grad, r, argmax, levels, spatial_scale, N, C, H, W,
                             channels_last, deterministic);
  return aten::to(buf, grad.scalar_type());
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_FRAGMENT(fastdet, m) {
  // Returns (output [K, C * B] in input's dtype, argmax [K, C, B] int32), B = sum(l * l); layout in roi_spp_math.h.
  m.def("roi_spp(Tensor input, Tensor rois, int[] levels, float spatial_scale) -> (Tensor, Tensor)");
  // The input gradient [N, C, H, W] in grad's dtype and the input's memory format (channels_last). deterministic
  // selects the CUDA gather kernel (fastdet.ops.roi_spp passes torch.are_deterministic_algorithms_enabled()); the CPU
  // kernel always is.
  m.def("_roi_spp_backward(Tensor grad, Tensor rois, Tensor argmax, int[] levels, float spatial_scale, "
        "SymInt batch_size, SymInt channels, SymInt height, SymInt width, bool channels_last, "
        "bool deterministic=False) -> Tensor");

  // Per-backend kernels (prepared arguments only, see roi_spp.h).
  m.def("_roi_spp_kernel(Tensor input, Tensor rois, int[] levels, float spatial_scale, bool channels_last) "
        "-> (Tensor, Tensor)");
  m.def("_roi_spp_backward_kernel(Tensor grad, Tensor rois, Tensor argmax, int[] levels, float spatial_scale, "
        "int batch_size, int channels, int height, int width, bool channels_last, bool deterministic) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(fastdet, CompositeExplicitAutograd, m) {
  m.impl("roi_spp", TORCH_BOX(&fastdet::roi_spp));
  m.impl("_roi_spp_backward", TORCH_BOX(&fastdet::roi_spp_backward));
}
