// Schemas of box coding (encode, decode and its backward, and the gather-decode-clip kernel behind
// fastdet.ops.decode_and_select): argument checks and layout, written once for every backend; the kernels
// (cpu/box_coder.cpp, cuda/box_coder.cu) receive prepared tensors only (see box_coder.h).
#include "ops/box_coder.h"

#include <cmath>
#include <optional>
#include <ostream>
#include <tuple>
#include <vector>

#include "ops/checks.h"

namespace fastdet {
namespace {

// The weights as "[1, 1, inf, 1]" when streamed.
struct Numbers {
  const std::vector<double>& values;
};
std::ostream& operator<<(std::ostream& os, const Numbers& n) {
  os << '[';
  for (size_t i = 0; i < n.values.size(); ++i) os << (i ? ", " : "") << n.values[i];
  return os << ']';
}

void check_weights(const std::vector<double>& weights) {
  FASTDET_CHECK(weights.size() == 4, "weights must be 4 numbers (wx, wy, ww, wh), got ", weights.size());
  for (double w : weights) {
    FASTDET_CHECK(std::isfinite(w) && w != 0.0, "weights must be finite and non-zero, got ", Numbers{weights});
  }
}

void check_clip(double clip) {
  FASTDET_CHECK(!std::isnan(clip), "bbox_xform_clip must not be NaN");
}

// decode: rel_codes [R, 4C], boxes [Rb, 4] with Rb dividing R (row r uses box r % Rb: a batch of deltas [B * N, 4C]
// shares one set of N anchors). Same dtype and device.
void check_decode_args(const Tensor& rel_codes, const Tensor& boxes, const std::vector<double>& weights,
                       double clip) {
  check_weights(weights);
  check_clip(clip);
  check_floating(rel_codes, "rel_codes");
  check_boxes(boxes, "boxes", /*allow_batched=*/false);
  check_same_device(rel_codes, "rel_codes", boxes, "boxes");
  check_same_dtype(rel_codes, "rel_codes", boxes, "boxes");
  FASTDET_CHECK(rel_codes.dim() == 2 && rel_codes.size(1) % 4 == 0,
                "rel_codes must have shape [R, 4 * C] (C sets of (dx, dy, dw, dh) per row), got ",
                shape_of(rel_codes));
  const int64_t R = rel_codes.size(0), Rb = boxes.size(0);
  FASTDET_CHECK((Rb == 0 && R == 0) || (Rb > 0 && R % Rb == 0), "rel_codes has ", R,
                " rows, which must be a multiple of the number of boxes (", Rb, ")");
}

Tensor box_decode(const Tensor& rel_codes, const Tensor& boxes, std::vector<double> weights, double clip) {
  check_decode_args(rel_codes, boxes, weights, clip);
  return call_op<Tensor>("fastdet::_box_decode_kernel", aten::contiguous(rel_codes), aten::contiguous(boxes), weights,
                         clip);
}

std::tuple<Tensor, Tensor> box_decode_backward(const Tensor& grad, const Tensor& rel_codes, const Tensor& boxes,
                                               std::vector<double> weights, double clip) {
  check_decode_args(rel_codes, boxes, weights, clip);
  FASTDET_CHECK(same_shape(grad.sizes(), rel_codes.sizes()), "grad must have the shape of rel_codes ", shape_of(rel_codes),
                ", got ", shape_of(grad));
  check_same_device(grad, "grad", rel_codes, "rel_codes");
  auto g = aten::contiguous(aten::to(grad, rel_codes.scalar_type()));
  return call_op<std::tuple<Tensor, Tensor>>("fastdet::_box_decode_backward_kernel", g, aten::contiguous(rel_codes),
                                             aten::contiguous(boxes), weights, clip);
}

Tensor box_encode(const Tensor& reference_boxes, const Tensor& proposals, std::vector<double> weights) {
  check_weights(weights);
  check_boxes(reference_boxes, "reference_boxes", /*allow_batched=*/false);
  check_boxes(proposals, "proposals", /*allow_batched=*/false);
  check_same_device(reference_boxes, "reference_boxes", proposals, "proposals");
  check_same_dtype(reference_boxes, "reference_boxes", proposals, "proposals");
  FASTDET_CHECK(reference_boxes.size(0) == proposals.size(0), "reference_boxes and proposals must have the same ",
                "number of boxes, got ", reference_boxes.size(0), " and ", proposals.size(0));
  return call_op<Tensor>("fastdet::_box_encode_kernel", aten::contiguous(reference_boxes),
                         aten::contiguous(proposals), weights);
}

// rel_codes [B, N, 4], anchors [Ba, N, 4] (Ba = 1 or B), index [B, K] int64 (-1 = empty slot), image_sizes [B, 2]
// (height, width) or absent. The index values are checked here when they are on the CPU; on a device, reading them
// would synchronise, so the CUDA kernel asserts their range instead.
Tensor decode_select_boxes(const Tensor& rel_codes, const Tensor& anchors, const Tensor& index,
                           const std::optional<Tensor>& image_sizes, std::vector<double> weights, double clip) {
  check_weights(weights);
  check_clip(clip);
  check_floating(rel_codes, "rel_codes");
  check_same_device(rel_codes, "rel_codes", anchors, "anchors");
  check_same_device(rel_codes, "rel_codes", index, "index");
  check_same_dtype(rel_codes, "rel_codes", anchors, "anchors");
  FASTDET_CHECK(rel_codes.dim() == 3 && rel_codes.size(2) == 4, "rel_codes must have shape [B, N, 4], got ",
                shape_of(rel_codes));
  const int64_t B = rel_codes.size(0), N = rel_codes.size(1);
  FASTDET_CHECK(anchors.dim() == 3 && (anchors.size(0) == 1 || anchors.size(0) == B) && anchors.size(1) == N &&
                    anchors.size(2) == 4,
                "anchors must have shape [1, N, 4] or [B, N, 4] with B = ", B, ", N = ", N, ", got ",
                shape_of(anchors));
  FASTDET_CHECK(index.scalar_type() == kLong && index.dim() == 2 && index.size(0) == B,
                "index must be an int64 tensor of shape [B, K], got ", index.scalar_type(), " ", shape_of(index));
  std::optional<Tensor> sizes;
  if (image_sizes.has_value()) {
    check_same_device(rel_codes, "rel_codes", *image_sizes, "image_sizes");
    FASTDET_CHECK(image_sizes->dim() == 2 && image_sizes->size(0) == B && image_sizes->size(1) == 2,
                  "image_sizes must have shape [B, 2] (height, width), got ", shape_of(*image_sizes));
    sizes = aten::contiguous(aten::to(*image_sizes, kDouble));  // on the device already: no host round trip
  }
  auto idx = aten::contiguous(index);
  if (idx.is_cpu()) {
    const int64_t* ip = idx.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < idx.numel(); ++i) {
      FASTDET_CHECK(ip[i] >= -1 && ip[i] < N, "index values must be in [-1, ", N, "), got ", ip[i]);
    }
  }
  return call_op<Tensor>("fastdet::_decode_select_boxes_kernel", aten::contiguous(rel_codes),
                         aten::contiguous(anchors), idx, sizes, weights, clip);
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_FRAGMENT(fastdet, m) {
  // torchvision BoxCoder.decode_single: rel_codes [R, 4C], boxes [Rb, 4] (row r decodes against box r % Rb).
  m.def("box_decode(Tensor rel_codes, Tensor boxes, float[] weights, float bbox_xform_clip) -> Tensor");
  m.def("_box_decode_backward(Tensor grad, Tensor rel_codes, Tensor boxes, float[] weights, float bbox_xform_clip) "
        "-> (Tensor, Tensor)");
  // torchvision BoxCoder.encode_single: reference_boxes [N, 4] encoded against proposals [N, 4].
  m.def("box_encode(Tensor reference_boxes, Tensor proposals, float[] weights) -> Tensor");
  // Gather + decode + clip of pre-selected candidates: rel_codes [B, N, 4], anchors [1 or B, N, 4], index [B, K]
  // (-1 = empty slot, written as a zero box), image_sizes [B, 2] (height, width) or None (no clipping). An index
  // outside [-1, N) is an error on the CPU; on CUDA (no host sync) that slot's box is NaN.
  m.def("_decode_select_boxes(Tensor rel_codes, Tensor anchors, Tensor index, Tensor? image_sizes, float[] weights, "
        "float bbox_xform_clip) -> Tensor");
  // Per-backend kernels (prepared arguments only, see box_coder.h).
  m.def("_box_decode_kernel(Tensor rel_codes, Tensor boxes, float[] weights, float bbox_xform_clip) -> Tensor");
  m.def("_box_decode_backward_kernel(Tensor grad, Tensor rel_codes, Tensor boxes, float[] weights, "
        "float bbox_xform_clip) -> (Tensor, Tensor)");
  m.def("_box_encode_kernel(Tensor reference_boxes, Tensor proposals, float[] weights) -> Tensor");
  m.def("_decode_select_boxes_kernel(Tensor rel_codes, Tensor anchors, Tensor index, Tensor? image_sizes, "
        "float[] weights, float bbox_xform_clip) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(fastdet, CompositeExplicitAutograd, m) {
  m.impl("box_decode", TORCH_BOX(&fastdet::box_decode));
  m.impl("_box_decode_backward", TORCH_BOX(&fastdet::box_decode_backward));
  m.impl("box_encode", TORCH_BOX(&fastdet::box_encode));
  m.impl("_decode_select_boxes", TORCH_BOX(&fastdet::decode_select_boxes));
}
