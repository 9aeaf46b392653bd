// Schema of the sigmoid focal loss (float-target and integer-label forms): argument checks, layout and the scale,
// written once for every backend; the kernels (cpu/focal_loss.cpp, cuda/focal_loss.cu) receive prepared tensors only.
#include "ops/focal_loss.h"

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "ops/checks.h"
#include "ops/loss_reduction.h"

namespace fastdet {
namespace {

// The kernel op's tensor arguments (see focal_loss.h).
struct FocalPrepared {
  Tensor inputs;                // [rows, C], contiguous, the caller's dtype
  Tensor targets;               // [rows, 1] in the inputs' dtype, or int64 [rows]
  std::optional<Tensor> scale;  // 0-dim, accumulation dtype, inputs' device; None: scale_host
  double scale_host;
};

bool is_complex(ScalarType t) {
  return t == ScalarType::ComplexHalf || t == ScalarType::ComplexFloat || t == ScalarType::ComplexDouble;
}

// A 0-dim int64 CPU tensor holding v exactly. Ops on any device read a 0-dim CPU operand on the host (no copy, no
// sync), as they do a Python number.
Tensor cpu_long_scalar(int64_t v) {
  Tensor t = torch::stable::empty({}, kLong, std::nullopt, Device(torch::headeronly::DeviceType::CPU));
  *t.mutable_data_ptr<int64_t>() = v;
  return t;
}

FocalPrepared prepare_focal(const Tensor& inputs, const Tensor& targets, bool with_labels, int64_t ignore_index,
                            double alpha, double gamma, int64_t reduction, const std::optional<Tensor>& normalizer) {
  const char* in_name = with_labels ? "logits" : "inputs";
  check_floating(inputs, in_name);
  check_reduction(reduction);
  FASTDET_CHECK(!std::isnan(alpha) && alpha <= 1.0, "alpha must be in [0, 1], or negative to disable the alpha ",
                "weighting, got ", alpha);
  FASTDET_CHECK(std::isfinite(gamma) && gamma >= 0.0, "gamma must be a finite number >= 0, got ", gamma);
  FocalPrepared p;
  int64_t rows = 0, classes = 0;
  if (with_labels) {
    FASTDET_CHECK(inputs.dim() >= 1, "logits must have shape [..., C] (C classes), got a 0-dim tensor");
    FASTDET_CHECK(is_integral(targets.scalar_type(), /*include_bool=*/false),
                  "labels must be an integer tensor (class index, C or -1 for background, ignore_index to ignore), ",
                  "got ", targets.scalar_type());
    Shape lead = shape_of(inputs);
    lead.dims.pop_back();
    FASTDET_CHECK(shape_of(targets).dims == lead.dims, "labels must have shape ", lead,
                  " (logits' shape without the class dimension), got ", shape_of(targets));
    check_same_device(inputs, "logits", targets, "labels");
    classes = inputs.size(-1);
    rows = targets.numel();
    p.targets = aten::reshape(aten::contiguous(aten::to(targets, kLong)), {rows});
  } else {
    check_floating(targets, "targets");
    FASTDET_CHECK(shape_of(targets).dims == shape_of(inputs).dims, "targets must have the shape of inputs ",
                  shape_of(inputs), ", got ", shape_of(targets));
    check_same_device(inputs, "inputs", targets, "targets");
    classes = 1;
    rows = inputs.numel();
    // Targets are read in the inputs' dtype (exact for 0/1 targets; soft targets round once to that dtype).
    p.targets = aten::reshape(aten::contiguous(aten::to(targets, inputs.scalar_type())), {rows, 1});
  }
  p.inputs = aten::reshape(aten::contiguous(inputs), {rows, classes});

  const auto acc = accumulation_type(inputs.scalar_type());
  p.scale_host = 1.0;
  std::optional<Tensor> norm;
  if (normalizer.has_value() && normalizer->defined()) {
    const Tensor& n = *normalizer;
    FASTDET_CHECK(n.numel() == 1, "normalizer must hold exactly one number, got shape ", shape_of(n));
    FASTDET_CHECK(!is_complex(n.scalar_type()) && n.scalar_type() != kBool, "normalizer must be a real number, got ",
                  n.scalar_type());
    // A one-element tensor on the inputs' device, or a CPU tensor (copied to the device, no host sync), is accepted.
    // A device tensor with CPU inputs is refused rather than synchronised.
    FASTDET_CHECK(n.device() == inputs.device() || n.is_cpu(), "normalizer must be on the device of ", in_name, " (",
                  device_of(inputs), ") or on the CPU, got ", device_of(n));
    // non_blocking: a host-to-device copy from pageable memory is staged before cudaMemcpyAsync returns, so it needs
    // no stream synchronisation (a blocking copy would synchronise, which the docs promise never happens).
    norm = torch::stable::to(aten::reshape(n, {}), acc, std::nullopt, inputs.device(), std::nullopt,
                             /*non_blocking=*/true);
  }
  if (reduction == kReduceMean) {
    if (with_labels) {
      // Mean over the non-ignored elements: sum / (valid rows * C). With no valid row the loss and its gradient are 0
      // (not 0/0), so a batch whose anchors are all ignored contributes nothing instead of NaN.
      const Tensor valid_rows = aten::sum(aten::ne(p.targets, cpu_long_scalar(ignore_index)), 0);
      const Tensor valid =
          aten::mul(aten::to(valid_rows, acc), aten::full({}, static_cast<double>(classes), acc, inputs));
      const Tensor zero = aten::zeros({}, acc, inputs);
      const Tensor inv = aten::where(aten::eq(valid, zero), zero, aten::reciprocal(valid));
      p.scale = norm.has_value() ? aten::div(inv, *norm) : inv;
    } else {
      // torchvision's mean: over every element, N * C for [N, C] inputs (mmcv divides by N instead). An empty input
      // gives 0 * (1 / 0) = NaN, as torch's mean of an empty tensor does.
      p.scale_host = 1.0 / static_cast<double>(inputs.numel());
      if (norm.has_value()) {
        p.scale = aten::mul(aten::reciprocal(*norm), aten::full({}, p.scale_host, acc, inputs));
      }
    }
  } else if (norm.has_value()) {
    p.scale = aten::reciprocal(*norm);
  }
  return p;
}

// Calls the kernel and views its [rows, C] outputs as the caller's shape.
std::tuple<Tensor, Tensor> run(const Tensor& inputs, const FocalPrepared& p, int64_t ignore_index, double alpha,
                               double gamma, int64_t reduction, bool need_grad) {
  auto [loss, grad] = call_op<std::tuple<Tensor, Tensor>>("fastdet::_sigmoid_focal_loss_kernel", p.inputs, p.targets,
                                                           p.scale, p.scale_host, ignore_index, alpha, gamma,
                                                           reduction, need_grad);
  if (reduction == kReduceNone) loss = aten::reshape(loss, inputs.sizes());
  if (need_grad) grad = aten::reshape(grad, inputs.sizes());
  return {loss, grad};
}

std::tuple<Tensor, Tensor> sigmoid_focal_loss(const Tensor& inputs, const Tensor& targets, double alpha, double gamma,
                                              int64_t reduction, const std::optional<Tensor>& normalizer,
                                              bool need_grad) {
  const auto p = prepare_focal(inputs, targets, /*with_labels=*/false, 0, alpha, gamma, reduction, normalizer);
  return run(inputs, p, 0, alpha, gamma, reduction, need_grad);
}

std::tuple<Tensor, Tensor> sigmoid_focal_loss_with_labels(const Tensor& logits, const Tensor& labels,
                                                          int64_t ignore_index, double alpha, double gamma,
                                                          int64_t reduction, const std::optional<Tensor>& normalizer,
                                                          bool need_grad) {
  const auto p = prepare_focal(logits, labels, /*with_labels=*/true, ignore_index, alpha, gamma, reduction, normalizer);
  if (p.targets.is_cpu()) {
    // Labels are ~1/C of the data, and on the CPU reading them costs no sync: check them here so the kernels have no
    // error path. CUDA cannot raise without a host sync; its kernel makes a bad label's row NaN instead.
    const int64_t classes = p.inputs.size(1);
    const int64_t rows = p.targets.numel();
    const int64_t* lab = p.targets.const_data_ptr<int64_t>();
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t v = lab[r];
      FASTDET_CHECK(v == ignore_index || (v >= -1 && v <= classes), "labels must be in [0, C) for a class, -1 or C = ",
                    classes, " for background, or ignore_index = ", ignore_index, "; got ", v, " at flat index ", r);
    }
  }
  return run(logits, p, ignore_index, alpha, gamma, reduction, need_grad);
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_FRAGMENT(fastdet, m) {
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
  // The per-backend kernel of both forms (arguments prepared by the public ops, see focal_loss.h): inputs [rows, C];
  // targets [rows, 1] in the inputs' dtype (float form) or int64 [rows] (label form); every term times scale (a
  // 0-dim tensor) or, when scale is None, scale_host. Returns loss [rows, C] or [], and grad [rows, C] or [0].
  m.def("_sigmoid_focal_loss_kernel(Tensor inputs, Tensor targets, Tensor? scale, float scale_host, int ignore_index, "
        "float alpha, float gamma, int reduction, bool need_grad) -> (Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(fastdet, CompositeExplicitAutograd, m) {
  m.impl("sigmoid_focal_loss", TORCH_BOX(&fastdet::sigmoid_focal_loss));
  m.impl("sigmoid_focal_loss_with_labels", TORCH_BOX(&fastdet::sigmoid_focal_loss_with_labels));
}
