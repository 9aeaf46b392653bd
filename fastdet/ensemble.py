"""Ensembles and test-time augmentation: run several detectors (or one detector on several views of each image) and
merge their detections with weighted boxes fusion, non-maximum weighted, hard NMS or soft-NMS.

:class:`EnsembleDetector` wraps detectors that follow torchvision's inference interface (a list of ``[3, H, W]``
images in, a list of ``{"boxes", "scores", "labels"}`` dicts out, boxes in pixels) and is one itself. Each model runs
on the batch once per view (the image, and with ``tta=True`` its horizontal flip and any extra ``tta_scales``); boxes
are mapped back to the original image. The fusion of all images is one batched native call:

* ``"wbf"``: :func:`fastdet.ops.weighted_boxes_fusion_batched` on boxes normalised by the image size (ensemble-boxes'
  semantics: per-model weights, ``conf_type``, ``skip_box_threshold``);
* ``"nmw"``: :func:`fastdet.ops.non_maximum_weighted_batched`, likewise (ensemble-boxes' ``non_maximum_weighted``: each
  cluster's box is its members' mean weighted by score x IoU with its best box, whose score it keeps);
* ``"nms"`` / ``"soft-nms"``: scores are scaled by ``weight / sum(weights)`` (as ensemble-boxes' ``nms_method``
  does), then :func:`fastdet.ops.nms_fixed` / :func:`fastdet.ops.soft_nms_fixed` per label (gaussian soft-NMS with
  ``sigma``; ``skip_box_threshold`` is its score threshold).

The Python loops here run over models and views (a handful), never over boxes or images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fastdet import ops

__all__ = ["EnsembleDetector", "fuse_detections"]

METHODS = ("wbf", "nmw", "nms", "soft-nms")


def _pad(predictions: list[list[dict]], device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """[views][images] prediction dicts -> boxes [B, V, N, 4], scores [B, V, N], labels [B, V, N], counts [B, V]."""
    V, B = len(predictions), len(predictions[0])
    N = max((len(p["scores"]) for view in predictions for p in view), default=0)
    boxes = torch.zeros(B, V, N, 4, dtype=torch.float64, device=device)
    scores = torch.zeros(B, V, N, dtype=torch.float64, device=device)
    labels = torch.zeros(B, V, N, dtype=torch.int64, device=device)
    counts = torch.zeros(B, V, dtype=torch.int64, device=device)
    for v, view in enumerate(predictions):  # views x images: the ragged per-image lists are padded once
        for b, p in enumerate(view):
            k = len(p["scores"])
            boxes[b, v, :k] = p["boxes"].to(device, torch.float64)
            scores[b, v, :k] = p["scores"].to(device, torch.float64)
            labels[b, v, :k] = p["labels"].to(device, torch.int64)
            counts[b, v] = k
    return boxes, scores, labels, counts


def fuse_detections(
    predictions: Sequence[Sequence[dict]],
    image_sizes: Sequence[tuple[int, int]],
    method: str = "wbf",
    weights: Sequence[float] | None = None,
    iou_threshold: float = 0.55,
    skip_box_threshold: float = 0.0,
    conf_type: str = "avg",
    sigma: float = 0.5,
    max_detections: int = 100,
) -> list[dict]:
    """Merge per-view predictions of a batch: ``predictions[v][b]`` is view (model or augmentation) v's dict for image
    b, boxes in pixels of the original image; ``image_sizes[b]`` its ``(height, width)``. Returns one dict per image
    (``boxes`` float32 pixels, ``scores``, ``labels``), at most ``max_detections`` each, by decreasing score."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not predictions or any(len(view) != len(image_sizes) for view in predictions):
        raise ValueError("predictions must hold, for every view, one dict per image of image_sizes")
    V = len(predictions)
    weights = [1.0] * V if weights is None else [float(w) for w in weights]
    if len(weights) != V:
        raise ValueError(f"weights must have one entry per view ({V}), got {len(weights)}")
    device = predictions[0][0]["boxes"].device if len(image_sizes) else torch.device("cpu")
    cpu = torch.device("cpu")
    boxes, scores, labels, counts = _pad([list(view) for view in predictions], cpu)
    B, _, N = scores.shape
    if B == 0:
        return []
    size = torch.tensor([[w, h, w, h] for h, w in image_sizes], dtype=torch.float64)[:, None, None, :]
    if method == "wbf":
        fused_boxes, fused_scores, fused_labels, num = ops.weighted_boxes_fusion_batched(
            boxes / size, scores, labels, counts, weights, iou_threshold, skip_box_threshold, conf_type
        )
        fused_boxes = fused_boxes * size[:, 0]
    elif method == "nmw":
        fused_boxes, fused_scores, fused_labels, num = ops.non_maximum_weighted_batched(
            boxes / size, scores, labels, counts, weights, iou_threshold, skip_box_threshold
        )
        fused_boxes = fused_boxes.double() * size[:, 0]
    else:
        w = torch.tensor(weights, dtype=torch.float64)
        valid = torch.arange(N)[None, None, :] < counts[:, :, None]
        flat_scores = torch.where(valid, scores * (w / w.sum())[None, :, None], float("-inf")).reshape(B, V * N)
        flat_boxes = boxes.reshape(B, V * N, 4)
        flat_labels = labels.reshape(B, V * N)
        if method == "nms":
            keep, num = ops.nms_fixed(flat_boxes, flat_scores, flat_labels, iou_threshold, V * N)
            valid_keep = keep >= 0
            num = (valid_keep & (flat_scores.gather(1, keep.clamp(min=0)) > float("-inf"))).sum(1)
            fused_scores = flat_scores.gather(1, keep.clamp(min=0))
        else:
            keep, fused_scores, num = ops.soft_nms_fixed(flat_boxes, flat_scores, flat_labels, V * N, iou_threshold,
                                                         sigma, skip_box_threshold, "gaussian")
        safe = keep.clamp(min=0)
        fused_boxes = flat_boxes.gather(1, safe[..., None].expand(-1, -1, 4))
        fused_labels = flat_labels.gather(1, safe)
    results = []
    for b in range(B):  # one output dict per image
        k = min(int(num[b]), max_detections)
        results.append({"boxes": fused_boxes[b, :k].float().to(device), "scores": fused_scores[b, :k].float().to(device),
                        "labels": fused_labels[b, :k].to(device)})
    return results


