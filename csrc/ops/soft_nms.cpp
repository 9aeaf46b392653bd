// Schemas of soft-NMS and its device-agnostic composites: argument checks, the float64 box workspace and the
// category grouping happen here once; the per-backend kernels (cpu/soft_nms.cpp, cuda/soft_nms.cu) run
// ensemble-boxes' algorithm on each segment (soft_nms_math.h has the per-pair rules).
//
// Visit order, as ensemble-boxes' cpu_soft_nms_float: step i takes the box with the largest score among slots
// i..N-1 (numpy's argmax: the first NaN, else the first largest in the current slot order) and swaps it into slot i
// when slot i's score is strictly smaller; then every later score is multiplied by the decay weight of its IoU with
// slot i. A box is kept when its final score is > score_threshold; results list kept boxes in slot order.
#include <optional>
#include <tuple>

#include "ops/checks.h"
#include "ops/score_select.h"
#include "ops/soft_nms_math.h"
#include "ops/stable.h"

namespace fastdet {
namespace {

void check_soft_nms_args(const Tensor& boxes, const Tensor& scores, const std::optional<Tensor>& idxs,
                         double iou_threshold, double sigma, double score_threshold, int64_t method,
                         bool allow_batched) {
  check_boxes(boxes, "boxes", allow_batched);
  check_floating(scores, "scores");
  check_same_device(boxes, "boxes", scores, "scores");
  const auto b = boxes.sizes();
  const IntArrayRef expected(b.data(), b.size() - 1);
  FASTDET_CHECK(scores.sizes().equals(expected), "scores must have shape ", shape_of(expected), " to match boxes, got ",
                shape_of(scores));
  if (idxs.has_value()) {
    FASTDET_CHECK(is_integral(idxs->scalar_type(), /*include_bool=*/false), "idxs must be an integer tensor of ",
                  "category indices, got ", idxs->scalar_type());
    check_same_device(boxes, "boxes", *idxs, "idxs");
    FASTDET_CHECK(idxs->sizes().equals(expected), "idxs must have shape ", shape_of(expected), " to match boxes, got ",
                  shape_of(*idxs));
  }
  FASTDET_CHECK(iou_threshold >= 0.0, "iou_threshold must be a non-negative number, got ", iou_threshold);
  FASTDET_CHECK(sigma > 0.0 && sigma < INFINITY, "sigma must be a positive finite number, got ", sigma);
  FASTDET_CHECK(score_threshold == score_threshold, "score_threshold must not be NaN");
  FASTDET_CHECK(method == soft_nms::kLinear || method == soft_nms::kGaussian,
                "method must be 1 (linear) or 2 (gaussian), got ", method);
}

struct SoftNmsResult {
  Tensor index;   // [B, N] original index of the box in each slot
  Tensor scores;  // [B, N] its final (decayed) score, in the kernel's score dtype
  Tensor kept;    // [B, N] bool
};

// boxes [B, N, 4], scores [B, N], categories [B, N] or nullopt; checked.
SoftNmsResult run_soft_nms(const Tensor& boxes, const Tensor& scores, const std::optional<Tensor>& categories,
                           double iou_threshold, double sigma, double score_threshold, int64_t method) {
  const auto score_type = scores.scalar_type() == kDouble ? kDouble : kFloat;
  auto work_boxes = aten::to(boxes, kDouble);
  auto work_scores = aten::to(scores, score_type);
  std::optional<Tensor> grouped;
  std::optional<Tensor> group_perm;
  if (categories.has_value()) {
    // Stable: each category keeps its boxes in index order, the initial slot order of ensemble-boxes' per-label run.
    auto [sorted, perm] = aten::sort(aten::to(*categories, kLong), /*stable=*/true, /*dim=*/1, /*descending=*/false);
    work_boxes = aten::gather(work_boxes, 1, aten::expand(aten::unsqueeze(perm, -1), {-1, -1, 4}));
    work_scores = aten::gather(work_scores, 1, perm);
    grouped = aten::contiguous(sorted);
    group_perm = perm;
  }
  auto [slot, final_scores, kept] =
      call_op<std::tuple<Tensor, Tensor, Tensor>>("fastdet::_soft_nms_kernel", aten::contiguous(work_boxes),
                                                  aten::contiguous(work_scores), grouped, iou_threshold, sigma,
                                                  score_threshold, method);
  auto index = group_perm.has_value() ? aten::gather(*group_perm, 1, slot) : slot;
  return {index, final_scores, kept};
}

std::tuple<Tensor, Tensor> soft_nms_impl(const Tensor& boxes, const Tensor& scores, double iou_threshold,
                                         double sigma, double score_threshold, int64_t method) {
  check_soft_nms_args(boxes, scores, std::nullopt, iou_threshold, sigma, score_threshold, method, false);
  auto r = run_soft_nms(aten::unsqueeze(boxes, 0), aten::unsqueeze(scores, 0), std::nullopt, iou_threshold, sigma,
                        score_threshold, method);
  return {aten::contiguous(aten::masked_select(r.index, r.kept)),
          aten::to(aten::contiguous(aten::masked_select(r.scores, r.kept)), scores.scalar_type())};
}

// Fixed-size, synchronisation-free form: per image the kept boxes of all categories by decreasing decayed score
// (ties: category, then slot order), cut to max_output and padded with index -1 / score 0.
std::tuple<Tensor, Tensor, Tensor> soft_nms_fixed_impl(const Tensor& boxes, const Tensor& scores,
                                                       const std::optional<Tensor>& idxs, double iou_threshold,
                                                       double sigma, double score_threshold, int64_t method,
                                                       int64_t max_output) {
  check_soft_nms_args(boxes, scores, idxs, iou_threshold, sigma, score_threshold, method, true);
  FASTDET_CHECK(max_output >= 0, "max_output must be >= 0, got ", max_output);
  const bool batched = boxes.dim() == 3;
  auto boxes3 = batched ? boxes : aten::unsqueeze(boxes, 0);
  auto scores2 = batched ? scores : aten::unsqueeze(scores, 0);
  std::optional<Tensor> idxs2;
  if (idxs.has_value()) idxs2 = batched ? *idxs : aten::unsqueeze(*idxs, 0);
  const int64_t B = boxes3.size(0), N = boxes3.size(1);
  if (B == 0 || N == 0 || max_output == 0) {
    return unbatch_top_fixed(empty_top_fixed(B, max_output, scores.scalar_type(), boxes), batched);
  }
  auto r = run_soft_nms(boxes3, scores2, idxs2, iou_threshold, sigma, score_threshold, method);
  return unbatch_top_fixed(select_top_fixed(r.index, r.scores, r.kept, max_output, scores.scalar_type()), batched);
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_FRAGMENT(fastdet, m) {
  m.def("soft_nms(Tensor boxes, Tensor scores, float iou_threshold, float sigma, float score_threshold, int method) "
        "-> (Tensor, Tensor)");
  m.def("soft_nms_fixed(Tensor boxes, Tensor scores, Tensor? idxs, float iou_threshold, float sigma, "
        "float score_threshold, int method, int max_output) -> (Tensor, Tensor, Tensor)");
  // Backend kernel: boxes [B, N, 4] float64 contiguous, scores [B, N] float32/float64 contiguous, categories [B, N]
  // int64 grouped (non-decreasing) within each image or None. Returns, per slot after the run: the box's position
  // in the input, its final score and whether it is kept (the scores and order of slots that are not kept may be left
  // mid-run: a kernel may stop once no remaining box can be kept). Prepared and checked by the composites above.
  m.def("_soft_nms_kernel(Tensor boxes, Tensor scores, Tensor? categories, float iou_threshold, float sigma, "
        "float score_threshold, int method) -> (Tensor, Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(fastdet, CompositeExplicitAutograd, m) {
  m.impl("soft_nms", TORCH_BOX(&fastdet::soft_nms_impl));
  m.impl("soft_nms_fixed", TORCH_BOX(&fastdet::soft_nms_fixed_impl));
}
