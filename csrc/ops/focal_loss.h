#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

#include "ops/focal_loss_math.h"

namespace fastdet {

// Everything a backend needs for one focal-loss call, validated and laid out by prepare_focal_args (focal_loss.cpp),
// so the CPU and CUDA kernels share the checks and the meaning of every field.
struct FocalArgs {
  at::Tensor inputs;   // contiguous logits, the caller's dtype; viewed as [rows, classes]
  at::Tensor targets;  // float form: contiguous, same shape and dtype as inputs. label form: contiguous int64 [rows]
  bool with_labels;
  int64_t rows;
  int64_t classes;
  int64_t ignore_index;  // label form only
  int64_t reduction;
  focal::Params<double> params;
  // Every loss term and every saved gradient is multiplied by one factor: 1 / normalizer, times 1 / count for
  // 'mean'. When it depends on tensor values (a normalizer tensor, or the number of non-ignored labels) it is a 0-dim
  // tensor of the accumulation dtype on the inputs' device (scale_tensor, read by the kernels: no host sync);
  // otherwise it is the host number scale.
  at::Tensor scale_tensor;
  double scale;
  at::Tensor loss;  // [*inputs.shape] ('none') or [] in the inputs' dtype
  at::Tensor grad;  // [*inputs.shape] in the inputs' dtype when need_grad, else [0]
};

FocalArgs prepare_focal_args(const at::Tensor& inputs, const at::Tensor& targets, bool with_labels,
                             int64_t ignore_index, double alpha, double gamma, int64_t reduction,
                             const std::optional<at::Tensor>& normalizer, bool need_grad);

// float32 for float16/bfloat16/float32, float64 for float64.
inline at::ScalarType focal_accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace fastdet
