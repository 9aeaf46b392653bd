#pragma once
#include <ATen/core/Tensor.h>

namespace fastdet {

// Validates the arguments of pairwise_box_iou / its backward and returns them as contiguous [B, N, 4] / [B, M, 4]
// tensors of the accumulation dtype (float32 for float16/bfloat16/float32, float64 for float64).
struct PairwiseIouArgs {
  at::Tensor boxes1;  // [B, N, 4]
  at::Tensor boxes2;  // [B, M, 4]
  bool batched;       // the caller passed [B, N, 4]
};
PairwiseIouArgs prepare_pairwise_iou_args(const at::Tensor& boxes1, const at::Tensor& boxes2, int64_t variant);

// dtype of the IoU matrix: float32 for low-precision inputs (as torchvision), the input dtype otherwise.
at::ScalarType pairwise_iou_result_type(at::ScalarType input);

}  // namespace fastdet
