// Schema of the pairwise IoU family (IoU, GIoU, DIoU, CIoU) and the argument checks every backend shares.
#include "ops/box_iou.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "ops/box_iou_math.h"
#include "ops/checks.h"

namespace fastdet {

at::ScalarType pairwise_iou_result_type(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

PairwiseIouArgs prepare_pairwise_iou_args(const at::Tensor& boxes1, const at::Tensor& boxes2, int64_t variant) {
  TORCH_CHECK(variant >= iou::kIoU && variant <= iou::kCIoU,
              "variant must be 0 (IoU), 1 (GIoU), 2 (DIoU) or 3 (CIoU), got ", variant);
  check_boxes(boxes1, "boxes1", /*allow_batched=*/true);
  check_boxes(boxes2, "boxes2", /*allow_batched=*/true);
  check_same_device(boxes1, "boxes1", boxes2, "boxes2");
  check_same_dtype(boxes1, "boxes1", boxes2, "boxes2");
  TORCH_CHECK(boxes1.dim() == boxes2.dim(), "boxes1 and boxes2 must both be [N, 4] / [M, 4] or both be batched ",
              "[B, N, 4] / [B, M, 4], got ", boxes1.sizes(), " and ", boxes2.sizes());
  const bool batched = boxes1.dim() == 3;
  if (batched) {
    TORCH_CHECK(boxes1.size(0) == boxes2.size(0), "boxes1 and boxes2 must have the same batch size B, got ",
                boxes1.size(0), " and ", boxes2.size(0));
  }
  const auto acc = pairwise_iou_result_type(boxes1.scalar_type());
  auto b1 = batched ? boxes1 : boxes1.unsqueeze(0);
  auto b2 = batched ? boxes2 : boxes2.unsqueeze(0);
  return {b1.to(acc).contiguous(), b2.to(acc).contiguous(), batched};
}

}  // namespace fastdet

TORCH_LIBRARY_FRAGMENT(fastdet, m) {
  // variant: 0 IoU, 1 GIoU, 2 DIoU, 3 CIoU. eps is used by DIoU and CIoU only (torchvision's default is 1e-7).
  m.def("pairwise_box_iou(Tensor boxes1, Tensor boxes2, int variant, float eps) -> Tensor");
  m.def("_pairwise_box_iou_backward(Tensor grad, Tensor boxes1, Tensor boxes2, int variant, float eps) "
        "-> (Tensor, Tensor)");
}
