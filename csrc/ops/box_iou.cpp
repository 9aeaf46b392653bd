// Schema of the pairwise IoU family (IoU, GIoU, DIoU, CIoU): argument checks and layout, written once for every
// backend; the kernels (cpu/box_iou.cpp, cuda/box_iou.cu) receive prepared tensors only.
#include "ops/box_iou.h"

#include "ops/box_iou_math.h"
#include "ops/checks.h"

namespace fastdet {
namespace {

struct PairwiseIouArgs {
  Tensor boxes1;  // [B, N, 4], contiguous, accumulation dtype
  Tensor boxes2;  // [B, M, 4]
  bool batched;   // the caller passed [B, N, 4]
};

PairwiseIouArgs prepare(const Tensor& boxes1, const Tensor& boxes2, int64_t variant) {
  FASTDET_CHECK(variant >= iou::kIoU && variant <= iou::kCIoU,
                "variant must be 0 (IoU), 1 (GIoU), 2 (DIoU) or 3 (CIoU), got ", variant);
  check_boxes(boxes1, "boxes1", /*allow_batched=*/true);
  check_boxes(boxes2, "boxes2", /*allow_batched=*/true);
  const bool batched = check_pairwise_sets(boxes1, boxes2, 4);
  const auto acc = accumulation_type(boxes1.scalar_type());
  auto b1 = batched ? boxes1 : aten::unsqueeze(boxes1, 0);
  auto b2 = batched ? boxes2 : aten::unsqueeze(boxes2, 0);
  return {aten::contiguous(aten::to(b1, acc)), aten::contiguous(aten::to(b2, acc)), batched};
}

Tensor pairwise_box_iou(const Tensor& boxes1, const Tensor& boxes2, int64_t variant, double eps) {
  auto args = prepare(boxes1, boxes2, variant);
  auto out = call_op<Tensor>("fastdet::_pairwise_box_iou_kernel", args.boxes1, args.boxes2, variant, eps);
  return args.batched ? out : aten::squeeze(out, 0);
}

std::tuple<Tensor, Tensor> pairwise_box_iou_backward(const Tensor& grad, const Tensor& boxes1, const Tensor& boxes2,
                                                     int64_t variant, double eps) {
  auto args = prepare(boxes1, boxes2, variant);
  const int64_t B = args.boxes1.size(0), N = args.boxes1.size(1), M = args.boxes2.size(1);
  FASTDET_CHECK(grad.numel() == B * N * M, "grad must have shape [", args.batched ? "B, " : "", "N, M] = ",
                shape_of(args.batched ? IntArrayRef({B, N, M}) : IntArrayRef({N, M})), ", got ", shape_of(grad));
  check_floating(grad, "grad");
  check_same_device(grad, "grad", boxes1, "boxes1");
  auto grad_acc = aten::contiguous(aten::reshape(aten::to(grad, args.boxes1.scalar_type()), {B, N, M}));
  auto [g1, g2] = call_op<std::tuple<Tensor, Tensor>>("fastdet::_pairwise_box_iou_backward_kernel", grad_acc,
                                                       args.boxes1, args.boxes2, variant, eps);
  if (!args.batched) {
    g1 = aten::squeeze(g1, 0);
    g2 = aten::squeeze(g2, 0);
  }
  return {aten::to(g1, boxes1.scalar_type()), aten::to(g2, boxes2.scalar_type())};
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_FRAGMENT(fastdet, m) {
  // variant: 0 IoU, 1 GIoU, 2 DIoU, 3 CIoU. eps is used by DIoU and CIoU only (torchvision's default is 1e-7).
  m.def("pairwise_box_iou(Tensor boxes1, Tensor boxes2, int variant, float eps) -> Tensor");
  m.def("_pairwise_box_iou_backward(Tensor grad, Tensor boxes1, Tensor boxes2, int variant, float eps) "
        "-> (Tensor, Tensor)");
  m.def("_pairwise_box_iou_kernel(Tensor boxes1, Tensor boxes2, int variant, float eps) -> Tensor");
  m.def("_pairwise_box_iou_backward_kernel(Tensor grad, Tensor boxes1, Tensor boxes2, int variant, float eps) "
        "-> (Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(fastdet, CompositeExplicitAutograd, m) {
  m.impl("pairwise_box_iou", TORCH_BOX(&fastdet::pairwise_box_iou));
  m.impl("_pairwise_box_iou_backward", TORCH_BOX(&fastdet::pairwise_box_iou_backward));
}
