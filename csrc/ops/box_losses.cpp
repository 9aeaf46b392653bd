// Schema of the aligned-pair IoU losses (GIoU, DIoU, CIoU): argument checks and layout, written once for every
// backend; the kernels (cpu/box_losses.cpp, cuda/box_losses.cu) receive prepared tensors only.
#include "ops/box_losses.h"

#include <cmath>
#include <tuple>
#include <vector>

#include "ops/box_loss_math.h"
#include "ops/checks.h"
#include "ops/loss_reduction.h"

namespace fastdet {
namespace {

struct BoxPairLossArgs {
  Tensor boxes1;  // [P, 4], contiguous, accumulation dtype
  Tensor boxes2;  // [P, 4]
  int64_t pairs;
};

BoxPairLossArgs prepare(const Tensor& boxes1, const Tensor& boxes2, int64_t variant, int64_t reduction, double eps) {
  FASTDET_CHECK(variant >= boxloss::kGIoU && variant <= boxloss::kCIoU,
                "variant must be 1 (GIoU), 2 (DIoU) or 3 (CIoU), got ", variant);
  check_reduction(reduction);
  FASTDET_CHECK(std::isfinite(eps) && eps >= 0.0, "eps must be a finite number >= 0, got ", eps);
  check_floating(boxes1, "boxes1");
  check_floating(boxes2, "boxes2");
  check_same_device(boxes1, "boxes1", boxes2, "boxes2");
  check_same_dtype(boxes1, "boxes1", boxes2, "boxes2");
  FASTDET_CHECK(boxes1.dim() >= 1 && boxes1.size(-1) == 4, "boxes1 must have shape [..., 4] (x1, y1, x2, y2), got ",
                shape_of(boxes1));
  FASTDET_CHECK(shape_of(boxes1).dims == shape_of(boxes2).dims,
                "boxes1 and boxes2 must have the same shape [..., 4], got ", shape_of(boxes1), " and ",
                shape_of(boxes2));
  const auto acc = accumulation_type(boxes1.scalar_type());
  const int64_t pairs = boxes1.numel() / 4;
  return {aten::contiguous(aten::reshape(aten::to(boxes1, acc), {pairs, 4})),
          aten::contiguous(aten::reshape(aten::to(boxes2, acc), {pairs, 4})), pairs};
}

// Shape of the 'none' loss: the boxes' shape without the last dimension.
std::vector<int64_t> loss_shape(const Tensor& boxes) {
  auto s = shape_of(boxes).dims;
  s.pop_back();
  return s;
}

Tensor box_pair_loss(const Tensor& boxes1, const Tensor& boxes2, int64_t variant, int64_t reduction, double eps) {
  const auto args = prepare(boxes1, boxes2, variant, reduction, eps);
  auto out = call_op<Tensor>("fastdet::_box_pair_loss_kernel", args.boxes1, args.boxes2, variant, reduction, eps);
  if (reduction == kReduceNone) {
    const auto shape = loss_shape(boxes1);
    out = aten::reshape(out, IntArrayRef(shape.data(), shape.size()));
  }
  return out;
}

std::tuple<Tensor, Tensor> box_pair_loss_backward(const Tensor& grad, const Tensor& boxes1, const Tensor& boxes2,
                                                  int64_t variant, int64_t reduction, double eps) {
  const auto args = prepare(boxes1, boxes2, variant, reduction, eps);
  const int64_t P = args.pairs;
  FASTDET_CHECK(reduction == kReduceNone ? grad.numel() == P : grad.numel() == 1, "grad must have shape ",
                reduction == kReduceNone ? "[...] (the loss' shape)" : "[] (a reduced loss)", ", got ",
                shape_of(grad));
  check_same_device(grad, "grad", boxes1, "boxes1");
  const auto g = aten::contiguous(aten::reshape(aten::to(grad, args.boxes1.scalar_type()), {grad.numel()}));
  auto [g1, g2] = call_op<std::tuple<Tensor, Tensor>>("fastdet::_box_pair_loss_backward_kernel", g, args.boxes1,
                                                       args.boxes2, variant, reduction, eps);
  return {aten::to(aten::reshape(g1, boxes1.sizes()), boxes1.scalar_type()),
          aten::to(aten::reshape(g2, boxes2.sizes()), boxes2.scalar_type())};
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_FRAGMENT(fastdet, m) {
  // variant: 1 GIoU, 2 DIoU, 3 CIoU; reduction: 0 none, 1 mean (0 for no pairs, as torchvision), 2 sum.
  m.def("box_pair_loss(Tensor boxes1, Tensor boxes2, int variant, int reduction, float eps) -> Tensor");
  m.def("_box_pair_loss_backward(Tensor grad, Tensor boxes1, Tensor boxes2, int variant, int reduction, float eps) "
        "-> (Tensor, Tensor)");
  // Per-backend kernels (arguments prepared by the public ops, see box_losses.h): boxes [P, 4] contiguous in the
  // accumulation dtype; the loss is [P] ('none') or []; grad is [P] ('none') or [1] in that dtype.
  m.def("_box_pair_loss_kernel(Tensor boxes1, Tensor boxes2, int variant, int reduction, float eps) -> Tensor");
  m.def("_box_pair_loss_backward_kernel(Tensor grad, Tensor boxes1, Tensor boxes2, int variant, int reduction, "
        "float eps) -> (Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(fastdet, CompositeExplicitAutograd, m) {
  m.impl("box_pair_loss", TORCH_BOX(&fastdet::box_pair_loss));
  m.impl("_box_pair_loss_backward", TORCH_BOX(&fastdet::box_pair_loss_backward));
}
