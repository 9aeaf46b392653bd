"""Detection losses: sigmoid focal loss (float-target and integer-label forms), smooth L1, and the GIoU / DIoU / CIoU
losses of aligned box pairs.

Every loss takes ``reduction`` = ``'none'`` | ``'mean'`` | ``'sum'`` and reduces on the device: no call synchronises
with the host, and reduced values are summed in a fixed order (bitwise reproducible from run to run on one backend;
CPU and CUDA agree to rounding).

**What ``'mean'`` divides by.** torchvision's :func:`torchvision.ops.sigmoid_focal_loss` (and fastdet's) averages over
*every element*, i.e. divides the sum by ``N * C`` for ``[N, C]`` logits. mmcv's ``sigmoid_focal_loss`` with
``reduction='mean'`` divides by ``N`` (the number of rows), a factor ``C`` larger; mmdet/RetinaNet practice divides the
sum by the number of foreground anchors. Use ``reduction='sum', normalizer=...`` for those:
``normalizer=logits.shape[0]`` reproduces mmcv's mean, ``normalizer=num_foreground.clamp(min=1)`` RetinaNet's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdet.ops._registry import autocast_float32, native, register_autocast, register_autograd, register_fake

__all__ = [
    "ciou_loss",
    "complete_box_iou_loss",
    "diou_loss",
    "distance_box_iou_loss",
    "generalized_box_iou_loss",
    "giou_loss",
    "sigmoid_focal_loss",
    "sigmoid_focal_loss_with_labels",
    "smooth_l1_loss",
]

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
_GIOU, _DIOU, _CIOU = 1, 2, 3


def _reduction_code(reduction: str) -> int:
    try:
        return _REDUCTIONS[reduction]
    except (KeyError, TypeError):
        raise ValueError(f"reduction must be one of 'none', 'mean', 'sum', got {reduction!r}") from None


def _check_tensor(t, name: str, *, floating: bool = True) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _check_focal_params(alpha, gamma) -> tuple[float, float]:
    alpha, gamma = float(alpha), float(gamma)
    if alpha != alpha or alpha > 1:  # NaN (no math.isnan: symbolic floats trace through a comparison)
        raise ValueError(f"alpha must be in [0, 1], or negative to disable the alpha weighting, got {alpha}")
    if not 0 <= gamma < math.inf:
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma}")
    return alpha, gamma


def _normalizer_tensor(normalizer, like: Tensor):
    """None, a Python number or a one-element tensor -> None or a one-element tensor. A tensor is used as is
    (detached: the normaliser is a count, not a learned quantity), so computing it on the device costs no sync."""
    if normalizer is None:
        return None
    if isinstance(normalizer, Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer must hold exactly one number, got shape {tuple(normalizer.shape)}")
        if normalizer.is_complex() or normalizer.dtype == torch.bool:
            raise TypeError(f"normalizer must be a real number, got dtype {normalizer.dtype}")
        if normalizer.device != like.device and normalizer.device.type != "cpu":
            raise ValueError(f"normalizer must be on the device of the logits ({like.device}) or on the CPU, got "
                             f"{normalizer.device}")
        return normalizer.detach()
    if isinstance(normalizer, bool) or not isinstance(normalizer, (int, float)):
        raise TypeError(f"normalizer must be None, a number or a one-element tensor, got {type(normalizer).__name__}")
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return torch.full((), float(normalizer), dtype=dtype, device=like.device)


def _grad_needed(t: Tensor) -> bool:
    return torch.is_grad_enabled() and t.requires_grad


# --------------------------------------------------------------------------------------------------------------------
# sigmoid focal loss
# --------------------------------------------------------------------------------------------------------------------


def sigmoid_focal_loss(
    inputs: Tensor,
    targets: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
    normalizer: Tensor | float | None = None,
) -> Tensor:
    """Sigmoid focal loss (RetinaNet, https://arxiv.org/abs/1708.02002) with torchvision's semantics, fused.

    ``loss = a_t * BCE_with_logits(inputs, targets) * (1 - p_t) ** gamma`` with ``p = sigmoid(inputs)``,
    ``p_t = p * t + (1 - p) * (1 - t)``, ``a_t = alpha * t + (1 - alpha) * (1 - t)``.

    Args:
        inputs (Tensor[...]): logits, any shape, float16/bfloat16/float32/float64.
        targets (Tensor[...]): float targets of the same shape (0/1 one-hot, or soft targets in [0, 1]); read in the
            dtype of ``inputs`` (torchvision promotes instead). To pass integer class labels without building the
            one-hot tensor use :func:`sigmoid_focal_loss_with_labels`.
        alpha (float): weight of the positive class in [0, 1]; any negative value disables the weighting
            (torchvision accepts only -1 for that). Default 0.25.
        gamma (float): focusing exponent >= 0. Default 2.
        reduction (str): ``'none'`` (per-element loss, shape of ``inputs``), ``'mean'`` (sum / number of elements,
            i.e. ``N * C`` for ``[N, C]`` inputs, as torchvision; mmcv divides by ``N``: see the module docstring) or
            ``'sum'``.
        normalizer (Tensor[1] or number, optional): the result (and its gradient) is divided by it after the
            reduction, e.g. the number of foreground anchors. A tensor is read on the device (no host sync) and
            treated as a constant. It is used as given: clamp it yourself (``n.clamp(min=1)``); 0 gives inf/NaN.

    Returns:
        Tensor: the loss in the dtype of ``inputs`` (``[...]`` for ``'none'``, ``[]`` otherwise). Terms are computed
        and summed in float32 (float64 for float64 inputs) and rounded once.

    One pass over memory: when ``inputs`` requires grad, the kernel that computes the loss also writes
    ``d loss / d inputs`` (in the dtype of ``inputs``); the backward only multiplies it by the upstream gradient.
    Not twice differentiable. ``targets`` that require grad are differentiated through the composite reference
    instead (slower, same values).

    Non-finite logits give the mathematical limit instead of torchvision's NaN: ``+inf`` gives loss 0 for target 1
    and ``+inf`` for target 0 (``-inf``: ``+inf`` and 0), with finite gradients (0, ``1 - alpha``, ``-alpha``, 0); with
    ``alpha`` 0 or 1, the side weighted by 0 has loss 0 at infinite logits too. NaN
    logits or targets give NaN for that element (and for a reduced loss). An empty input gives an empty loss, 0 for
    ``'sum'`` and NaN for ``'mean'``, as torch's mean of nothing.
    """
    _check_tensor(inputs, "inputs")
    _check_tensor(targets, "targets")
    red = _reduction_code(reduction)
    alpha, gamma = _check_focal_params(alpha, gamma)
    if targets.shape != inputs.shape:
        raise ValueError(f"targets must have the shape of inputs {tuple(inputs.shape)}, got {tuple(targets.shape)}")
    if inputs.device != targets.device:
        raise ValueError(f"inputs and targets must be on the same device, got {inputs.device} and {targets.device}")
    norm = _normalizer_tensor(normalizer, inputs)
    if _grad_needed(targets):
        from fastdet.ops.reference.losses import sigmoid_focal_loss as composite

        return composite(inputs, targets, alpha, gamma, reduction, normalizer=norm)
    loss, _ = native("sigmoid_focal_loss")(inputs, targets, alpha, gamma, red, norm, _grad_needed(inputs))
    return loss


def sigmoid_focal_loss_with_labels(
    logits: Tensor,
    labels: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
    normalizer: Tensor | float | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """Sigmoid focal loss from integer class labels, without materialising the one-hot target tensor.

    Equal to ``sigmoid_focal_loss(logits[keep], one_hot(labels[keep]), ...)`` with ``keep = labels != ignore_index``
    and background rows all-zero, in one pass over ``logits``.

    Args:
        logits (Tensor[..., C]): class logits, float16/bfloat16/float32/float64.
        labels (Tensor[...]): integer labels, ``logits``' shape without the last dimension. ``0 <= label < C`` is the
            positive class of that row; ``-1`` or ``C`` is background (all C targets 0); ``ignore_index`` (default
            -100) excludes the row: it contributes no loss and receives zero gradient. Any other value is an error on
            CPU; on CUDA (which cannot raise without a host sync) that row's loss and gradient are NaN, so the bad
            label shows up in the loss instead of being silently folded in.
        alpha, gamma: as :func:`sigmoid_focal_loss`.
        reduction (str): ``'none'`` (``[..., C]``, zeros for ignored rows), ``'sum'`` or ``'mean'`` = sum over the
            non-ignored elements / (number of non-ignored rows * C). With no non-ignored row, ``'mean'`` gives 0 and
            zero gradients (a batch without valid anchors contributes nothing, instead of NaN).
        normalizer: as :func:`sigmoid_focal_loss` (RetinaNet: ``reduction='sum', normalizer=num_fg.clamp(min=1)``).
        ignore_index (int): the label of rows to ignore.

    Returns:
        Tensor: the loss in the dtype of ``logits``.
    """
    _check_tensor(logits, "logits")
    _check_tensor(labels, "labels", floating=False)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    red = _reduction_code(reduction)
    alpha, gamma = _check_focal_params(alpha, gamma)
    if logits.dim() < 1 or labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels must have shape {tuple(logits.shape[:-1])} (logits [..., C] without C), got {tuple(labels.shape)}"
        )
    if logits.device != labels.device:
        raise ValueError(f"logits and labels must be on the same device, got {logits.device} and {labels.device}")
    norm = _normalizer_tensor(normalizer, logits)
    op = native("sigmoid_focal_loss_with_labels")
    loss, _ = op(logits, labels, int(ignore_index), alpha, gamma, red, norm, _grad_needed(logits))
    return loss


# Fake kernels: output shapes follow from the arguments alone, so torch.compile traces through without running them.
@register_fake("sigmoid_focal_loss")
def _sigmoid_focal_loss_fake(inputs, targets, alpha, gamma, reduction, normalizer, need_grad):
    loss = inputs.new_empty(inputs.shape if reduction == 0 else ())
    grad = inputs.new_empty(inputs.shape if need_grad else (0,))
    return loss, grad


@register_fake("sigmoid_focal_loss_with_labels")
def _sigmoid_focal_loss_with_labels_fake(logits, labels, ignore_index, alpha, gamma, reduction, normalizer, need_grad):
    torch._check(labels.dim() == logits.dim() - 1)
    loss = logits.new_empty(logits.shape if reduction == 0 else ())
    grad = logits.new_empty(logits.shape if need_grad else (0,))
    return loss, grad


def _focal_setup_context(ctx, inputs, output):
    _, grad = output
    ctx.mark_non_differentiable(grad)
    # The gradient output never receives an upstream gradient; without this autograd would fill a zero tensor of the
    # logits' size for it on every backward (a full extra pass over memory).
    ctx.set_materialize_grads(False)
    ctx.args = inputs[2:-1]  # everything between the two tensors and need_grad
    ctx.need_grad = inputs[-1]
    # Normally the forward already wrote the gradient and nothing else is kept (so later in-place changes to the
    # targets do not trip autograd's version check). If it was called with need_grad=False on inputs that require grad
    # (only a direct call of the op does that), the backward recomputes the gradient from the saved inputs.
    if ctx.need_grad:
        ctx.save_for_backward(grad)
    else:
        ctx.save_for_backward(inputs[0], inputs[1])


def _make_focal_backward(name):
    def backward(ctx, grad_loss, _grad_of_grad):
        if ctx.need_grad:
            (saved,) = ctx.saved_tensors
        else:
            logits, targets = ctx.saved_tensors
            with torch.no_grad():
                _, saved = getattr(torch.ops.fastdet, name)(logits, targets, *ctx.args, True)
        # grad_loss is [] for a reduced loss and the loss' shape for 'none': one elementwise pass either way.
        if grad_loss is None:
            return (None,) * (len(ctx.args) + 3)
        grad = saved * grad_loss
        return (grad, None) + (None,) * (len(ctx.args) + 1)

    return backward


# Autograd: the gradient comes out of the forward kernel, so the backward is a multiplication by the upstream grad.
register_autograd("sigmoid_focal_loss", _make_focal_backward("sigmoid_focal_loss"), _focal_setup_context)
register_autograd(
    "sigmoid_focal_loss_with_labels", _make_focal_backward("sigmoid_focal_loss_with_labels"), _focal_setup_context
)


# Autocast: torchvision's sigmoid_focal_loss is built on binary_cross_entropy_with_logits, which autocast runs in
# float32 (on the CPU and CUDA), so under autocast its loss is float32 whatever the logits' dtype. The same here: the
# logits (and float targets / normalizer) are cast to float32; the gradient flows back through the cast.
def _focal_autocast(op, inputs, targets, alpha, gamma, reduction, normalizer, need_grad):
    return op(autocast_float32(inputs), autocast_float32(targets), alpha, gamma, reduction,
              autocast_float32(normalizer), need_grad)


def _focal_labels_autocast(op, logits, labels, ignore_index, alpha, gamma, reduction, normalizer, need_grad):
    return op(autocast_float32(logits), labels, ignore_index, alpha, gamma, reduction, autocast_float32(normalizer),
              need_grad)


register_autocast("sigmoid_focal_loss", _focal_autocast)
register_autocast("sigmoid_focal_loss_with_labels", _focal_labels_autocast)


# --------------------------------------------------------------------------------------------------------------------
# smooth L1
# --------------------------------------------------------------------------------------------------------------------


def smooth_l1_loss(input: Tensor, target: Tensor, beta: float = 1.0, reduction: str = "none") -> Tensor:
    """Smooth L1 (Huber / beta) loss: ``0.5 * d**2 / beta`` where ``|d| < beta``, else ``|d| - 0.5 * beta``, with
    ``d = input - target``; ``beta = 0`` is the L1 loss.

    Args:
        input (Tensor[...]), target (Tensor[...]): same shape (no broadcasting: a shape mismatch is an error, where
            torch warns and broadcasts).
        beta (float): >= 0. torchvision's R-CNN box head uses ``1/9``.
        reduction (str): ``'none'`` (default, as torchvision's box losses; torch.nn.functional defaults to
            ``'mean'``), ``'mean'`` (NaN for empty input, as torch) or ``'sum'``.

    This is ``torch.nn.functional.smooth_l1_loss`` after argument checks: ATen already evaluates it as one fused
    elementwise(+reduction) kernel forward and one backward on CPU and CUDA, so a fastdet kernel would move the same
    bytes and buy nothing.
    """
    _check_tensor(input, "input")
    _check_tensor(target, "target")
    _reduction_code(reduction)  # validates
    if input.shape != target.shape:
        raise ValueError(f"input and target must have the same shape, got {tuple(input.shape)} and "
                         f"{tuple(target.shape)}")
    beta = float(beta)
    if not 0 <= beta < math.inf:
        raise ValueError(f"beta must be a finite number >= 0, got {beta}")
    return F.smooth_l1_loss(input, target, reduction=reduction, beta=beta)


# --------------------------------------------------------------------------------------------------------------------
# IoU losses of aligned box pairs
# --------------------------------------------------------------------------------------------------------------------


def _box_pair_loss(boxes1: Tensor, boxes2: Tensor, variant: int, reduction: str, eps: float) -> Tensor:
    _check_tensor(boxes1, "boxes1")
    _check_tensor(boxes2, "boxes2")
    red = _reduction_code(reduction)
    if boxes1.dim() < 1 or boxes1.shape[-1] != 4 or boxes2.dim() < 1 or boxes2.shape[-1] != 4:
        raise ValueError(f"boxes1 and boxes2 must have shape [..., 4] (x1, y1, x2, y2), got {tuple(boxes1.shape)} "
                         f"and {tuple(boxes2.shape)}")
    if boxes1.device != boxes2.device:
        raise ValueError(f"boxes1 and boxes2 must be on the same device, got {boxes1.device} and {boxes2.device}")
    eps = float(eps)
    if not 0 <= eps < math.inf:
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    if boxes1.dtype != boxes2.dtype:
        dtype = torch.promote_types(boxes1.dtype, boxes2.dtype)
        boxes1, boxes2 = boxes1.to(dtype), boxes2.to(dtype)
    if boxes1.shape != boxes2.shape:
        try:
            boxes1, boxes2 = torch.broadcast_tensors(boxes1, boxes2)
        except RuntimeError:
            raise ValueError(
                f"boxes1 {tuple(boxes1.shape)} and boxes2 {tuple(boxes2.shape)} do not broadcast"
            ) from None
    return native("box_pair_loss")(boxes1, boxes2, variant, red, eps)


_BOX_LOSS_DOC = """

    Args:
        boxes1 (Tensor[..., 4]): predicted boxes (x1, y1, x2, y2).
        boxes2 (Tensor[..., 4]): target boxes; the leading dims broadcast against boxes1's, as in torchvision.
        reduction (str): ``'none'`` (default, shape ``[...]``), ``'mean'`` (0 for empty input, as torchvision) or
            ``'sum'``.
        eps (float): small number preventing division by zero. Default 1e-7.

    Returns:
        Tensor: float32 for float16/bfloat16/float32 boxes (computed in float32, as torchvision upcasts), float64 for
        float64. Differentiable with respect to both inputs (one fused backward kernel; not twice differentiable).
        Degenerate or NaN boxes follow torchvision's arithmetic (e.g. a zero-area pair with eps = 0 gives NaN).
"""


def generalized_box_iou_loss(boxes1: Tensor, boxes2: Tensor, reduction: str = "none", eps: float = 1e-7) -> Tensor:
    return _box_pair_loss(boxes1, boxes2, _GIOU, reduction, eps)


def distance_box_iou_loss(boxes1: Tensor, boxes2: Tensor, reduction: str = "none", eps: float = 1e-7) -> Tensor:
    return _box_pair_loss(boxes1, boxes2, _DIOU, reduction, eps)


def complete_box_iou_loss(boxes1: Tensor, boxes2: Tensor, reduction: str = "none", eps: float = 1e-7) -> Tensor:
    return _box_pair_loss(boxes1, boxes2, _CIOU, reduction, eps)


generalized_box_iou_loss.__doc__ = (
    "Generalised IoU loss of aligned pairs: ``1 - GIoU`` = ``1 - (IoU - (C - U) / (C + eps))`` with "
    "``IoU = I / (U + eps)`` and C the area of the smallest enclosing box (torchvision's formula)." + _BOX_LOSS_DOC
)
distance_box_iou_loss.__doc__ = (
    "Distance IoU loss of aligned pairs: ``1 - IoU + d^2 / (c^2 + eps)``, d the distance between the centres and c "
    "the diagonal of the enclosing box (torchvision's formula)." + _BOX_LOSS_DOC
)
complete_box_iou_loss.__doc__ = (
    "Complete IoU loss of aligned pairs: DIoU loss + ``alpha * v``, ``v = 4/pi^2 (atan(w2/h2) - atan(w1/h1))^2``, "
    "``alpha = v / (1 - IoU + v + eps)`` held constant in the backward. As in torchvision, the DIoU part (and the IoU "
    "inside alpha) always uses eps = 1e-7; the ``eps`` argument enters alpha only." + _BOX_LOSS_DOC
)

# Short names (the issue's); the torchvision names are the primary ones.
giou_loss = generalized_box_iou_loss
diou_loss = distance_box_iou_loss
ciou_loss = complete_box_iou_loss


def _box_loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@register_fake("box_pair_loss")
def _box_pair_loss_fake(boxes1, boxes2, variant, reduction, eps):
    shape = boxes1.shape[:-1] if reduction == 0 else ()
    return boxes1.new_empty(shape, dtype=_box_loss_dtype(boxes1.dtype))


@register_fake("_box_pair_loss_backward")
def _box_pair_loss_backward_fake(grad, boxes1, boxes2, variant, reduction, eps):
    return boxes1.new_empty(boxes1.shape), boxes2.new_empty(boxes2.shape)


def _box_setup_context(ctx, inputs, output):
    boxes1, boxes2, variant, reduction, eps = inputs
    ctx.save_for_backward(boxes1, boxes2)
    ctx.variant, ctx.reduction, ctx.eps = variant, reduction, eps


def _box_backward(ctx, grad):
    boxes1, boxes2 = ctx.saved_tensors
    g1, g2 = torch.ops.fastdet._box_pair_loss_backward(grad, boxes1, boxes2, ctx.variant, ctx.reduction, ctx.eps)
    return g1, g2, None, None, None


# Autograd through a registered backward op (recomputes the pair terms from the 16-byte boxes; nothing else is saved).
register_autograd("box_pair_loss", _box_backward, _box_setup_context)
