// Schema of the sigmoid focal loss (float-target and integer-label forms) and the argument checks every backend shares.
#include "ops/focal_loss.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/eq.h>
#include <ATen/ops/ne.h>
#include <ATen/ops/reciprocal.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>

#include "ops/checks.h"
#include "ops/loss_reduction.h"

namespace fastdet {

FocalArgs prepare_focal_args(const at::Tensor& inputs, const at::Tensor& targets, bool with_labels,
                             int64_t ignore_index, double alpha, double gamma, int64_t reduction,
                             const std::optional<at::Tensor>& normalizer, bool need_grad) {
  const char* in_name = with_labels ? "logits" : "inputs";
  check_floating(inputs, in_name);
  check_reduction(reduction);
  TORCH_CHECK(!std::isnan(alpha) && alpha <= 1.0, "alpha must be in [0, 1], or negative to disable the alpha ",
              "weighting, got ", alpha);
  TORCH_CHECK(std::isfinite(gamma) && gamma >= 0.0, "gamma must be a finite number >= 0, got ", gamma);
  FocalArgs a;
  a.with_labels = with_labels;
  a.ignore_index = ignore_index;
  a.reduction = reduction;
  a.params = focal::Params<double>{alpha, gamma, focal::classify_gamma(gamma)};
  a.inputs = inputs.contiguous();
  if (with_labels) {
    TORCH_CHECK(inputs.dim() >= 1, "logits must have shape [..., C] (C classes), got a 0-dim tensor");
    TORCH_CHECK(at::isIntegralType(targets.scalar_type(), /*includeBool=*/false),
                "labels must be an integer tensor (class index, C or -1 for background, ignore_index to ignore), got ",
                targets.scalar_type());
    TORCH_CHECK(targets.sizes() == inputs.sizes().slice(0, inputs.dim() - 1), "labels must have shape ",
                inputs.sizes().slice(0, inputs.dim() - 1), " (logits' shape without the class dimension), got ",
                targets.sizes());
    check_same_device(inputs, "logits", targets, "labels");
    a.classes = inputs.size(-1);
    a.rows = a.classes == 0 ? targets.numel() : inputs.numel() / a.classes;
    a.targets = targets.to(at::kLong).contiguous();
  } else {
    check_floating(targets, "targets");
    TORCH_CHECK(targets.sizes() == inputs.sizes(), "targets must have the shape of inputs ", inputs.sizes(),
                ", got ", targets.sizes());
    check_same_device(inputs, "inputs", targets, "targets");
    a.classes = 1;
    a.rows = inputs.numel();
    // Targets are read in the inputs' dtype (exact for 0/1 targets; soft targets round once to that dtype).
    a.targets = targets.to(inputs.scalar_type()).contiguous();
  }

  const auto acc = focal_accumulate_type(inputs.scalar_type());
  const auto acc_opts = inputs.options().dtype(acc);
  a.scale = 1.0;
  at::Tensor norm;
  if (normalizer.has_value() && normalizer->defined()) {
    const auto& n = *normalizer;
    TORCH_CHECK(n.numel() == 1, "normalizer must hold exactly one number, got shape ", n.sizes());
    TORCH_CHECK(!n.is_complex() && n.scalar_type() != at::kBool, "normalizer must be a real number, got ",
                n.scalar_type());
    // A one-element tensor on the inputs' device, or a CPU tensor (copied to the device, no host sync), is accepted.
    // A device tensor with CPU inputs is refused rather than synchronised (the dispatcher would also route that call
    // to the CUDA kernel).
    TORCH_CHECK(n.device() == inputs.device() || n.is_cpu(), "normalizer must be on the device of ", in_name, " (",
                inputs.device(), ") or on the CPU, got ", n.device());
    norm = n.reshape({}).to(inputs.device(), acc);
  }
  if (reduction == kReduceMean) {
    if (with_labels) {
      // Mean over the non-ignored elements: sum / (valid rows * C). With no valid row the loss and its gradient are 0
      // (not 0/0), so a batch whose anchors are all ignored contributes nothing instead of NaN.
      auto valid = at::ne(a.targets, ignore_index).sum().to(acc).mul_(static_cast<double>(a.classes));
      auto inv = at::where(valid.eq(0), at::zeros({}, acc_opts), at::reciprocal(valid));
      a.scale_tensor = norm.defined() ? inv.div_(norm) : inv;
    } else {
      // torchvision's mean: over every element, N * C for [N, C] inputs (mmcv divides by N instead). An empty input
      // gives 0 * (1 / 0) = NaN, as torch's mean of an empty tensor does.
      a.scale = 1.0 / static_cast<double>(inputs.numel());
      if (norm.defined()) {
        a.scale_tensor = at::reciprocal(norm).mul_(a.scale);
      }
    }
  } else if (norm.defined()) {
    a.scale_tensor = at::reciprocal(norm);
  }

  a.loss = reduction == kReduceNone ? at::empty_like(a.inputs) : at::empty({}, inputs.options());
  a.grad = need_grad ? at::empty_like(a.inputs) : at::empty({0}, inputs.options());
  return a;
}

}  // namespace fastdet

TORCH_LIBRARY_FRAGMENT(fastdet, m) {
  // Returns (loss, grad). grad is d loss / d inputs for a unit upstream gradient, produced in the same pass as the
  // loss when need_grad (else an empty [0] tensor); the autograd backward only scales it by the upstream gradient.
  // reduction: 0 none, 1 mean, 2 sum. alpha < 0 disables the alpha weighting.
  m.def("sigmoid_focal_loss(Tensor inputs, Tensor targets, float alpha, float gamma, int reduction, "
        "Tensor? normalizer, bool need_grad) -> (Tensor, Tensor)");
  // Integer labels [...] for logits [..., C]: label c in [0, C) is the positive class, -1 or C is background (all C
  // targets 0), ignore_index contributes neither loss nor gradient; any other label is an error (CPU) or gives NaN
  // for that row (CUDA, which cannot raise without a host sync).
  m.def("sigmoid_focal_loss_with_labels(Tensor logits, Tensor labels, int ignore_index, float alpha, float gamma, "
        "int reduction, Tensor? normalizer, bool need_grad) -> (Tensor, Tensor)");
}