def _hflip_boxes(boxes: Tensor, width: int) -> Tensor:
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


class EnsembleDetector(nn.Module):
    """Several detectors and/or test-time augmentations as one detector (see the module docstring).

    Args:
        models: detectors with torchvision's inference interface (evaluated in eval mode).
        method: ``"wbf"``, ``"nmw"``, ``"nms"`` or ``"soft-nms"``.
        weights: per-model weights (every view of a model shares its weight).
        tta: add each image's horizontal flip as a view (boxes flipped back).
        tta_scales: extra views resized by these factors (boxes scaled back); only useful for models that do not
            resize their input to a fixed size themselves.
        iou_threshold, skip_box_threshold, conf_type, sigma, max_detections: as :func:`fuse_detections`.
    """

    def __init__(self, models: Sequence[nn.Module], method: str = "wbf", weights: Sequence[float] | None = None,
                 tta: bool = False, tta_scales: Sequence[float] = (), iou_threshold: float = 0.55,
                 skip_box_threshold: float = 0.0, conf_type: str = "avg", sigma: float = 0.5,
                 max_detections: int = 100):
        super().__init__()
        if not models:
            raise ValueError("models must hold at least one detector")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if weights is not None and len(weights) != len(models):
            raise ValueError(f"weights must have one entry per model ({len(models)}), got {len(weights)}")
        if any(not float(s) > 0 for s in tta_scales):
            raise ValueError(f"tta_scales must be positive, got {list(tta_scales)}")
        self.models = nn.ModuleList(models)
        self.method, self.tta, self.tta_scales = method, tta, tuple(float(s) for s in tta_scales)
        self.weights = [1.0] * len(models) if weights is None else [float(w) for w in weights]
        self.options = dict(iou_threshold=iou_threshold, skip_box_threshold=skip_box_threshold, conf_type=conf_type,
                            sigma=sigma, max_detections=max_detections)

    def _views(self, images: list[Tensor]):
        """(images of the view, function mapping one image's predicted boxes back to the original)."""
        yield images, lambda boxes, b: boxes
        if self.tta:
            yield [image.flip(-1) for image in images], lambda boxes, b: _hflip_boxes(boxes, images[b].shape[-1])
        for s in self.tta_scales:
            scaled = [torch.nn.functional.interpolate(image[None], scale_factor=s, mode="bilinear",
                                                      align_corners=False)[0] for image in images]
            factors = [(image.shape[-1] / x.shape[-1], image.shape[-2] / x.shape[-2]) for image, x in
                       zip(images, scaled)]
            yield scaled, lambda boxes, b, f=factors: boxes * boxes.new_tensor([f[b][0], f[b][1], f[b][0], f[b][1]])

    @torch.no_grad()
    def forward(self, images: list[Tensor]) -> list[dict]:
        predictions, weights = [], []
        for model, weight in zip(self.models, self.weights):
            for view, back in self._views(images):
                out = model(view)
                predictions.append([{**p, "boxes": back(p["boxes"], b)} for b, p in enumerate(out)])
                weights.append(weight)
        sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
        return fuse_detections(predictions, sizes, self.method, weights, **self.options)
