#pragma once
#include <ATen/core/Tensor.h>

namespace fastdet {

// Validated arguments of box_pair_loss / its backward: both boxes as contiguous [P, 4] tensors of the accumulation
// dtype (float32 for float16/bfloat16/float32, float64 for float64), with P the number of aligned pairs.
struct BoxPairLossArgs {
  at::Tensor boxes1;  // [P, 4]
  at::Tensor boxes2;  // [P, 4]
  int64_t pairs;
};
BoxPairLossArgs prepare_box_pair_loss_args(const at::Tensor& boxes1, const at::Tensor& boxes2, int64_t variant,
                                           int64_t reduction, double eps);

// Shape of the 'none' loss: the boxes' shape without the last dimension.
inline std::vector<int64_t> box_pair_loss_shape(const at::Tensor& boxes) {
  auto s = boxes.sizes().vec();
  s.pop_back();
  return s;
}

}  // namespace fastdet
