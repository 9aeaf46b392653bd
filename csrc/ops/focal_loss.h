#pragma once
// The sigmoid focal loss, float-target and integer-label forms. Public ops (schema file focal_loss.cpp):
// sigmoid_focal_loss and sigmoid_focal_loss_with_labels check their arguments once, compute the scale, and call the
// per-backend kernel
//   _sigmoid_focal_loss_kernel(inputs [rows, C], targets, scale?, scale_host, ignore_index, alpha, gamma, reduction,
//                              need_grad) -> (loss, grad)
// with
//   * inputs: contiguous logits in the caller's dtype (float16/bfloat16/float32/float64), viewed as [rows, C];
//   * targets: the float form's targets, contiguous [rows, 1] in the inputs' dtype (the float form is the label form
//     with C = 1 and the target read from memory), or the label form's labels, contiguous int64 [rows];
//   * scale: every loss term and every saved gradient is multiplied by one factor (1 / normalizer, times 1 / count
//     for 'mean'). When it depends on tensor values it is a 0-dim tensor of the accumulation dtype on the inputs'
//     device (read by the kernels: no host sync), otherwise None and the factor is scale_host;
//   * loss: [rows, C] ('none') or [] in the inputs' dtype; grad: [rows, C] in the inputs' dtype when need_grad, else
//     [0]. The composite views them back to the caller's shape.
#include <optional>

#include "ops/focal_loss_math.h"
#include "ops/loss_reduction.h"
#include "ops/stable.h"

namespace fastdet {

// The kernel op's arguments as the CPU and CUDA kernels read them, with the outputs allocated. No checks: the schema
// file has validated and laid out everything.
struct FocalKernelArgs {
  Tensor inputs;   // [rows, C]
  Tensor targets;  // [rows, 1] in the inputs' dtype, or int64 [rows] (with_labels)
  bool with_labels;
  int64_t rows;
  int64_t classes;
  int64_t ignore_index;  // label form only
  int64_t reduction;
  focal::Params<double> params;
  std::optional<Tensor> scale_tensor;  // 0-dim, accumulation dtype, inputs' device
  double scale;                        // the factor when scale_tensor is None
  Tensor loss;                         // [rows, C] ('none') or []
  Tensor grad;                         // [rows, C] when need_grad, else [0]
};

inline FocalKernelArgs focal_kernel_args(const Tensor& inputs, const Tensor& targets,
                                         const std::optional<Tensor>& scale, double scale_host, int64_t ignore_index,
                                         double alpha, double gamma, int64_t reduction, bool need_grad) {
  FocalKernelArgs a;
  a.inputs = inputs;
  a.targets = targets;
  a.with_labels = targets.scalar_type() == kLong;
  a.rows = inputs.size(0);
  a.classes = inputs.size(1);
  a.ignore_index = ignore_index;
  a.reduction = reduction;
  a.params = focal::Params<double>{alpha, gamma, focal::classify_gamma(gamma)};
  a.scale_tensor = scale;
  a.scale = scale_host;
  a.loss = reduction == kReduceNone ? aten::empty_like(inputs) : aten::empty({}, inputs.scalar_type(), inputs);
  a.grad = need_grad ? aten::empty_like(inputs) : aten::empty({0}, inputs.scalar_type(), inputs);
  return a;
}

}  // namespace fastdet
