// Schemas of the NMS family and the device-agnostic pipeline around the per-backend keep-flag kernel.
//
// Ordering contract (identical to torchvision's nms): candidates are visited by decreasing score, ties by increasing
// index (a stable sort), NaN scores first as torch.sort places them. A visited candidate that no kept candidate of the
// same category overlaps with IoU > iou_threshold is kept. Results list kept indices in visit order.
#include "ops/nms.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "ops/checks.h"

namespace fastdet {
namespace {

at::Tensor call_keep_flags(const at::Tensor& boxes, const std::optional<at::Tensor>& categories,
                           double iou_threshold, bool sync_free) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastdet::_nms_keep_flags", "")
                       .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, double, bool)>();
  return op.call(boxes, categories, iou_threshold, sync_free);
}

void check_scores(const at::Tensor& boxes, const at::Tensor& scores, const char* boxes_shape) {
  check_floating(scores, "scores");
  check_same_device(boxes, "boxes", scores, "scores");
  const auto expected = boxes.sizes().slice(0, boxes.dim() - 1);
  TORCH_CHECK(scores.sizes() == expected, "scores must have shape ", expected, " to match boxes ", boxes_shape,
              ", got ", scores.sizes());
}

void check_idxs(const at::Tensor& boxes, const at::Tensor& idxs) {
  TORCH_CHECK(at::isIntegralType(idxs.scalar_type(), /*includeBool=*/false), "idxs must be an integer tensor ",
              "of category indices, got ", idxs.scalar_type());
  check_same_device(boxes, "boxes", idxs, "idxs");
  const auto expected = boxes.sizes().slice(0, boxes.dim() - 1);
  TORCH_CHECK(idxs.sizes() == expected, "idxs must have shape ", expected, " to match boxes, got ", idxs.sizes());
}

}  // namespace

void check_keep_flags_args(const at::Tensor& boxes, const std::optional<at::Tensor>& categories,
                           double iou_threshold) {
  check_floating(boxes, "boxes");
  TORCH_CHECK(boxes.dim() == 3 && boxes.size(2) == 4, "boxes must have shape [B, N, 4], got ", boxes.sizes());
  check_threshold(iou_threshold, "iou_threshold");
  if (categories.has_value()) {
    TORCH_CHECK(categories->scalar_type() == at::kLong, "categories must be int64, got ", categories->scalar_type());
    TORCH_CHECK(categories->sizes() == boxes.sizes().slice(0, 2), "categories must have shape [B, N] = ",
                boxes.sizes().slice(0, 2), ", got ", categories->sizes());
    check_same_device(boxes, "boxes", *categories, "categories");
  }
}

at::Tensor find_segments(const std::optional<at::Tensor>& categories, int64_t B, int64_t N) {
  std::vector<int64_t> seg;
  if (!categories.has_value()) {
    for (int64_t b = 0; b < B; ++b) {
      seg.insert(seg.end(), {b, 0, N});
    }
  } else {
    auto cats = categories->contiguous();
    const int64_t* c = cats.const_data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      const int64_t* row = c + b * N;
      int64_t start = 0;
      for (int64_t i = 1; i <= N; ++i) {
        if (i == N || row[i] != row[start]) {
          TORCH_CHECK(i == N || row[i] > row[start], "categories must be sorted within each image");
          seg.insert(seg.end(), {b, start, i});
          start = i;
        }
      }
    }
  }
  auto out = at::empty({static_cast<int64_t>(seg.size() / 3), 3}, at::kLong);
  std::copy(seg.begin(), seg.end(), out.mutable_data_ptr<int64_t>());
  return out;
}

ScoreOrderedFlags nms_keep_flags_by_score(const at::Tensor& boxes, const at::Tensor& scores,
                                          const std::optional<at::Tensor>& categories, double iou_threshold,
                                          bool sync_free) {
  auto score_order = std::get<1>(scores.sort(/*stable=*/true, /*dim=*/1, /*descending=*/true));
  if (!categories.has_value()) {
    auto sorted_boxes = boxes.gather(1, score_order.unsqueeze(-1).expand({-1, -1, 4}));
    return {call_keep_flags(sorted_boxes, std::nullopt, iou_threshold, sync_free), score_order};
  }
  // Group by category with a stable sort, so each category's candidates stay in score order and form one segment.
  auto categories_by_score = categories->to(at::kLong).gather(1, score_order);
  auto [sorted_categories, group_perm] = categories_by_score.sort(/*stable=*/true, /*dim=*/1, /*descending=*/false);
  auto visit_order = score_order.gather(1, group_perm);
  auto sorted_boxes = boxes.gather(1, visit_order.unsqueeze(-1).expand({-1, -1, 4}));
  auto grouped_flags = call_keep_flags(sorted_boxes, sorted_categories, iou_threshold, sync_free);
  // Position p of the grouped order is position group_perm[p] of the score order.
  auto flags = at::zeros_like(grouped_flags).scatter_(1, group_perm, grouped_flags);
  return {flags, score_order};
}

