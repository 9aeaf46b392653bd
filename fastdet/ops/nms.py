"""Non-maximum suppression: torchvision-compatible ``nms`` / ``batched_nms`` and the fixed-size, synchronisation-free
``nms_fixed`` / ``multiclass_nms`` for compiled graphs, CUDA graphs and export.

Semantics shared by every function here (and by :mod:`fastdet.ops.reference`):

* Boxes are ``(x1, y1, x2, y2)``. Candidates are visited by decreasing score; tied scores are visited by increasing
  index (a stable sort), so the result is the same on CPU and GPU. NaN scores sort first, as ``torch.sort`` puts
  them (``multiclass_nms`` drops them instead, since they fail the score threshold).
* A visited candidate is kept unless a kept candidate of the same category overlaps it with IoU > ``iou_threshold``
  (strictly greater, compared exactly against the float64 threshold, as torchvision's CPU kernel does).
* IoU is computed in float32 for float16/bfloat16/float32 boxes and in float64 for float64 boxes. A pair with NaN
  IoU (NaN coordinates, or two zero-area boxes) never suppresses; degenerate boxes (x2 < x1) follow the same
  arithmetic as torchvision (negative area, intersection clamped at zero).
"""

from __future__ import annotations

import numpy
import torch
from torch import Tensor

from fastdet.ops._registry import autocast_float32, native, register_autocast, register_fake

__all__ = ["batched_nms", "multiclass_nms", "nms", "nms_fixed"]


