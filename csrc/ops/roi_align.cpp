// Schema of roi_align and multi_scale_roi_align (forward and registered backward ops): argument checks and layout
// decisions, written once for every backend, and the checks roi_pool.cpp shares (roi_align.h). The kernels
// (cpu/roi_align.cpp, cuda/roi_align.cu) receive prepared tensors only; numerics live in roi_align_math.h.
#include "ops/roi_align.h"

#include <cmath>
#include <optional>
#include <utility>
#include <vector>

#include "ops/checks.h"
#include "ops/roi_align_math.h"

namespace fastdet {

// ---------------------------------------------------------------------------------------------------------------------
// Shared checks (declared in roi_align.h)

bool roi_channels_last(const Tensor& feature) {
  if (feature.dim() != 4 || feature.is_contiguous()) {
    return false;
  }
  // torch's channels-last contiguity of a 4-d tensor: dims C, W, H, N from the innermost out, size-1 dims skipped.
  int64_t expected = 1;
  for (const int64_t d : {1, 3, 2, 0}) {
    const int64_t size = feature.size(d);
    if (size != 1) {
      if (feature.stride(d) != expected) {
        return false;
      }
      expected *= size;
    }
  }
  return true;
}

void check_roi_feature(const Tensor& feature, const char* name) {
  check_floating(feature, name);
  FASTDET_CHECK(feature.dim() == 4, name, " must have shape [N, C, H, W], got ", shape_of(feature));
}

Tensor prepare_rois(const Tensor& rois, const Tensor& feature, const char* feature_name, ScalarType acc_of) {
  check_floating(rois, "rois");
  FASTDET_CHECK(rois.dim() == 2 && rois.size(1) == 5,
                "rois must have shape [K, 5] (batch index, x1, y1, x2, y2), got ", shape_of(rois));
  check_same_device(feature, feature_name, rois, "rois");
  return aten::contiguous(aten::to(rois, accumulation_type(acc_of)));
}

void check_output_size(int64_t pooled_height, int64_t pooled_width) {
  FASTDET_CHECK(pooled_height > 0 && pooled_width > 0,
                "output_size must be positive (pooled_height, pooled_width), got (", pooled_height, ", ", pooled_width,
                ")");
}

void check_spatial_scale(double spatial_scale, const char* name) {
  FASTDET_CHECK(std::isfinite(spatial_scale) && spatial_scale > 0.0, name, " must be a positive finite number, got ",
                spatial_scale);
}

// An explicit sampling_ratio s costs s^2 bilinear samples per output element (those certainly off the map are skipped,
// but a box on the map has all of them), so it is bounded: 64 per axis, i.e. at most 4096 samples per bin -- what the
// adaptive grid takes for a bin 64 pixels on a side; practical values are 0 (adaptive) to 8. (1024 would still allow
// ~2^20 samples per output element: minutes for one 7 x 7 RoI of a 256-channel map.) The adaptive grid
// (sampling_ratio <= 0) is ceil(bin size) per axis, about one sample per pixel of the box, and only the samples within
// one pixel of the map are visited: its cost is bounded by the map size however large the box is (its grid is
// clamped to roi::kMaxGrid per axis only to keep the sample count in range).
constexpr int64_t kMaxSamplingRatio = 64;

void check_sampling_ratio(int64_t sampling_ratio) {
  FASTDET_CHECK(sampling_ratio <= kMaxSamplingRatio, "sampling_ratio must be at most ", kMaxSamplingRatio,
                " samples per bin and axis (<= 0 is adaptive), got ", sampling_ratio);
}

void check_map_size(int64_t value, const char* name) {
  FASTDET_CHECK(value >= 0, name, " must be non-negative, got ", value);
}

void check_roi_grad(const Tensor& grad, const Tensor& rois, int64_t channels, int64_t pooled_height,
                    int64_t pooled_width) {
  check_floating(grad, "grad");
  check_same_device(grad, "grad", rois, "rois");
  FASTDET_CHECK(grad.dim() == 4 && grad.size(0) == rois.size(0) && grad.size(1) == channels &&
                    grad.size(2) == pooled_height && grad.size(3) == pooled_width,
                "grad must have shape [K, C, pooled_height, pooled_width] = [", rois.size(0), ", ", channels, ", ",
                pooled_height, ", ", pooled_width, "], got ", shape_of(grad));
}

void check_batch_indices_on_cpu(const Tensor& rois, int64_t batch_size) {
  if (!rois.is_cpu()) {
    return;
  }
  const int64_t K = rois.size(0);
  FASTDET_DISPATCH_FLOAT_DOUBLE(rois.scalar_type(), "roi_batch_index", [&] {
    const scalar_t* r = rois.const_data_ptr<scalar_t>();
    for (int64_t k = 0; k < K; ++k) {
      FASTDET_CHECK(roi::batch_index(r[k * 5], batch_size) >= 0, "rois[", k, ", 0] = ", r[k * 5],
                    " is not a valid batch index for an input of batch size ", batch_size,
                    " (expected a value in [0, ", batch_size, "))");
    }
  });
}

namespace {

// ---------------------------------------------------------------------------------------------------------------------
// roi_align-only checks

// levels: int64 [K] on the features' device; on the CPU every value in [0, L) (on CUDA an out-of-range level pools
// 0, as an invalid batch index does). Returns it contiguous.
Tensor prepare_levels(const Tensor& levels, const Tensor& rois, const Tensor& feature, int64_t L) {
  FASTDET_CHECK(levels.scalar_type() == kLong, "levels must be an int64 tensor, got ", levels.scalar_type());
  FASTDET_CHECK(levels.dim() == 1 && levels.size(0) == rois.size(0), "levels must have shape [K] = [", rois.size(0),
                "], got ", shape_of(levels));
  check_same_device(feature, "features", levels, "levels");
  auto lv = aten::contiguous(levels);
  if (lv.is_cpu()) {
    const int64_t* p = lv.const_data_ptr<int64_t>();
    for (int64_t k = 0; k < lv.size(0); ++k) {
      FASTDET_CHECK(p[k] >= 0 && p[k] < L, "levels[", k, "] = ", p[k], " is not a valid level (expected [0, ", L,
                    "))");
    }
  }
  return lv;
}

void check_level_count(int64_t L, size_t entries, const char* name) {
  FASTDET_CHECK(static_cast<int64_t>(entries) == L, name, " must have one entry per level (", L, "), got ", entries);
}

// ---------------------------------------------------------------------------------------------------------------------
// Public ops

Tensor roi_align(const Tensor& input, const Tensor& rois, double spatial_scale, int64_t PH, int64_t PW,
                 int64_t sampling_ratio, bool aligned) {
  check_roi_feature(input, "input");
  check_output_size(PH, PW);
  check_spatial_scale(spatial_scale, "spatial_scale");
  check_sampling_ratio(sampling_ratio);
  const auto r = prepare_rois(rois, input, "input", input.scalar_type());
  check_batch_indices_on_cpu(r, input.size(0));
  return call_op<Tensor>("fastdet::_roi_align_kernel", std::vector<Tensor>{input}, r, std::optional<Tensor>(),
                         std::vector<double>{spatial_scale}, PH, PW, sampling_ratio, aligned,
                         roi_channels_last(input));
}

// The gradient comes back from the kernel in the accumulation dtype; one cast per level to grad's dtype.
std::vector<Tensor> to_grad_dtype(std::vector<Tensor> bufs, ScalarType dtype) {
  for (auto& b : bufs) {
    b = aten::to(b, dtype);
  }
  return bufs;
}

Tensor roi_align_backward(const Tensor& grad, const Tensor& rois, double spatial_scale, int64_t PH, int64_t PW,
                          int64_t N, int64_t C, int64_t H, int64_t W, int64_t sampling_ratio, bool aligned,
                          bool channels_last, bool deterministic) {
  check_output_size(PH, PW);
  check_spatial_scale(spatial_scale, "spatial_scale");
  check_sampling_ratio(sampling_ratio);
  check_map_size(N, "batch_size");
  check_map_size(C, "channels");
  check_map_size(H, "height");
  check_map_size(W, "width");
  const auto r = prepare_rois(rois, grad, "grad", grad.scalar_type());
  check_roi_grad(grad, r, C, PH, PW);
  check_batch_indices_on_cpu(r, N);
  auto bufs = call_op<std::vector<Tensor>>(
      "fastdet::_roi_align_backward_kernel", grad, r, std::optional<Tensor>(), std::vector<double>{spatial_scale}, PH,
      PW, N, C, std::vector<int64_t>{H}, std::vector<int64_t>{W}, sampling_ratio, aligned, channels_last,
      deterministic);
  return aten::to(bufs.at(0), grad.scalar_type());
}

Tensor multi_scale_roi_align(const std::vector<Tensor>& features, const Tensor& rois, const Tensor& levels,
                             const std::vector<double>& spatial_scales, int64_t PH, int64_t PW, int64_t sampling_ratio,
                             bool aligned) {
  check_output_size(PH, PW);
  check_sampling_ratio(sampling_ratio);
  FASTDET_CHECK(!features.empty(), "features must hold at least one level");
  const auto L = static_cast<int64_t>(features.size());
  FASTDET_CHECK(L <= roi::kMaxLevels, "features must hold 1 to ", roi::kMaxLevels, " levels, got ", L);
  check_level_count(L, spatial_scales.size(), "spatial_scales");
  const Tensor& f0 = features[0];
  for (int64_t l = 0; l < L; ++l) {
    const Tensor& f = features[l];
    check_roi_feature(f, "features[l]");
    check_spatial_scale(spatial_scales[l], "spatial_scales[l]");
    FASTDET_CHECK(f.size(0) == f0.size(0) && f.size(1) == f0.size(1),
                  "all feature levels must have the same batch size and channels, got ", shape_of(f0), " and ",
                  shape_of(f), " (level ", l, ")");
    check_same_dtype(f0, "features[0]", f, "features[l]");
    check_same_device(f0, "features[0]", f, "features[l]");
  }
  const auto r = prepare_rois(rois, f0, "input", f0.scalar_type());
  const auto lv = prepare_levels(levels, r, f0, L);
  check_batch_indices_on_cpu(r, f0.size(0));
  return call_op<Tensor>("fastdet::_roi_align_kernel", features, r, std::optional<Tensor>(lv), spatial_scales, PH,
                         PW, sampling_ratio, aligned, roi_channels_last(f0));
}

std::vector<Tensor> multi_scale_roi_align_backward(const Tensor& grad, const Tensor& rois, const Tensor& levels,
                                                   const std::vector<double>& spatial_scales, int64_t PH, int64_t PW,
                                                   int64_t N, int64_t C, const std::vector<int64_t>& heights,
                                                   const std::vector<int64_t>& widths, int64_t sampling_ratio,
                                                   bool aligned, bool channels_last, bool deterministic) {
  const auto L = static_cast<int64_t>(spatial_scales.size());
  FASTDET_CHECK(L >= 1 && L <= roi::kMaxLevels && static_cast<int64_t>(heights.size()) == L &&
                    static_cast<int64_t>(widths.size()) == L,
                "spatial_scales, heights and widths must have one entry per level (1 to ", roi::kMaxLevels, ")");
  check_output_size(PH, PW);
  check_sampling_ratio(sampling_ratio);
  check_map_size(N, "batch_size");
  check_map_size(C, "channels");
  for (int64_t l = 0; l < L; ++l) {
    check_spatial_scale(spatial_scales[l], "spatial_scales[l]");
    check_map_size(heights[l], "heights[l]");
    check_map_size(widths[l], "widths[l]");
  }
  const auto r = prepare_rois(rois, grad, "grad", grad.scalar_type());
  check_roi_grad(grad, r, C, PH, PW);
  const auto lv = prepare_levels(levels, r, grad, L);
  check_batch_indices_on_cpu(r, N);
  auto bufs = call_op<std::vector<Tensor>>("fastdet::_roi_align_backward_kernel", grad, r, std::optional<Tensor>(lv),
                                           spatial_scales, PH, PW, N, C, heights, widths, sampling_ratio, aligned,
                                           channels_last, deterministic);
  return to_grad_dtype(std::move(bufs), grad.scalar_type());
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_FRAGMENT(fastdet, m) {
  // rois: [K, 5] (batch index, x1, y1, x2, y2). Output [K, C, pooled_height, pooled_width] in input's dtype and
  // memory format.
  m.def("roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
        "int sampling_ratio, bool aligned) -> Tensor");
  // Gradient with respect to input only (boxes get none, as in torchvision). channels_last selects the layout of the
  // returned gradient, which the op cannot otherwise know because the input itself is not saved. deterministic
  // selects the CUDA kernel that sums every gradient element in a fixed order (fastdet.ops.roi passes
  // torch.are_deterministic_algorithms_enabled()); the CPU kernel always does.
  m.def("_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, int sampling_ratio, "
        "bool aligned, bool channels_last, bool deterministic=False) -> Tensor");
  // One pass over all RoIs of all levels: RoI k is pooled from features[levels[k]] with spatial_scales[levels[k]].
  m.def("multi_scale_roi_align(Tensor[] features, Tensor rois, Tensor levels, float[] spatial_scales, "
        "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor");
  m.def("_multi_scale_roi_align_backward(Tensor grad, Tensor rois, Tensor levels, float[] spatial_scales, "
        "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt[] heights, "
        "SymInt[] widths, int sampling_ratio, bool aligned, bool channels_last, bool deterministic=False) -> Tensor[]");

  // Per-backend kernels (prepared arguments only, see roi_align.h). levels is None for a single-level roi_align.
  m.def("_roi_align_kernel(Tensor[] features, Tensor rois, Tensor? levels, float[] spatial_scales, int pooled_height, "
        "int pooled_width, int sampling_ratio, bool aligned, bool channels_last) -> Tensor");
  // Returns one gradient per level in the accumulation dtype (float32, float64 for float64 grads).
  m.def("_roi_align_backward_kernel(Tensor grad, Tensor rois, Tensor? levels, float[] spatial_scales, "
        "int pooled_height, int pooled_width, int batch_size, int channels, int[] heights, int[] widths, "
        "int sampling_ratio, bool aligned, bool channels_last, bool deterministic) -> Tensor[]");
}

STABLE_TORCH_LIBRARY_IMPL(fastdet, CompositeExplicitAutograd, m) {
  m.impl("roi_align", TORCH_BOX(&fastdet::roi_align));
  m.impl("_roi_align_backward", TORCH_BOX(&fastdet::roi_align_backward));
  m.impl("multi_scale_roi_align", TORCH_BOX(&fastdet::multi_scale_roi_align));
  m.impl("_multi_scale_roi_align_backward", TORCH_BOX(&fastdet::multi_scale_roi_align_backward));
}
