// Schema of the aligned-pair IoU losses (GIoU, DIoU, CIoU) and the argument checks every backend shares.
#include "ops/box_losses.h"

#include <torch/library.h>

#include <cmath>

#include "ops/box_loss_math.h"
#include "ops/checks.h"
#include "ops/loss_reduction.h"

namespace fastdet {

BoxPairLossArgs prepare_box_pair_loss_args(const at::Tensor& boxes1, const at::Tensor& boxes2, int64_t variant,
                                           int64_t reduction, double eps) {
  TORCH_CHECK(variant >= boxloss::kGIoU && variant <= boxloss::kCIoU,
              "variant must be 1 (GIoU), 2 (DIoU) or 3 (CIoU), got ", variant);
  check_reduction(reduction);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0.0, "eps must be a finite number >= 0, got ", eps);
  check_floating(boxes1, "boxes1");
  check_floating(boxes2, "boxes2");
  check_same_device(boxes1, "boxes1", boxes2, "boxes2");
  check_same_dtype(boxes1, "boxes1", boxes2, "boxes2");
  TORCH_CHECK(boxes1.dim() >= 1 && boxes1.size(-1) == 4, "boxes1 must have shape [..., 4] (x1, y1, x2, y2), got ",
              boxes1.sizes());
  TORCH_CHECK(boxes1.sizes() == boxes2.sizes(), "boxes1 and boxes2 must have the same shape [..., 4], got ",
              boxes1.sizes(), " and ", boxes2.sizes());
  const auto acc = boxes1.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t pairs = boxes1.numel() / 4;
  return {boxes1.to(acc).reshape({pairs, 4}).contiguous(), boxes2.to(acc).reshape({pairs, 4}).contiguous(), pairs};
}

}  // namespace fastdet

TORCH_LIBRARY_FRAGMENT(fastdet, m) {
  // variant: 1 GIoU, 2 DIoU, 3 CIoU; reduction: 0 none, 1 mean (0 for no pairs, as torchvision), 2 sum.
  m.def("box_pair_loss(Tensor boxes1, Tensor boxes2, int variant, int reduction, float eps) -> Tensor");
  m.def("_box_pair_loss_backward(Tensor grad, Tensor boxes1, Tensor boxes2, int variant, int reduction, float eps) "
        "-> (Tensor, Tensor)");
}
