// Schema and device-agnostic composite of Matrix NMS (matrix_nms_math.h has the rule): checks, the visit order (a
// stable descending sort of the scores, NaN first as torch.sort places them) and the fixed-size output here; the
// per-backend kernels (cpu/matrix_nms.cpp, cuda/matrix_nms.cu) compute the decay factors.
#include <optional>
#include <tuple>

#include "ops/checks.h"
#include "ops/matrix_nms_math.h"
#include "ops/score_select.h"
#include "ops/stable.h"

namespace fastdet {
namespace {

std::tuple<Tensor, Tensor, Tensor> matrix_nms_impl(const Tensor& boxes, const Tensor& scores,
                                                   const std::optional<Tensor>& idxs, int64_t kernel, double sigma,
                                                   double score_threshold, int64_t max_output) {
  check_boxes(boxes, "boxes", /*allow_batched=*/true);
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
  FASTDET_CHECK(kernel == matrix_nms::kLinear || kernel == matrix_nms::kGaussian,
                "kernel must be 1 (linear) or 2 (gaussian), got ", kernel);
  FASTDET_CHECK(sigma > 0.0 && sigma < INFINITY, "sigma must be a positive finite number, got ", sigma);
  FASTDET_CHECK(score_threshold == score_threshold, "score_threshold must not be NaN");
  FASTDET_CHECK(max_output >= 0, "max_output must be >= 0, got ", max_output);
  const bool batched = boxes.dim() == 3;
  auto boxes3 = batched ? boxes : aten::unsqueeze(boxes, 0);
  auto scores2 = batched ? scores : aten::unsqueeze(scores, 0);
  const int64_t B = boxes3.size(0), N = boxes3.size(1);
  if (B == 0 || N == 0 || max_output == 0) {
    return unbatch_top_fixed(empty_top_fixed(B, max_output, scores.scalar_type(), boxes), batched);
  }
  const auto acc = accumulation_type(boxes.scalar_type());
  auto order = std::get<1>(aten::sort(scores2, /*stable=*/true, /*dim=*/1, /*descending=*/true));
  auto sorted_boxes = aten::contiguous(
      aten::to(aten::gather(boxes3, 1, aten::expand(aten::unsqueeze(order, -1), {-1, -1, 4})), acc));
  std::optional<Tensor> categories;
  if (idxs.has_value()) {
    auto idxs2 = batched ? *idxs : aten::unsqueeze(*idxs, 0);
    categories = aten::contiguous(aten::gather(aten::to(idxs2, kLong), 1, order));
  }
  auto decay = call_op<Tensor>("fastdet::_matrix_nms_kernel", sorted_boxes, categories, kernel, sigma);
  // decayed score = score * decay, in the scores' accumulation dtype
  auto sorted_scores = aten::to(aten::gather(scores2, 1, order), accumulation_type(scores.scalar_type()));
  auto decayed = aten::mul(sorted_scores, aten::to(decay, sorted_scores.scalar_type()));
  auto threshold = aten::full({}, score_threshold, kDouble, boxes);
  auto kept = aten::lt(threshold, aten::to(decayed, kDouble));
  return unbatch_top_fixed(select_top_fixed(order, decayed, kept, max_output, scores.scalar_type()), batched);
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_FRAGMENT(fastdet, m) {
  m.def("matrix_nms(Tensor boxes, Tensor scores, Tensor? idxs, int kernel, float sigma, float score_threshold, "
        "int max_output) -> (Tensor, Tensor, Tensor)");
  // Backend kernel: boxes [B, N, 4] float32/float64 contiguous in visit order, categories [B, N] int64 contiguous or
  // None. Returns the decay factors [B, N] (boxes' dtype). Prepared and checked by the composite above.
  m.def("_matrix_nms_kernel(Tensor boxes, Tensor? categories, int kernel, float sigma) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(fastdet, CompositeExplicitAutograd, m) {
  m.impl("matrix_nms", TORCH_BOX(&fastdet::matrix_nms_impl));
}