at::Tensor nms_impl(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold) {
  check_boxes(boxes, "boxes", /*allow_batched=*/false);
  check_scores(boxes, scores, "[N, 4]");
  check_threshold(iou_threshold, "iou_threshold");
  if (boxes.size(0) == 0) {
    return at::empty({0}, boxes.options().dtype(at::kLong));
  }
  auto result = nms_keep_flags_by_score(boxes.unsqueeze(0), scores.unsqueeze(0), std::nullopt, iou_threshold,
                                        /*sync_free=*/false);
  return result.order.masked_select(result.flags).contiguous();
}

at::Tensor batched_nms_impl(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs,
                            double iou_threshold) {
  check_boxes(boxes, "boxes", /*allow_batched=*/false);
  check_scores(boxes, scores, "[N, 4]");
  check_idxs(boxes, idxs);
  check_threshold(iou_threshold, "iou_threshold");
  if (boxes.size(0) == 0) {
    return at::empty({0}, boxes.options().dtype(at::kLong));
  }
  auto result = nms_keep_flags_by_score(boxes.unsqueeze(0), scores.unsqueeze(0), idxs.unsqueeze(0), iou_threshold,
                                        /*sync_free=*/false);
  return result.order.masked_select(result.flags).contiguous();
}

std::tuple<at::Tensor, at::Tensor> nms_fixed_impl(const at::Tensor& boxes, const at::Tensor& scores,
                                                  const std::optional<at::Tensor>& idxs, double iou_threshold,
                                                  int64_t max_output) {
  check_boxes(boxes, "boxes", /*allow_batched=*/true);
  check_scores(boxes, scores, boxes.dim() == 3 ? "[B, N, 4]" : "[N, 4]");
  if (idxs.has_value()) {
    check_idxs(boxes, *idxs);
  }
  check_threshold(iou_threshold, "iou_threshold");
  TORCH_CHECK(max_output >= 0, "max_output must be >= 0, got ", max_output);
  const bool batched = boxes.dim() == 3;
  auto boxes3 = batched ? boxes : boxes.unsqueeze(0);
  auto scores2 = batched ? scores : scores.unsqueeze(0);
  std::optional<at::Tensor> idxs2;
  if (idxs.has_value()) {
    idxs2 = batched ? *idxs : idxs->unsqueeze(0);
  }
  const int64_t B = boxes3.size(0), N = boxes3.size(1);
  auto long_opts = boxes.options().dtype(at::kLong);
  at::Tensor keep, num_kept;
  if (N == 0 || B == 0) {
    keep = at::full({B, max_output}, -1, long_opts);
    num_kept = at::zeros({B}, long_opts);
  } else {
    auto result = nms_keep_flags_by_score(boxes3, scores2, idxs2, iou_threshold, /*sync_free=*/true);
    // Compaction without a host synchronisation: the k-th kept candidate (k = running count - 1) goes to slot k if
    // k < max_output; every other candidate goes to a slot of its own past the end, so no two writes collide and the
    // scatter is deterministic.
    auto running = result.flags.to(at::kLong).cumsum(1);
    num_kept = running.select(1, N - 1).clamp_max(max_output);
    auto spill = at::arange(N, long_opts).add_(max_output).unsqueeze(0);
    auto slot = at::where(result.flags.logical_and(running.le(max_output)), running - 1, spill);
    keep = at::full({B, max_output + N}, -1, long_opts).scatter_(1, slot, result.order).narrow(1, 0, max_output);
    keep = keep.contiguous();
  }
  if (!batched) {
    return {keep.squeeze(0), num_kept.squeeze(0)};
  }
  return {keep, num_kept};
}

}  // namespace fastdet

TORCH_LIBRARY_FRAGMENT(fastdet, m) {
  m.def("nms(Tensor boxes, Tensor scores, float iou_threshold) -> Tensor");
  m.def("batched_nms(Tensor boxes, Tensor scores, Tensor idxs, float iou_threshold) -> Tensor");
  m.def("nms_fixed(Tensor boxes, Tensor scores, Tensor? idxs, float iou_threshold, int max_output) "
        "-> (Tensor, Tensor)");
  // Backend kernel: boxes [B, N, 4] already in visit order, categories [B, N] int64 grouped (non-decreasing) within
  // each image or None. Returns keep flags [B, N] (bool) in the same order. sync_free=True forbids device-to-host
  // copies (the CUDA kernel then uses a dense N x N bit mask instead of per-category masks).
  m.def("_nms_keep_flags(Tensor boxes, Tensor? categories, float iou_threshold, bool sync_free) -> Tensor");
}

// The public ops are device-agnostic compositions of ATen ops and _nms_keep_flags, which is registered per backend.
TORCH_LIBRARY_IMPL(fastdet, CompositeExplicitAutograd, m) {
  m.impl("nms", &fastdet::nms_impl);
  m.impl("batched_nms", &fastdet::batched_nms_impl);
  m.impl("nms_fixed", &fastdet::nms_fixed_impl);
}
