"""Sigmoid focal loss, forward + backward, on RetinaNet's classification logits (16 x 120k anchors x 80 classes; scaled
down on CPU), float32 and bfloat16, against torchvision.ops.sigmoid_focal_loss and the reference.

One timed call = the forward with ``reduction='sum'`` (RetinaNet sums, then divides by the foreground count) and
``torch.autograd.grad`` of the result with respect to the logits, i.e. what a training step pays for the loss.

Bytes recorded (for report.py's GB/s): the least traffic any forward-then-backward pair can have for the float-target
form: the forward reads logits and targets (2 passes), the backward writes the gradient (1) and needs what the
forward saw, either by re-reading logits and targets (2) or by reading a gradient the forward wrote (1 + 1): 5 passes
of ``numel * itemsize``. fastdet moves exactly that (the forward writes the scaled gradient, the backward multiplies
it by grad_output). The label form's minimum is 3 passes plus the labels (re-reading the logits in the backward);
fastdet moves 4 there, since its forward also writes the gradient.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.common import IMPLEMENTATIONS, cases, implementation

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def focal_inputs(case, dtype):
    g = torch.Generator().manual_seed(20)
    b, n, c = case.params["batch"], case.params["n"], case.params["classes"]
    # Typical RetinaNet statistics: ~0.1% foreground anchors, ~20% ignored, logits initialised around -4.6
    # (prior 0.01) and spread by training.
    labels = torch.randint(0, c, (b, n), generator=g)
    u = torch.rand(b, n, generator=g)
    labels = torch.where(u < 0.8, torch.full_like(labels, c), labels)  # background
    labels = torch.where((u >= 0.8) & (u < 0.999), torch.full_like(labels, -100), labels)  # ignored
    logits = (torch.randn(b, n, c, generator=g) * 2 - 4.6).to(case.device, dtype)
    labels = labels.to(case.device)
    return logits, labels


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("case", cases("focal_loss"))
def test_focal_loss_fwd_bwd(bench, case, dtype_name, impl):
    fn = implementation("sigmoid_focal_loss", impl, case)
    dtype = DTYPES[dtype_name]
    logits, labels = focal_inputs(case, dtype)
    c = logits.shape[-1]
    targets = torch.zeros_like(logits)
    positive = (labels >= 0) & (labels < c)
    targets[positive] = torch.nn.functional.one_hot(labels[positive], c).to(dtype)
    del labels
    logits.requires_grad_(True)

    def step():
        loss = fn(logits, targets, reduction="sum")
        return torch.autograd.grad(loss, logits)[0]

    bytes_moved = 5 * logits.numel() * logits.element_size()
    op = f"focal_loss_fwd_bwd_{dtype_name}"
    bench(step, op=op, case=case, impl=impl, bytes_moved=bytes_moved, dtype=dtype_name)


@pytest.mark.parametrize("impl", ["fastdet", "reference"])
@pytest.mark.parametrize("case", cases("focal_loss"))
def test_focal_loss_labels_fwd_bwd(bench, case, impl):
    fn = implementation("sigmoid_focal_loss_with_labels", impl, case)
    logits, labels = focal_inputs(case, torch.float32)
    logits.requires_grad_(True)
    num_fg = ((labels >= 0) & (labels < logits.shape[-1])).sum().clamp(min=1)

    def step():
        loss = fn(logits, labels, reduction="sum", normalizer=num_fg)
        return torch.autograd.grad(loss, logits)[0]

    bytes_moved = 3 * logits.numel() * logits.element_size() + labels.numel() * labels.element_size()
    bench(step, op="focal_loss_labels_fwd_bwd_fp32", case=case, impl=impl, bytes_moved=bytes_moved, dtype="fp32")
