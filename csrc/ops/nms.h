#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

namespace fastdet {

// The NMS family is one pipeline: sort candidates by (score desc, index asc), group them stably by category, compute
// keep flags with the backend's kernel (the private op fastdet::_nms_keep_flags), and map the flags back to score
// order. Only the keep-flag kernel differs between CPU and CUDA; everything else is device-agnostic ATen code here.

// keep flags [B, N] (bool, in score order) and that order [B, N] (int64 indices into the candidates).
struct ScoreOrderedFlags {
  at::Tensor flags;
  at::Tensor order;
};

// boxes [B, N, 4], scores [B, N], categories [B, N] integer or nullopt (one category).
ScoreOrderedFlags nms_keep_flags_by_score(const at::Tensor& boxes, const at::Tensor& scores,
                                          const std::optional<at::Tensor>& categories, double iou_threshold,
                                          bool sync_free);

// Shared checks of _nms_keep_flags: boxes [B, N, 4] floating, categories [B, N] int64 sorted within each image.
void check_keep_flags_args(const at::Tensor& boxes, const std::optional<at::Tensor>& categories,
                           double iou_threshold);

// Segments of equal category as a CPU int64 tensor [S, 3] of (image, begin, end), in visit order; one segment per
// image when categories is nullopt. categories must be on the CPU here.
at::Tensor find_segments(const std::optional<at::Tensor>& categories, int64_t B, int64_t N);

at::Tensor nms_impl(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold);
at::Tensor batched_nms_impl(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs,
                            double iou_threshold);
std::tuple<at::Tensor, at::Tensor> nms_fixed_impl(const at::Tensor& boxes, const at::Tensor& scores,
                                                  const std::optional<at::Tensor>& idxs, double iou_threshold,
                                                  int64_t max_output);

}  // namespace fastdet
