// Schemas of the rotated NMS family and the device-agnostic pipeline around the per-backend keep-flag kernel, in the
// shape of nms.cpp: argument checks and layout once here; the kernels (cpu/nms_rotated.cpp, cuda/nms_rotated.cu)
// receive prepared tensors only.
//
// Ordering contract (the one of nms / batched_nms): candidates are visited by decreasing score, ties by increasing
// index (a stable sort), NaN scores first as torch.sort places them. A visited candidate that no kept candidate of the
// same category overlaps with rotated IoU > iou_threshold is kept. Results list kept indices in visit order.
#include <optional>
#include <tuple>

#include "ops/checks.h"
#include "ops/rotated.h"

namespace fastdet {
namespace {

void check_rotated_scores(const Tensor& boxes, const Tensor& scores) {
  check_floating(scores, "scores");
  check_same_device(boxes, "boxes", scores, "scores");
  FASTDET_CHECK(scores.dim() == 1 && scores.size(0) == boxes.size(0), "scores must have shape [", boxes.size(0),
                "] to match boxes [N, 5], got ", shape_of(scores));
}

void check_rotated_idxs(const Tensor& boxes, const Tensor& idxs) {
  FASTDET_CHECK(is_integral(idxs.scalar_type(), /*include_bool=*/false), "idxs must be an integer tensor ",
                "of category indices, got ", idxs.scalar_type());
  check_same_device(boxes, "boxes", idxs, "idxs");
  FASTDET_CHECK(idxs.dim() == 1 && idxs.size(0) == boxes.size(0), "idxs must have shape [", boxes.size(0),
                "] to match boxes [N, 5], got ", shape_of(idxs));
}

// boxes [N, 5], scores [N], idxs [N] or nullopt, checked, N > 0: kept indices in visit order.
Tensor nms_rotated_pipeline(const Tensor& boxes, const Tensor& scores, const std::optional<Tensor>& idxs,
                            double iou_threshold) {
  const auto compute = accumulation_type(boxes.scalar_type());
  auto boxes3 = aten::unsqueeze(boxes, 0);
  auto gather_boxes = [&](const Tensor& order) {
    auto index = aten::expand(aten::unsqueeze(order, -1), {-1, -1, 5});
    return aten::contiguous(aten::to(aten::gather(boxes3, 1, index), compute));
  };
  auto score_order = std::get<1>(aten::sort(aten::unsqueeze(scores, 0), /*stable=*/true, /*dim=*/1,
                                            /*descending=*/true));
  Tensor flags;
  if (!idxs.has_value()) {
    flags = call_op<Tensor>("fastdet::_nms_rotated_keep_flags", gather_boxes(score_order), std::optional<Tensor>(),
                            iou_threshold);
  } else {
    // Group by category with a stable sort, so each category's candidates stay in score order and form one segment.
    auto categories_by_score = aten::gather(aten::to(aten::unsqueeze(*idxs, 0), kLong), 1, score_order);
    auto [sorted_categories, group_perm] =
        aten::sort(categories_by_score, /*stable=*/true, /*dim=*/1, /*descending=*/false);
    auto visit_order = aten::gather(score_order, 1, group_perm);
    auto grouped = call_op<Tensor>("fastdet::_nms_rotated_keep_flags", gather_boxes(visit_order),
                                   std::optional<Tensor>(aten::contiguous(sorted_categories)), iou_threshold);
    // Position p of the grouped order is position group_perm[p] of the score order.
    flags = aten::scatter(aten::zeros_like(grouped), 1, group_perm, grouped);
  }
  return aten::contiguous(aten::masked_select(score_order, flags));
}

Tensor nms_rotated(const Tensor& boxes, const Tensor& scores, double iou_threshold) {
  check_rotated_boxes(boxes, "boxes", /*allow_batched=*/false);
  check_rotated_scores(boxes, scores);
  check_threshold(iou_threshold, "iou_threshold");
  if (boxes.size(0) == 0) {
    return aten::empty({0}, kLong, boxes);
  }
  return nms_rotated_pipeline(boxes, scores, std::nullopt, iou_threshold);
}

Tensor batched_nms_rotated(const Tensor& boxes, const Tensor& scores, const Tensor& idxs, double iou_threshold) {
  check_rotated_boxes(boxes, "boxes", /*allow_batched=*/false);
  check_rotated_scores(boxes, scores);
  check_rotated_idxs(boxes, idxs);
  check_threshold(iou_threshold, "iou_threshold");
  if (boxes.size(0) == 0) {
    return aten::empty({0}, kLong, boxes);
  }
  return nms_rotated_pipeline(boxes, scores, idxs, iou_threshold);
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_FRAGMENT(fastdet, m) {
  m.def("nms_rotated(Tensor boxes, Tensor scores, float iou_threshold) -> Tensor");
  m.def("batched_nms_rotated(Tensor boxes, Tensor scores, Tensor idxs, float iou_threshold) -> Tensor");
  // Backend kernel: boxes [B, N, 5] in visit order (contiguous, float32 or float64), categories [B, N] int64 grouped
  // (non-decreasing) within each image or None. Returns keep flags [B, N] (bool) in the same order.
  m.def("_nms_rotated_keep_flags(Tensor boxes, Tensor? categories, float iou_threshold) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(fastdet, CompositeExplicitAutograd, m) {
  m.impl("nms_rotated", TORCH_BOX(&fastdet::nms_rotated));
  m.impl("batched_nms_rotated", TORCH_BOX(&fastdet::batched_nms_rotated));
}
