"""Plumbing shared by the detectors around their heads: per-image sizes as a tensor, backbone outputs as a list,
dense anchors for a padded batch, per-level head outputs flattened, batched row selections (stable top-k, compaction,
gathers), box clipping and the final split of padded detections into one dict per image.

Nothing here loops over boxes or reads a tensor value back to the host, except :func:`split_detections` (which reads
the detection counts once, by design).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fastdet import ops
from fastdet.models.transform import ImageBatch
from fastdet.ops.nms import top_k_stable

__all__ = [
    "NMS_METHODS",
    "check_nms_method",
    "clip_boxes_to_images",
    "compact_mask",
    "dense_anchors",
    "features_as_list",
    "flatten_level",
    "flatten_level_outputs",
    "gather_rows",
    "image_sizes_tensor",
    "order_by_anchor_index",
    "probe_out_channels",
    "split_detections",
    "split_padded",
    "stable_top_k_mask",
    "trim_padding",
]


# The NMS variants every detector's post-processing accepts (``nms_method=``), as fastdet.ops.multiclass_nms' method.
NMS_METHODS = ("hard", "soft", "soft_linear")


def check_nms_method(nms_method) -> str:
    """``nms_method`` if it is one of :data:`NMS_METHODS`: ``"hard"`` (greedy NMS, torchvision's), ``"soft"``
    (gaussian soft-NMS) or ``"soft_linear"`` (see :func:`fastdet.ops.multiclass_nms`); else a ValueError."""
    if nms_method not in NMS_METHODS:
        raise ValueError(f"nms_method must be one of {NMS_METHODS}, got {nms_method!r}")
    return nms_method


def gather_rows(values: Tensor, index: Tensor) -> Tensor:
    """``values [B, N, *rest]`` gathered along dim 1 by ``index [B, K]`` -> ``[B, K, *rest]``."""
    expanded = index.reshape(*index.shape, *([1] * (values.dim() - 2))).expand(*index.shape, *values.shape[2:])
    return values.gather(1, expanded)


def compact_mask(mask: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Indices ``[B, k]`` of the set entries of ``mask [B, N]`` in increasing order, then unset entries (also in
    increasing order) as filler, and ``valid [B, k]`` telling which slots are set entries. ``k <= N``."""
    B, N = mask.shape
    positions = torch.arange(N, device=mask.device)
    # Unique integer keys: set entries above unset ones, lower index first within each group.
    keys = torch.where(mask, 2 * N - positions, N - positions)
    top = keys.topk(k, dim=1).values
    index = torch.where(top > N, 2 * N - top, N - top)
    return index, top > N


def clip_boxes_to_images(boxes: Tensor, image_sizes: Tensor) -> Tensor:
    """Clamp xyxy ``boxes [B, ..., 4]`` to ``[0, width] x [0, height]`` of their image (``image_sizes [B, 2]``)."""
    shape = (boxes.shape[0],) + (1,) * (boxes.dim() - 2)
    heights = image_sizes[:, 0].reshape(shape).to(boxes.dtype)
    widths = image_sizes[:, 1].reshape(shape).to(boxes.dtype)
    x1, y1, x2, y2 = boxes.unbind(-1)
    zero = torch.zeros((), dtype=boxes.dtype, device=boxes.device)
    # clamp(min=0) then clamp(max=size): torchvision's clip_boxes_to_image, with a per-image upper bound
    clipped = (torch.minimum(torch.maximum(x1, zero), widths), torch.minimum(torch.maximum(y1, zero), heights),
               torch.minimum(torch.maximum(x2, zero), widths), torch.minimum(torch.maximum(y2, zero), heights))
    return torch.stack(clipped, dim=-1)


def flatten_level(output: Tensor, columns: int) -> Tensor:
    # [B, A * K, H, W] -> [B, H * W * A, K]: anchors ordered by row, column, then anchor shape, as the anchors are.
    batch, _, height, width = output.shape
    return output.reshape(batch, -1, columns, height, width).permute(0, 3, 4, 1, 2).reshape(batch, -1, columns)


def flatten_level_outputs(per_level: Sequence[Tensor], values_per_anchor: int) -> Tensor:
    """``[B, A * V, H, W]`` maps of all levels -> ``[B, sum_l H_l * W_l * A, V]``, ordered level, y, x, anchor (the
    order of the anchor generator's output)."""
    return torch.cat([flatten_level(level, values_per_anchor) for level in per_level], dim=1)


def split_padded(num_detections: Tensor, **fields: Tensor) -> list[dict[str, Tensor]]:
    """Padded ``[B, D, ...]`` per-image fields -> one dict per image holding each field's first
    ``num_detections[i]`` rows, keys in the order given. Reads the counts (one host synchronisation on CUDA), which is
    why it lives outside the selection functions."""
    counts = num_detections.tolist()
    return [{name: value[i, :n] for name, value in fields.items()} for i, n in enumerate(counts)]


def split_detections(boxes: Tensor, scores: Tensor, labels: Tensor, num_detections: Tensor) -> list[dict[str, Tensor]]:
    """Padded ``[B, D]`` detections -> one ``{"boxes", "scores", "labels"}`` dict per image (see
    :func:`split_padded`)."""
    return split_padded(num_detections, boxes=boxes, scores=scores, labels=labels)


def features_as_list(features) -> list[Tensor]:
    """A backbone's output (a tensor, or a dict of pyramid levels) as a list of feature maps."""
    if isinstance(features, Tensor):
        return [features]
    if isinstance(features, (dict, OrderedDict)):
        return list(features.values())
    return list(features)


def dense_anchors(anchor_generator: ops.AnchorGenerator, batch: ImageBatch, features: list[Tensor]) -> Tensor:
    """All levels' anchors for the padded batch, ``Tensor[A, 4]`` float32, shared by its images (torchvision's
    strides: padded size // feature size). float32 even under autocast: bfloat16 anchors would be off by several
    pixels at typical image sizes."""
    grids = [tuple(f.shape[-2:]) for f in features]
    height, width = batch.tensors.shape[-2:]
    strides = [(int(height // h), int(width // w)) for h, w in grids]
    return anchor_generator.anchors(grids, strides, torch.float32, features[0].device)


def image_sizes_tensor(image_sizes: Sequence[tuple[int, int]], device) -> Tensor:
    """``[(h, w), ...]`` -> ``Tensor[B, 2]`` float32 on ``device`` (non-blocking from pinned memory on CUDA)."""
    sizes = torch.tensor([[float(h), float(w)] for h, w in image_sizes], dtype=torch.float32)
    if torch.device(device).type == "cuda" and not torch.compiler.is_compiling():
        return sizes.pin_memory().to(device, non_blocking=True)
    return sizes.to(device)


def _value_dependent_shapes_are_free(t: Tensor) -> bool:
    """Eager execution on the CPU: reading a count from a tensor costs no device synchronisation and no graph break
    (not under torch.compile / export, fx or jit tracing, not a fake tensor)."""
    fx = torch.fx._symbolic_trace
    fx_tracing = getattr(fx, "is_fx_symbolic_tracing", fx.is_fx_tracing)  # the former from torch 2.12
    return (t.device.type == "cpu" and not torch.compiler.is_compiling() and not torch.compiler.is_exporting()
            and not torch.jit.is_tracing() and not fx_tracing() and not isinstance(t, torch._subclasses.FakeTensor))


def trim_padding(valid: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Drop the padding slots that no row needs: ``valid [B, P]`` (valid slots a prefix of each row) and each
    ``tensor [B, P, ...]`` cut to ``P' = max(1, largest valid count)`` slots. Returns ``(valid, *tensors)``.

    Only in eager CPU execution, where the count is free (:func:`_value_dependent_shapes_are_free`); elsewhere (CUDA,
    torch.compile, export, tracing) everything is returned as it is, fixed-size and synchronisation-free. Used before
    per-slot work whose results are per slot (the box and mask heads), so the kept slots' results are unchanged: an
    RPN that keeps 250 of its 1,000 slots then costs the box head 250 rows, as torchvision's lists do."""
    if valid.dim() != 2 or not _value_dependent_shapes_are_free(valid):
        return (valid, *tensors)
    keep = max(1, int(valid.sum(dim=1).max())) if valid.numel() else valid.shape[1]
    if keep >= valid.shape[1]:
        return (valid, *tensors)
    return (valid[:, :keep], *(t[:, :keep] for t in tensors))


def stable_top_k_mask(values: Tensor, k: int) -> Tensor:
    """Bool mask of the ``k`` largest entries of each row of ``values (Tensor[R, M])``, no NaN, ties taken by
    increasing index (the first ``k`` of a stable descending sort; :func:`fastdet.ops.nms.top_k_stable`'s choice)."""
    index = top_k_stable(values, min(k, values.shape[1]))
    return torch.zeros_like(values, dtype=torch.bool).scatter_(1, index, True)


def order_by_anchor_index(boxes: Tensor, scores: Tensor, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Reorder ``decode_and_select``'s candidate slots (best score first) by anchor index, padding slots last, so that
    slot order is anchor order: the tie order torchvision's flattened (anchor, class) scores have."""
    key = torch.where(index >= 0, index, torch.iinfo(torch.int64).max)
    order = key.argsort(dim=1, stable=True)
    boxes = boxes.gather(1, order[:, :, None].expand_as(boxes))
    scores = scores.gather(1, order[:, :, None].expand_as(scores))
    return boxes, scores, index.gather(1, order)


def probe_out_channels(backbone: nn.Module, size: tuple[int, int]) -> list[int]:
    was_training = backbone.training
    backbone.eval()
    parameter = next(backbone.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    with torch.no_grad():
        features = features_as_list(backbone(torch.zeros(1, 3, size[1], size[0], device=device)))
    backbone.train(was_training)
    return [f.shape[1] for f in features]
