// Schema of the mask ops (paste_masks_in_image, project_masks_on_boxes): argument checks and layout decisions,
// written once for every backend. The kernels (cpu/masks.cpp, cuda/masks.cu) receive prepared tensors only:
//   _paste_masks_in_image_kernel(masks [N, M_h, M_w] contiguous floating, boxes [N, 4] contiguous floating,
//                                height, width, padding, scale) -> [N, 1, height, width] in masks' dtype
//   _project_masks_on_boxes_kernel(gt_masks [G, H, W] contiguous bool/uint8/floating, boxes [P, 4] contiguous in the
//                                  accumulation dtype, matched_idxs [P] contiguous int64, M) -> [P, M, M] in boxes'
//                                  dtype
// Per-pixel numerics live in masks_math.h (paste) and roi_align_math.h (projection: torchvision's roi_align).
#include <cstdint>

#include "ops/checks.h"

namespace fastdet {
namespace {

// A padding this large would only pad with zeros that no resized pixel can reach meaningfully; the bound keeps
// (M + 2 * padding) far from overflow.
constexpr int64_t kMaxPadding = int64_t(1) << 20;
// Largest mask side and output size accepted: sizes enter float arithmetic and int64 products.
constexpr int64_t kMaxSide = int64_t(1) << 31;

void check_image_size(int64_t value, const char* name) {
  FASTDET_CHECK(value >= 0 && value < kMaxSide, name, " must be in [0, 2^31), got ", value);
}

void check_mask_boxes(const Tensor& boxes, int64_t n, const char* masks_name, const Tensor& masks) {
  check_boxes(boxes, "boxes", /*allow_batched=*/false);
  check_same_device(masks, masks_name, boxes, "boxes");
  FASTDET_CHECK(boxes.size(0) == n, "boxes must have one row per mask: expected [", n, ", 4], got ",
                shape_of(boxes));
}

Tensor paste_masks_in_image(const Tensor& masks, const Tensor& boxes, int64_t height, int64_t width,
                            int64_t padding) {
  check_floating(masks, "masks");
  FASTDET_CHECK(masks.dim() == 3 || (masks.dim() == 4 && masks.size(1) == 1),
                "masks must have shape [N, 1, M, M] or [N, M, M], got ", shape_of(masks));
  const int64_t N = masks.size(0);
  check_mask_boxes(boxes, N, "masks", masks);
  check_image_size(height, "image_shape[0] (height)");
  check_image_size(width, "image_shape[1] (width)");
  FASTDET_CHECK(padding >= 0 && padding <= kMaxPadding, "padding must be in [0, ", kMaxPadding, "], got ", padding);
  const int64_t mh = masks.size(-2), mw = masks.size(-1);
  FASTDET_CHECK(N == 0 || (mh > 0 && mw > 0 && mh < kMaxSide && mw < kMaxSide),
                "masks must have a non-empty M x M grid (below 2^31 per side), got ", shape_of(masks));
  auto m = aten::contiguous(masks.dim() == 4 ? aten::squeeze(masks, 1) : masks);
  auto b = aten::contiguous(boxes);
  // torchvision's expand_masks: the box grows by the padded over the unpadded mask width, a Python float.
  const double scale = N == 0 ? 1.0 : static_cast<double>(mw + 2 * padding) / static_cast<double>(mw);
  return call_op<Tensor>("fastdet::_paste_masks_in_image_kernel", m, b, height, width, padding, scale);
}

bool mask_dtype_ok(ScalarType t) {
  return t == kBool || t == ScalarType::Byte || is_floating(t);
}

Tensor project_masks_on_boxes(const Tensor& gt_masks, const Tensor& boxes, const Tensor& matched_idxs, int64_t M) {
  FASTDET_CHECK(mask_dtype_ok(gt_masks.scalar_type()),
                "gt_masks must be a bool, uint8 or floating-point tensor, got ", gt_masks.scalar_type());
  FASTDET_CHECK(gt_masks.dim() == 3, "gt_masks must have shape [G, H, W], got ", shape_of(gt_masks));
  check_boxes(boxes, "boxes", /*allow_batched=*/false);
  check_same_device(gt_masks, "gt_masks", boxes, "boxes");
  check_same_device(gt_masks, "gt_masks", matched_idxs, "matched_idxs");
  const int64_t P = boxes.size(0), G = gt_masks.size(0);
  FASTDET_CHECK(is_integral(matched_idxs.scalar_type(), /*include_bool=*/false),
                "matched_idxs must be an integer tensor, got ", matched_idxs.scalar_type());
  FASTDET_CHECK(matched_idxs.dim() == 1 && matched_idxs.size(0) == P,
                "matched_idxs must have shape [P] with P = boxes.size(0) = ", P, ", got ", shape_of(matched_idxs));
  FASTDET_CHECK(M > 0 && M <= 4096, "M (the output side) must be in [1, 4096], got ", M);
  auto idx = aten::contiguous(aten::to(matched_idxs, kLong));
  if (idx.is_cpu()) {
    const int64_t* p = idx.const_data_ptr<int64_t>();
    for (int64_t k = 0; k < P; ++k) {
      FASTDET_CHECK(p[k] >= 0 && p[k] < G, "matched_idxs[", k, "] = ", p[k],
                    " is not the index of a mask of gt_masks (expected a value in [0, ", G, "))");
    }
  }
  const auto acc = accumulation_type(boxes.scalar_type());
  auto b = aten::contiguous(aten::to(boxes, acc));
  auto out = call_op<Tensor>("fastdet::_project_masks_on_boxes_kernel", aten::contiguous(gt_masks), b, idx, M);
  return aten::to(out, boxes.scalar_type());
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_FRAGMENT(fastdet, m) {
  // masks [N, 1, M_h, M_w] or [N, M_h, M_w] (probabilities or logits, any floating dtype), boxes [N, 4] (x1, y1, x2,
  // y2) in image pixels -> [N, 1, height, width] in masks' dtype.
  m.def("paste_masks_in_image(Tensor masks, Tensor boxes, SymInt height, SymInt width, int padding=1) -> Tensor");
  // gt_masks [G, H, W] (bool, uint8 or floating), boxes [P, 4], matched_idxs [P] -> [P, M, M] in boxes' dtype:
  // torchvision's roi_align(gt_masks[:, None].to(boxes), rois, (M, M), 1.0) with rois (matched_idxs, boxes).
  m.def("project_masks_on_boxes(Tensor gt_masks, Tensor boxes, Tensor matched_idxs, SymInt M) -> Tensor");

  m.def("_paste_masks_in_image_kernel(Tensor masks, Tensor boxes, int height, int width, int padding, float scale) "
        "-> Tensor");
  m.def("_project_masks_on_boxes_kernel(Tensor gt_masks, Tensor boxes, Tensor matched_idxs, int M) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(fastdet, CompositeExplicitAutograd, m) {
  m.impl("paste_masks_in_image", TORCH_BOX(&fastdet::paste_masks_in_image));
  m.impl("project_masks_on_boxes", TORCH_BOX(&fastdet::project_masks_on_boxes));
}
