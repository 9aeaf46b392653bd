// Schemas and composites of weighted boxes fusion (Solovyev et al., 2021) and non-maximum weighted (Zhou et al., 2017)
// with ensemble-boxes' semantics; the kernel they share (cpu/wbf.cpp, cuda/wbf.cu; wbf_math.h has their shared math)
// documents both algorithms. The composites check the arguments once and bring them to the kernel's layout: float64
// boxes / scores / weights (exact widenings: ensemble-boxes computes in float64), int64 labels and counts.
#include <tuple>

#include "ops/checks.h"
#include "ops/stable.h"
#include "ops/wbf_math.h"

namespace fastdet {
namespace {

constexpr int64_t kConfTypes = 4;  // avg, max, box_and_model_avg, absent_model_aware_avg
constexpr int64_t kMaxModels = 64;

// Checks the arguments shared by both ops and runs the kernel.
std::tuple<Tensor, Tensor, Tensor, Tensor> run_fusion(const Tensor& boxes, const Tensor& scores, const Tensor& labels,
                                                      const Tensor& counts, const Tensor& weights, double iou_threshold,
                                                      double skip_box_threshold, int64_t conf_type,
                                                      bool allows_overflow, int64_t method) {
  const char* op = method == wbf::kNmw ? "non_maximum_weighted" : "weighted_boxes_fusion";
  check_floating(boxes, "boxes");
  FASTDET_CHECK(boxes.dim() == 4 && boxes.size(3) == 4, "boxes must have shape [B, M, N, 4] (images, models, ",
                "boxes per model, x1 y1 x2 y2), got ", shape_of(boxes));
  const int64_t B = boxes.size(0), M = boxes.size(1);
  const auto b = boxes.sizes();
  const IntArrayRef bmn(b.data(), 3);
  check_floating(scores, "scores");
  FASTDET_CHECK(scores.sizes().equals(bmn), "scores must have shape ", shape_of(bmn), ", got ", shape_of(scores));
  FASTDET_CHECK(is_integral(labels.scalar_type(), /*include_bool=*/false), "labels must be an integer tensor, got ",
                labels.scalar_type());
  FASTDET_CHECK(labels.sizes().equals(bmn), "labels must have shape ", shape_of(bmn), ", got ", shape_of(labels));
  FASTDET_CHECK(is_integral(counts.scalar_type(), /*include_bool=*/false), "counts must be an integer tensor, got ",
                counts.scalar_type());
  FASTDET_CHECK(counts.dim() == 2 && counts.size(0) == B && counts.size(1) == M, "counts must have shape [", B, ", ",
                M, "], got ", shape_of(counts));
  check_floating(weights, "weights");
  FASTDET_CHECK(weights.dim() == 1 && weights.size(0) == M, "weights must have shape [", M, "], got ",
                shape_of(weights));
  for (const auto* t : {&scores, &labels, &counts, &weights}) {
    FASTDET_CHECK(t->device() == boxes.device(), "boxes, scores, labels, counts and weights must be on one device");
  }
  FASTDET_CHECK(M <= kMaxModels, op, " fuses at most ", kMaxModels, " models, got ", M);
  FASTDET_CHECK(iou_threshold == iou_threshold, "iou_threshold must not be NaN");
  FASTDET_CHECK(skip_box_threshold == skip_box_threshold, "skip_box_threshold must not be NaN");
  return call_op<std::tuple<Tensor, Tensor, Tensor, Tensor>>(
      "fastdet::_weighted_boxes_fusion_kernel", aten::contiguous(aten::to(boxes, kDouble)),
      aten::contiguous(aten::to(scores, kDouble)), aten::contiguous(aten::to(labels, kLong)),
      aten::contiguous(aten::to(counts, kLong)), aten::contiguous(aten::to(weights, kDouble)), iou_threshold,
      skip_box_threshold, conf_type, allows_overflow, method);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> weighted_boxes_fusion_impl(
    const Tensor& boxes, const Tensor& scores, const Tensor& labels, const Tensor& counts, const Tensor& weights,
    double iou_threshold, double skip_box_threshold, int64_t conf_type, bool allows_overflow) {
  FASTDET_CHECK(conf_type >= 0 && conf_type < kConfTypes, "conf_type must be 0 (avg), 1 (max), 2 (box_and_model_avg)",
                " or 3 (absent_model_aware_avg), got ", conf_type);
  return run_fusion(boxes, scores, labels, counts, weights, iou_threshold, skip_box_threshold, conf_type,
                    allows_overflow, wbf::kWbf);
}

// Boxes and scores come back in float32, as ensemble-boxes' non_maximum_weighted stores them (the values are float32
// ones, so the narrowing is exact).
std::tuple<Tensor, Tensor, Tensor, Tensor> non_maximum_weighted_impl(const Tensor& boxes, const Tensor& scores,
                                                                     const Tensor& labels, const Tensor& counts,
                                                                     const Tensor& weights, double iou_threshold,
                                                                     double skip_box_threshold) {
  auto [out_boxes, out_scores, out_labels, num] =
      run_fusion(boxes, scores, labels, counts, weights, iou_threshold, skip_box_threshold, /*conf_type=*/0,
                 /*allows_overflow=*/false, wbf::kNmw);
  return {aten::to(out_boxes, kFloat), aten::to(out_scores, kFloat), out_labels, num};
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_FRAGMENT(fastdet, m) {
  m.def("weighted_boxes_fusion(Tensor boxes, Tensor scores, Tensor labels, Tensor counts, Tensor weights, "
        "float iou_threshold, float skip_box_threshold, int conf_type, bool allows_overflow) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("non_maximum_weighted(Tensor boxes, Tensor scores, Tensor labels, Tensor counts, Tensor weights, "
        "float iou_threshold, float skip_box_threshold) -> (Tensor, Tensor, Tensor, Tensor)");
  // Kernel (method: wbf::Method; non-maximum weighted ignores conf_type and allows_overflow): boxes [B, M, N, 4]
  // float64, scores [B, M, N] float64, labels [B, M, N] int64, counts [B, M] int64,
  // weights [M] float64, all contiguous (prepared and checked above). Returns fused boxes [B, M * N, 4] float64,
  // scores [B, M * N] float64, labels [B, M * N] int64 (-1 in padding) and the number of fused boxes [B].
  m.def("_weighted_boxes_fusion_kernel(Tensor boxes, Tensor scores, Tensor labels, Tensor counts, Tensor weights, "
        "float iou_threshold, float skip_box_threshold, int conf_type, bool allows_overflow, int method) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(fastdet, CompositeExplicitAutograd, m) {
  m.impl("weighted_boxes_fusion", TORCH_BOX(&fastdet::weighted_boxes_fusion_impl));
  m.impl("non_maximum_weighted", TORCH_BOX(&fastdet::non_maximum_weighted_impl));
}
