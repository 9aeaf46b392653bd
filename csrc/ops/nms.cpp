// Schemas of the NMS family and the device-agnostic pipeline around the per-backend keep-flag kernel: argument checks
// and layout once here; the kernels (cpu/nms.cpp, cuda/nms.cu) receive prepared tensors only.
//
// Ordering contract (identical to torchvision's nms): candidates are visited by decreasing score, ties by increasing
// index (a stable sort), NaN scores first as torch.sort places them. A visited candidate that no kept candidate of the
// same category overlaps with IoU > iou_threshold is kept. Results list kept indices in visit order.
#include "ops/nms.h"

#include <optional>
#include <tuple>

#include "ops/checks.h"

namespace fastdet {
namespace {

// keep flags [B, N] (bool, in score order) and that order [B, N] (int64 indices into the candidates).
struct ScoreOrderedFlags {
  Tensor flags;
  Tensor order;
};

// A 0-d int64 tensor on like's device: the scalar operand of a tensor-tensor op.
Tensor long_scalar(int64_t value, const Tensor& like) {
  return aten::full({}, static_cast<double>(value), kLong, like);
}

void check_scores(const Tensor& boxes, const Tensor& scores, const char* boxes_shape) {
  check_floating(scores, "scores");
  check_same_device(boxes, "boxes", scores, "scores");
  const auto b = boxes.sizes();
  const IntArrayRef expected(b.data(), b.size() - 1);
  FASTDET_CHECK(scores.sizes().equals(expected), "scores must have shape ", shape_of(expected), " to match boxes ",
                boxes_shape, ", got ", shape_of(scores));
}

void check_idxs(const Tensor& boxes, const Tensor& idxs) {
  FASTDET_CHECK(is_integral(idxs.scalar_type(), /*include_bool=*/false), "idxs must be an integer tensor ",
                "of category indices, got ", idxs.scalar_type());
  check_same_device(boxes, "boxes", idxs, "idxs");
  const auto b = boxes.sizes();
  const IntArrayRef expected(b.data(), b.size() - 1);
  FASTDET_CHECK(idxs.sizes().equals(expected), "idxs must have shape ", shape_of(expected), " to match boxes, got ",
                shape_of(idxs));
}

// boxes [B, N, 4] floating, scores [B, N] floating, categories [B, N] integer or nullopt (one category), all on one
// device (checked by the public ops), N > 0. Everything _nms_keep_flags requires of its arguments is established here:
// boxes gathered into visit order (hence contiguous) and cast to the accumulation dtype, categories int64 and sorted.
ScoreOrderedFlags nms_keep_flags_by_score(const Tensor& boxes, const Tensor& scores,
                                          const std::optional<Tensor>& categories, double iou_threshold,
                                          bool sync_free) {
  const auto acc = accumulation_type(boxes.scalar_type());
  auto gather_boxes = [&](const Tensor& order) {
    auto index = aten::expand(aten::unsqueeze(order, -1), {-1, -1, 4});
    return aten::contiguous(aten::to(aten::gather(boxes, 1, index), acc));
  };
  auto score_order = std::get<1>(aten::sort(scores, /*stable=*/true, /*dim=*/1, /*descending=*/true));
  if (!categories.has_value()) {
    auto flags = call_op<Tensor>("fastdet::_nms_keep_flags", gather_boxes(score_order), std::optional<Tensor>(),
                                 iou_threshold, sync_free);
    return {flags, score_order};
  }
  // Group by category with a stable sort, so each category's candidates stay in score order and form one segment.
  auto categories_by_score = aten::gather(aten::to(*categories, kLong), 1, score_order);
  auto [sorted_categories, group_perm] =
      aten::sort(categories_by_score, /*stable=*/true, /*dim=*/1, /*descending=*/false);
  auto visit_order = aten::gather(score_order, 1, group_perm);
  auto grouped_flags = call_op<Tensor>("fastdet::_nms_keep_flags", gather_boxes(visit_order),
                                       std::optional<Tensor>(aten::contiguous(sorted_categories)), iou_threshold,
                                       sync_free);
  // Position p of the grouped order is position group_perm[p] of the score order.
  auto flags = aten::scatter(aten::zeros_like(grouped_flags), 1, group_perm, grouped_flags);
  return {flags, score_order};
}

Tensor nms_impl(const Tensor& boxes, const Tensor& scores, double iou_threshold) {
  check_boxes(boxes, "boxes", /*allow_batched=*/false);
  check_scores(boxes, scores, "[N, 4]");
  check_threshold(iou_threshold, "iou_threshold");
  if (boxes.size(0) == 0) {
    return aten::empty({0}, kLong, boxes);
  }
  auto result = nms_keep_flags_by_score(aten::unsqueeze(boxes, 0), aten::unsqueeze(scores, 0), std::nullopt,
                                        iou_threshold, /*sync_free=*/false);
  return aten::contiguous(aten::masked_select(result.order, result.flags));
}

Tensor batched_nms_impl(const Tensor& boxes, const Tensor& scores, const Tensor& idxs, double iou_threshold) {
  check_boxes(boxes, "boxes", /*allow_batched=*/false);
  check_scores(boxes, scores, "[N, 4]");
  check_idxs(boxes, idxs);
  check_threshold(iou_threshold, "iou_threshold");
  if (boxes.size(0) == 0) {
    return aten::empty({0}, kLong, boxes);
  }
  auto result = nms_keep_flags_by_score(aten::unsqueeze(boxes, 0), aten::unsqueeze(scores, 0),
                                        aten::unsqueeze(idxs, 0), iou_threshold, /*sync_free=*/false);
  return aten::contiguous(aten::masked_select(result.order, result.flags));
}

std::tuple<Tensor, Tensor> nms_fixed_impl(const Tensor& boxes, const Tensor& scores,
                                          const std::optional<Tensor>& idxs, double iou_threshold, int64_t max_output) {
  check_boxes(boxes, "boxes", /*allow_batched=*/true);
  check_scores(boxes, scores, boxes.dim() == 3 ? "[B, N, 4]" : "[N, 4]");
  if (idxs.has_value()) {
    check_idxs(boxes, *idxs);
  }
  check_threshold(iou_threshold, "iou_threshold");
  FASTDET_CHECK(max_output >= 0, "max_output must be >= 0, got ", max_output);
  const bool batched = boxes.dim() == 3;
  auto boxes3 = batched ? boxes : aten::unsqueeze(boxes, 0);
  auto scores2 = batched ? scores : aten::unsqueeze(scores, 0);
  std::optional<Tensor> idxs2;
  if (idxs.has_value()) {
    idxs2 = batched ? *idxs : aten::unsqueeze(*idxs, 0);
  }
  const int64_t B = boxes3.size(0), N = boxes3.size(1);
  Tensor keep, num_kept;
  if (N == 0 || B == 0) {
    keep = aten::full({B, max_output}, -1.0, kLong, boxes);
    num_kept = aten::zeros({B}, kLong, boxes);
  } else {
    auto result = nms_keep_flags_by_score(boxes3, scores2, idxs2, iou_threshold, /*sync_free=*/true);
    // Compaction without a host synchronisation: the k-th kept candidate (k = running count, from 1) goes to slot k
    // if k <= max_output; every other candidate i goes to slot max_output + 1 + i of its own past the end, so no two
    // writes collide and the scatter is deterministic. Slot 0 is never written; slots 1..max_output are the output.
    // (The slots are shifted by one against "running - 1" since integer tensors cannot subtract a scalar here.)
    auto running = aten::cumsum(result.flags, 1, kLong);
    auto limit = long_scalar(max_output, boxes);
    num_kept = aten::minimum(aten::select(running, 1, N - 1), limit);
    // max_output + 1, max_output + 2, ..., max_output + N: a running sum of (max_output + 1, 1, 1, ...).
    auto steps = aten::full({1, N}, 1.0, kLong, boxes);
    torch::stable::fill_(aten::narrow(steps, 1, 0, 1), static_cast<double>(max_output + 1));
    auto spill = aten::cumsum(steps, 1);
    auto slot = aten::where(aten::logical_and(result.flags, aten::le(running, limit)), running, spill);
    auto slots = aten::full({B, max_output + N + 1}, -1.0, kLong, boxes);
    // A fresh [B, max_output] tensor (not a view at storage offset 1, even for B = 1).
    keep = aten::empty({B, max_output}, kLong, boxes);
    torch::stable::copy_(keep, aten::narrow(aten::scatter(slots, 1, slot, result.order), 1, 1, max_output));
  }
  if (!batched) {
    return {aten::squeeze(keep, 0), aten::squeeze(num_kept, 0)};
  }
  return {keep, num_kept};
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_FRAGMENT(fastdet, m) {
  m.def("nms(Tensor boxes, Tensor scores, float iou_threshold) -> Tensor");
  m.def("batched_nms(Tensor boxes, Tensor scores, Tensor idxs, float iou_threshold) -> Tensor");
  m.def("nms_fixed(Tensor boxes, Tensor scores, Tensor? idxs, float iou_threshold, int max_output) "
        "-> (Tensor, Tensor)");
  // Backend kernel: boxes [B, N, 4] already in visit order (contiguous, float32 or float64), categories [B, N] int64
  // grouped (non-decreasing) within each image or None. Returns keep flags [B, N] (bool) in the same order.
  // sync_free=True forbids device-to-host copies (the CUDA kernel then uses a dense N x N bit mask instead of
  // per-category masks). Its arguments are prepared by the composites above, which do all the checking.
  m.def("_nms_keep_flags(Tensor boxes, Tensor? categories, float iou_threshold, bool sync_free) -> Tensor");
  // CPU-only fused multiclass_nms (cpu/nms.cpp): boxes [B, N, 4] or [B, N, C, 4] and scores [B, N, C], contiguous
  // float32/float64, checked by fastdet.ops.multiclass_nms. Returns (boxes [B, K, 4], scores [B, K], labels [B, K],
  // num_detections [B]) exactly as the device-agnostic path (top-k, nms_fixed, compaction) computes them.
  m.def("_multiclass_nms_kernel(Tensor boxes, Tensor scores, float score_threshold, float iou_threshold, "
        "int max_detections, int pre_nms_top_k, bool class_agnostic) -> (Tensor, Tensor, Tensor, Tensor)");
}

// The public ops are device-agnostic compositions of torch ops and _nms_keep_flags, which is registered per backend.
STABLE_TORCH_LIBRARY_IMPL(fastdet, CompositeExplicitAutograd, m) {
  m.impl("nms", TORCH_BOX(&fastdet::nms_impl));
  m.impl("batched_nms", TORCH_BOX(&fastdet::batched_nms_impl));
  m.impl("nms_fixed", TORCH_BOX(&fastdet::nms_fixed_impl));
}
