// Schema of box_iou_rotated: argument checks and layout, written once for every backend; the kernels
// (cpu/box_iou_rotated.cpp, cuda/box_iou_rotated.cu) receive prepared tensors only.
#include "ops/checks.h"
#include "ops/rotated.h"

namespace fastdet {
namespace {

// IoU of every pair of rotated boxes, [N, 5] x [M, 5] -> [N, M] or [B, N, 5] x [B, M, 5] -> [B, N, M]; float32
// whatever the input dtype (as torchvision's box_iou_rotated), computed in float64 for float64 boxes.
Tensor box_iou_rotated(const Tensor& boxes1, const Tensor& boxes2) {
  check_rotated_boxes(boxes1, "boxes1", /*allow_batched=*/true);
  check_rotated_boxes(boxes2, "boxes2", /*allow_batched=*/true);
  const bool batched = check_pairwise_sets(boxes1, boxes2, 5);
  const auto compute = accumulation_type(boxes1.scalar_type());
  auto b1 = aten::contiguous(aten::to(batched ? boxes1 : aten::unsqueeze(boxes1, 0), compute));
  auto b2 = aten::contiguous(aten::to(batched ? boxes2 : aten::unsqueeze(boxes2, 0), compute));
  auto out = call_op<Tensor>("fastdet::_box_iou_rotated_kernel", b1, b2);
  return batched ? out : aten::squeeze(out, 0);
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_FRAGMENT(fastdet, m) {
  m.def("box_iou_rotated(Tensor boxes1, Tensor boxes2) -> Tensor");
  m.def("_box_iou_rotated_kernel(Tensor boxes1, Tensor boxes2) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(fastdet, CompositeExplicitAutograd, m) {
  m.impl("box_iou_rotated", TORCH_BOX(&fastdet::box_iou_rotated));
}