def _check_tensor(t, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_same_device(**tensors: Tensor | None) -> None:
    named = [(name, t) for name, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{first_name} and {name} must be on the same device, got {first.device} and {t.device}")


def _check_threshold(value, name: str) -> float:
    value = float(value)
    if not value >= 0.0:  # also rejects NaN
        raise ValueError(f"{name} must be a non-negative number, got {value}")
    return value


def _strictly_above(values: Tensor, threshold: float) -> Tensor:
    """``values > threshold`` decided exactly, as if both were float64.

    ``tensor > python_float`` rounds the threshold to the tensor's dtype first (0.3 becomes 0.30005 in float16), which
    can flip decisions. float16/bfloat16 values are widened to float32 (exactly), and the threshold is replaced by the
    largest float32 not above it: for a float32 x, ``x > t`` then matches the exact comparison.
    """
    if values.dtype == torch.float64:
        return values > threshold
    # Plain Python/numpy arithmetic on the threshold keeps this free of tensor-valued branches under torch.compile.
    t32 = numpy.float32(threshold)
    if float(t32) > threshold:
        t32 = numpy.nextafter(t32, numpy.float32(-numpy.inf))
    values = values.float()
    return values > float(t32)  # exactly representable in float32, so no further rounding


def _accumulation_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def top_k_stable(values: Tensor, k: int) -> Tensor:
    """Indices of the k largest entries of each row of ``values`` ([B, n], no NaN), ordered by value descending and,
    among equal values, by index ascending: the first k of a stable descending sort, without sorting all n.

    ``torch.topk`` alone does not say which of several equal values at the boundary it picks. So: find each row's
    k-th largest value v, pick everything above v plus the lowest-index entries equal to v (a top-k over unique
    integer keys), and stably sort those k by value.
    """
    n = values.shape[1]
    if k == 0:
        return torch.empty(values.shape[0], 0, dtype=torch.int64, device=values.device)
    if k >= n:
        return torch.sort(values, dim=1, descending=True, stable=True).indices
    kth = values.topk(k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    # Integer keys ranking every entry above v before every entry equal to v, each group by ascending index; a top-k
    # over these unique keys picks exactly the entries a stable sort would put first.
    positions = torch.arange(n, device=values.device).expand_as(values)
    lowest = torch.iinfo(torch.int64).min
    keys = torch.where(values > kth, -positions, torch.where(values == kth, -positions - n, lowest))
    top_keys = keys.topk(k, dim=1).values
    chosen = torch.where(top_keys > -n, -top_keys, -top_keys - n)
    by_value = torch.sort(values.gather(1, chosen), dim=1, descending=True, stable=True).indices
    return chosen.gather(1, by_value)


_top_k_stable = top_k_stable  # the name tests and older callers use


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression, a drop-in for ``torchvision.ops.nms``.

    Args:
        boxes (Tensor[N, 4]): ``(x1, y1, x2, y2)`` boxes, float16/bfloat16/float32/float64.
        scores (Tensor[N]): a score per box.
        iou_threshold (float): boxes overlapping a kept, higher-scoring box with IoU > iou_threshold are discarded.

    Returns:
        Tensor[K] int64: indices of the kept boxes, by decreasing score (ties: increasing index).

    The number of kept boxes depends on the data, so on CUDA this synchronises once to size the output;
    :func:`nms_fixed` never does. The suppression itself runs on the device.
    """
    _check_tensor(boxes, "boxes")
    _check_tensor(scores, "scores")
    _check_same_device(boxes=boxes, scores=scores)
    return native("nms")(boxes, scores, _check_threshold(iou_threshold, "iou_threshold"))


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each category, a drop-in for ``torchvision.ops.batched_nms``.

    Args:
        boxes (Tensor[N, 4]): ``(x1, y1, x2, y2)`` boxes.
        scores (Tensor[N]): a score per box.
        idxs (Tensor[N]): integer category of each box; boxes of different categories never suppress each other.
        iou_threshold (float): IoU above which a lower-scoring box of the same category is discarded.

    Returns:
        Tensor[K] int64: kept indices by decreasing score (ties: increasing index).

    Unlike torchvision, categories are separated inside the kernel rather than by offsetting coordinates (which loses
    precision in float16 and for large coordinates), and there is no Python loop over categories. Memory on CUDA grows
    with the sum over categories of (boxes in the category)^2 / 8 bytes.
    """
    _check_tensor(boxes, "boxes")
    _check_tensor(scores, "scores")
    _check_tensor(idxs, "idxs")
    _check_same_device(boxes=boxes, scores=scores, idxs=idxs)
    return native("batched_nms")(boxes, scores, idxs, _check_threshold(iou_threshold, "iou_threshold"))


def nms_fixed(
    boxes: Tensor, scores: Tensor, idxs: Tensor | None, iou_threshold: float, max_output: int
) -> tuple[Tensor, Tensor]:
    """Fixed-size NMS with no device-to-host synchronisation (for ``torch.compile``, CUDA graphs and export).

    Args:
        boxes (Tensor[N, 4] or Tensor[B, N, 4]): ``(x1, y1, x2, y2)`` boxes; a leading B runs B images at once.
        scores (Tensor[N] or Tensor[B, N]): a score per box.
        idxs (Tensor[N] or Tensor[B, N], optional): integer categories (as :func:`batched_nms`); None = one category.
        iou_threshold (float): as :func:`nms`.
        max_output (int): length of the output.

    Returns:
        keep (Tensor[max_output] or Tensor[B, max_output] int64): the first ``max_output`` indices that
        :func:`batched_nms` would return, padded with -1.
        num_kept (Tensor[] or Tensor[B] int64): how many entries of ``keep`` are real.

    On CUDA this uses a dense N x N bit mask (N^2 / 8 bytes per image) up to N = 8192, or with ``idxs=None``, so
    pre-select candidates (top-k) first when N is large; with categories and larger N each category is resolved by
    one thread block in O(N) memory.
    """
    _check_tensor(boxes, "boxes")
    _check_tensor(scores, "scores")
    if idxs is not None:
        _check_tensor(idxs, "idxs")
    if isinstance(max_output, bool) or not isinstance(max_output, int) or max_output < 0:
        raise ValueError(f"max_output must be a non-negative int, got {max_output!r}")
    _check_same_device(boxes=boxes, scores=scores, idxs=idxs)
    return native("nms_fixed")(boxes, scores, idxs, _check_threshold(iou_threshold, "iou_threshold"), max_output)


def multiclass_nms(
    boxes: Tensor,
    scores: Tensor,
    score_threshold: float,
    iou_threshold: float,
    max_detections: int,
    pre_nms_top_k: int,
    class_agnostic: bool = False,
    method: str = "hard",
    sigma: float = 0.5,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Batched multi-class detection post-processing with fixed-size outputs and no host synchronisation (the design of
    TensorRT's EfficientNMS).

    Args:
        boxes (Tensor[B, N, 4] or Tensor[B, N, C, 4]): ``(x1, y1, x2, y2)`` boxes, shared by all classes or per class.
        scores (Tensor[B, N, C]): per-class scores (already activated, e.g. sigmoid or softmax).
        score_threshold (float): candidates need score > score_threshold (NaN scores never pass).
        iou_threshold (float): as :func:`nms`.
        max_detections (int): K, the number of output slots per image.
        pre_nms_top_k (int): only the best ``pre_nms_top_k`` candidates of each image (over all classes) enter NMS.
        class_agnostic (bool): if True, boxes of different classes suppress each other.
        method (str): ``"hard"`` (greedy NMS), ``"soft"`` (gaussian soft-NMS, EfficientDet's default) or
            ``"soft_linear"``: the pre-selected candidates go through :func:`fastdet.ops.soft_nms_fixed` per class
            (``iou_threshold`` drives the linear decay, ``sigma`` the gaussian one), and the output holds the
            candidates whose *decayed* score is > score_threshold, by decreasing decayed score, with those scores.
        sigma (float): the gaussian soft-NMS ``sigma``.

    Returns:
        boxes (Tensor[B, K, 4]), scores (Tensor[B, K]), labels (Tensor[B, K] int64), num_detections (Tensor[B] int64).
        Slots past ``num_detections`` hold boxes 0, scores 0 and labels -1.

    Candidates of an image are the (box, class) pairs ordered by decreasing score, ties by the flat index
    ``box * C + class``; NMS keeps the same survivors :func:`batched_nms` would, in that order.

    On the CPU a fused kernel does the whole selection image by image in parallel (a threshold pass, a partial
    selection of the top-k, per-class greedy NMS), bit-identical to the generic path; that path (top-k over N x C,
    :func:`nms_fixed`) runs on CUDA and whenever autograd needs the selected boxes. Memory on CUDA, for
    ``T = min(pre_nms_top_k, N * C)`` candidates per image: up to T = 8192 (and always when ``class_agnostic``) the
    sync-free :func:`nms_fixed` builds a dense bit mask of ``T * ceil(T / 64) * 8`` bytes per image (8 MiB at 8192);
    above that, per-class candidates are resolved one class per thread block in O(T) memory. SSD300's
    post-processing (90 foreground classes x 400 candidates, T = 36,000) would need 162 MB per image (5.2 GB for a
    batch of 32) with the dense mask; it takes the O(T) path (about 0.6 MB per image).
    """
    _check_tensor(boxes, "boxes")
    _check_tensor(scores, "scores")
    if scores.dim() != 3:
        raise ValueError(f"scores must have shape [B, N, C], got {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be a floating-point tensor, got {scores.dtype}")
    B, N, C = scores.shape
    per_class = boxes.dim() == 4
    expected = (B, N, C, 4) if per_class else (B, N, 4)
    if tuple(boxes.shape) != expected:
        raise ValueError(
            f"boxes must have shape [B, N, 4] or [B, N, C, 4] matching scores {tuple(scores.shape)}, "
            f"got {tuple(boxes.shape)}"
        )
    if not boxes.is_floating_point():
        raise TypeError(f"boxes must be a floating-point tensor, got {boxes.dtype}")
    if boxes.device != scores.device:
        raise ValueError(f"boxes and scores must be on the same device, got {boxes.device} and {scores.device}")
    for name, value in (("max_detections", max_detections), ("pre_nms_top_k", pre_nms_top_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    score_threshold = float(score_threshold)
    if score_threshold != score_threshold:
        raise ValueError("score_threshold must not be NaN")
    iou_threshold = _check_threshold(iou_threshold, "iou_threshold")
    if method not in ("hard", "soft", "soft_linear"):
        raise ValueError(f"method must be 'hard', 'soft' or 'soft_linear', got {method!r}")

    top = min(pre_nms_top_k, N * C)
    if top == 0:
        # No candidate at all (N = 0, C = 0 or pre_nms_top_k = 0): every slot is padding.
        return (
            boxes.new_zeros((B, max_detections, 4)),
            scores.new_zeros((B, max_detections)),
            torch.full((B, max_detections), -1, dtype=torch.int64, device=scores.device),
            torch.zeros((B,), dtype=torch.int64, device=scores.device),
        )
    # torch.export (and so ONNX export) takes the generic path: an exported graph must run on every device and
    # translate to ONNX, and the fused kernel below exists for the CPU only.
    if method == "hard" and scores.device.type == "cpu" and not torch.compiler.is_exporting() and not (
        torch.is_grad_enabled() and (boxes.requires_grad or scores.requires_grad)
    ):
        # The fused CPU kernel: a threshold pass, a partial selection of the top-k with the same tie order, per-class
        # greedy NMS and the fixed-size output, image by image in parallel (no N x C sort, no scatter). float16 and
        # bfloat16 are widened exactly to float32 and the outputs narrowed back exactly. The generic path below stays
        # for CUDA and for autograd through the selected boxes.
        out_boxes, out_scores, labels, num = native("_multiclass_nms_kernel")(
            boxes.to(_accumulation_dtype(boxes)).contiguous(),
            scores.to(_accumulation_dtype(scores)).contiguous(),
            score_threshold,
            iou_threshold,
            max_detections,
            top,
            class_agnostic,
        )
        return out_boxes.to(boxes.dtype), out_scores.to(scores.dtype), labels, num
    # Pre-selection: the best pre_nms_top_k (box, class) candidates per image. Failing candidates are pushed to the
    # end with -inf; ties are broken by flat index.
    flat_scores = scores.reshape(B, N * C)
    passing = _strictly_above(flat_scores, score_threshold)
    ranked = torch.where(passing, flat_scores, torch.full_like(flat_scores, float("-inf")))
    order = top_k_stable(ranked, top)
    cand_scores = ranked.gather(1, order)
    cand_passing = passing.gather(1, order)
    if per_class:
        cand_boxes = boxes.reshape(B, N * C, 4).gather(1, order.unsqueeze(-1).expand(-1, -1, 4))
    else:
        cand_boxes = boxes.gather(1, (order // max(C, 1)).unsqueeze(-1).expand(-1, -1, 4))
    cand_labels = order % C if C > 0 else order
    categories = None if class_agnostic else cand_labels

    if method != "hard":
        from fastdet.ops.soft_nms import soft_nms_fixed

        # Failing candidates carry -inf: visited last, they decay no passing candidate and are never kept.
        keep, det_scores, num_detections = soft_nms_fixed(
            cand_boxes, cand_scores, categories, max_detections, iou_threshold, sigma, score_threshold,
            "gaussian" if method == "soft" else "linear",
        )
        valid = keep >= 0
        safe = keep.clamp(min=0)
        det_boxes = torch.where(valid.unsqueeze(-1), cand_boxes.gather(1, safe.unsqueeze(-1).expand(-1, -1, 4)), 0)
        det_labels = torch.where(valid, cand_labels.gather(1, safe), -1)
        return det_boxes.to(boxes.dtype), det_scores.to(scores.dtype), det_labels, num_detections

    keep, _ = nms_fixed(cand_boxes, cand_scores, categories, iou_threshold, max_detections)
    # Failing candidates come after every passing one, so the passing survivors are a prefix of keep.
    valid = keep >= 0
    safe = keep.clamp(min=0)
    valid = valid & cand_passing.gather(1, safe)
    num_detections = valid.sum(dim=1)
    det_boxes = torch.where(valid.unsqueeze(-1), cand_boxes.gather(1, safe.unsqueeze(-1).expand(-1, -1, 4)), 0)
    det_scores = torch.where(valid, scores.reshape(B, N * C).gather(1, order).gather(1, safe), 0)
    det_labels = torch.where(valid, cand_labels.gather(1, safe), -1)
    return det_boxes.to(boxes.dtype), det_scores.to(scores.dtype), det_labels, num_detections


def _kept_count(boxes: Tensor):
    """The data-dependent length of nms / batched_nms' output: an unbacked symint in ``[0, N]``.

    ``new_dynamic_size`` only takes a static ``max``; with a dynamic number of boxes (torch.compile(dynamic=True),
    torch.export with a Dim) N is symbolic, so the upper bound is stated with ``torch._check`` instead.
    """
    n = boxes.shape[0]
    ctx = torch.library.get_ctx()
    k = ctx.new_dynamic_size(max=n) if isinstance(n, int) else ctx.new_dynamic_size()
    torch._check(k <= n)
    return k


# Fake kernels. nms / batched_nms return a data-dependent number of indices: an unbacked symint bounded by N.
@register_fake("nms")
def _nms_fake(boxes, scores, iou_threshold):
    torch._check(boxes.dim() == 2 and boxes.shape[-1] == 4)
    return boxes.new_empty((_kept_count(boxes),), dtype=torch.int64)


@register_fake("batched_nms")
def _batched_nms_fake(boxes, scores, idxs, iou_threshold):
    torch._check(boxes.dim() == 2 and boxes.shape[-1] == 4)
    return boxes.new_empty((_kept_count(boxes),), dtype=torch.int64)


@register_fake("nms_fixed")
def _nms_fixed_fake(boxes, scores, idxs, iou_threshold, max_output):
    lead = boxes.shape[:-2]
    return (
        boxes.new_empty((*lead, max_output), dtype=torch.int64),
        boxes.new_empty(tuple(lead), dtype=torch.int64),
    )


@register_fake("_multiclass_nms_kernel")
def _multiclass_nms_kernel_fake(boxes, scores, score_threshold, iou_threshold, max_detections, pre_nms_top_k,
                                class_agnostic):
    B = scores.shape[0]
    return (
        boxes.new_empty((B, max_detections, 4)),
        scores.new_empty((B, max_detections)),
        scores.new_empty((B, max_detections), dtype=torch.int64),
        scores.new_empty((B,), dtype=torch.int64),
    )


@register_fake("_nms_keep_flags")
def _nms_keep_flags_fake(boxes, categories, iou_threshold, sync_free):
    return boxes.new_empty(boxes.shape[:-1], dtype=torch.bool)


# Autocast, as torchvision registers it for nms: boxes and scores are cast to float32 (float64 stays float64), so the
# result is that of float32 inputs. batched_nms (a Python function over nms in torchvision) does the same.
def _nms_autocast(op, boxes, scores, iou_threshold):
    return op(autocast_float32(boxes), autocast_float32(scores), iou_threshold)


def _batched_nms_autocast(op, boxes, scores, idxs, iou_threshold):
    return op(autocast_float32(boxes), autocast_float32(scores), idxs, iou_threshold)


register_autocast("nms", _nms_autocast)
register_autocast("batched_nms", _batched_nms_autocast)
