#pragma once
// The fixed-size, synchronisation-free output of the score-decaying suppressions (soft_nms_fixed, matrix_nms): per
// image, the candidates flagged kept, by decreasing final score (a stable sort: ties keep the candidates' order),
// cut to max_output and padded with index -1 / score 0.
#include <tuple>

#include "ops/stable.h"

namespace fastdet {

// The fixed-size outputs with nothing kept: keep [B, K] = -1, scores [B, K] = 0 (out_dtype), num_kept [B] = 0, on
// like's device.
inline std::tuple<Tensor, Tensor, Tensor> empty_top_fixed(int64_t B, int64_t max_output, ScalarType out_dtype,
                                                          const Tensor& like) {
  return {aten::full({B, max_output}, -1.0, kLong, like), aten::zeros({B, max_output}, out_dtype, like),
          aten::zeros({B}, kLong, like)};
}

// The unbatched form ([K], [K], []) of fixed-size outputs when the caller passed one image without a batch dim.
inline std::tuple<Tensor, Tensor, Tensor> unbatch_top_fixed(const std::tuple<Tensor, Tensor, Tensor>& out,
                                                            bool batched) {
  if (batched) return out;
  return {aten::squeeze(std::get<0>(out), 0), aten::squeeze(std::get<1>(out), 0), aten::squeeze(std::get<2>(out), 0)};
}

// index [B, N] int64 (what to report per candidate), scores [B, N] floating, kept [B, N] bool; out_dtype: the
// dtype of the returned scores. Returns (keep [B, K], scores [B, K], num_kept [B]).
inline std::tuple<Tensor, Tensor, Tensor> select_top_fixed(const Tensor& index, const Tensor& scores,
                                                           const Tensor& kept, int64_t max_output,
                                                           ScalarType out_dtype) {
  const int64_t B = index.size(0), N = index.size(1);
  auto [keep, out_scores, num] = empty_top_fixed(B, max_output, out_dtype, index);
  const int64_t k = max_output < N ? max_output : N;
  if (B == 0 || k == 0) return {keep, out_scores, num};
  auto ninf = aten::full({}, -INFINITY, scores.scalar_type(), index);
  auto ranked = aten::where(kept, scores, ninf);
  auto order = aten::narrow(std::get<1>(aten::sort(ranked, /*stable=*/true, /*dim=*/1, /*descending=*/true)), 1, 0, k);
  auto valid = aten::gather(kept, 1, order);
  auto chosen_index = aten::where(valid, aten::gather(index, 1, order), aten::full({}, -1.0, kLong, index));
  auto chosen_scores = aten::where(valid, aten::gather(scores, 1, order), aten::zeros({}, scores.scalar_type(), index));
  auto keep_head = aten::narrow(keep, 1, 0, k);
  auto scores_head = aten::narrow(out_scores, 1, 0, k);
  torch::stable::copy_(keep_head, chosen_index);
  torch::stable::copy_(scores_head, aten::to(chosen_scores, out_dtype));
  num = aten::sum(aten::to(valid, kLong), 1);
  return {keep, out_scores, num};
}

}  // namespace fastdet
