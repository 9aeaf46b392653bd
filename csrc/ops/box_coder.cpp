// Schemas of box coding (encode, decode and its backward, and the gather-decode-clip kernel behind
// fastdet.ops.decode_and_select) and the argument checks both backends share.
#include "ops/box_coder.h"

#include <torch/library.h>

#include <cmath>

#include "ops/checks.h"

namespace fastdet {
namespace coder {

void check_weights(c10::ArrayRef<double> weights) {
  TORCH_CHECK(weights.size() == 4, "weights must be 4 numbers (wx, wy, ww, wh), got ", weights.size());
  for (double w : weights) {
    TORCH_CHECK(std::isfinite(w) && w != 0.0, "weights must be finite and non-zero, got ", weights);
  }
}

void check_clip(double clip) {
  TORCH_CHECK(!std::isnan(clip), "bbox_xform_clip must not be NaN");
}

void check_decode_args(const at::Tensor& rel_codes, const at::Tensor& boxes, c10::ArrayRef<double> weights,
                       double clip) {
  check_weights(weights);
  check_clip(clip);
  check_floating(rel_codes, "rel_codes");
  check_boxes(boxes, "boxes", /*allow_batched=*/false);
  check_same_device(rel_codes, "rel_codes", boxes, "boxes");
  check_same_dtype(rel_codes, "rel_codes", boxes, "boxes");
  TORCH_CHECK(rel_codes.dim() == 2 && rel_codes.size(1) % 4 == 0,
              "rel_codes must have shape [R, 4 * C] (C sets of (dx, dy, dw, dh) per row), got ", rel_codes.sizes());
  const int64_t R = rel_codes.size(0), Rb = boxes.size(0);
  TORCH_CHECK((Rb == 0 && R == 0) || (Rb > 0 && R % Rb == 0), "rel_codes has ", R,
              " rows, which must be a multiple of the number of boxes (", Rb, ")");
}

void check_encode_args(const at::Tensor& reference_boxes, const at::Tensor& proposals,
                       c10::ArrayRef<double> weights) {
  check_weights(weights);
  check_boxes(reference_boxes, "reference_boxes", /*allow_batched=*/false);
  check_boxes(proposals, "proposals", /*allow_batched=*/false);
  check_same_device(reference_boxes, "reference_boxes", proposals, "proposals");
  check_same_dtype(reference_boxes, "reference_boxes", proposals, "proposals");
  TORCH_CHECK(reference_boxes.size(0) == proposals.size(0), "reference_boxes and proposals must have the same number ",
              "of boxes, got ", reference_boxes.size(0), " and ", proposals.size(0));
}

void check_decode_select_args(const at::Tensor& rel_codes, const at::Tensor& anchors, const at::Tensor& index,
                              const std::optional<at::Tensor>& image_sizes, c10::ArrayRef<double> weights,
                              double clip) {
  check_weights(weights);
  check_clip(clip);
  check_floating(rel_codes, "rel_codes");
  check_same_device(rel_codes, "rel_codes", anchors, "anchors");
  check_same_device(rel_codes, "rel_codes", index, "index");
  check_same_dtype(rel_codes, "rel_codes", anchors, "anchors");
  TORCH_CHECK(rel_codes.dim() == 3 && rel_codes.size(2) == 4, "rel_codes must have shape [B, N, 4], got ",
              rel_codes.sizes());
  const int64_t B = rel_codes.size(0), N = rel_codes.size(1);
  TORCH_CHECK(anchors.dim() == 3 && (anchors.size(0) == 1 || anchors.size(0) == B) && anchors.size(1) == N &&
                  anchors.size(2) == 4,
              "anchors must have shape [1, N, 4] or [B, N, 4] with B = ", B, ", N = ", N, ", got ", anchors.sizes());
  TORCH_CHECK(index.scalar_type() == at::kLong && index.dim() == 2 && index.size(0) == B,
              "index must be an int64 tensor of shape [B, K], got ", index.scalar_type(), " ", index.sizes());
  if (image_sizes.has_value()) {
    check_same_device(rel_codes, "rel_codes", *image_sizes, "image_sizes");
    TORCH_CHECK(image_sizes->dim() == 2 && image_sizes->size(0) == B && image_sizes->size(1) == 2,
                "image_sizes must have shape [B, 2] (height, width), got ", image_sizes->sizes());
  }
}

}  // namespace coder
}  // namespace fastdet

TORCH_LIBRARY_FRAGMENT(fastdet, m) {
  // torchvision BoxCoder.decode_single: rel_codes [R, 4C], boxes [Rb, 4] (row r decodes against box r % Rb).
  m.def("box_decode(Tensor rel_codes, Tensor boxes, float[] weights, float bbox_xform_clip) -> Tensor");
  m.def("_box_decode_backward(Tensor grad, Tensor rel_codes, Tensor boxes, float[] weights, float bbox_xform_clip) "
        "-> (Tensor, Tensor)");
  // torchvision BoxCoder.encode_single: reference_boxes [N, 4] encoded against proposals [N, 4].
  m.def("box_encode(Tensor reference_boxes, Tensor proposals, float[] weights) -> Tensor");
  // Gather + decode + clip of pre-selected candidates: rel_codes [B, N, 4], anchors [1 or B, N, 4], index [B, K]
  // (-1 = empty slot, written as a zero box), image_sizes [B, 2] (height, width) or None (no clipping).
  m.def("_decode_select_boxes(Tensor rel_codes, Tensor anchors, Tensor index, Tensor? image_sizes, float[] weights, "
        "float bbox_xform_clip) -> Tensor");
}
