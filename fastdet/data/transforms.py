"""Box-aware transforms: callables ``(image, target) -> (image, target)``.

``image`` is ``Tensor[3, H, W]`` float (0..1 before :class:`Normalize`); ``target`` is a dataset target (see
:class:`fastdet.data.DetectionDataset`) or ``None``. No transform changes its inputs: each returns a new image and a new
target dict (values it does not touch are shared, never written to).

Geometric transforms move ``boxes`` and the region sets ``ignore_boxes`` and ``proposals`` (precomputed region
proposals, attached by :class:`AttachProposals`), scale ``area`` by how much each box's area changed, and apply one
rule to boxes that (partly) leave the image, stated here once:

    every box is clipped to the image; it is DROPPED, together with all its per-object fields (``labels``,
    ``area``, ``iscrowd``, ``difficult``, ...), when the clipped box is narrower or shorter than ``min_size`` pixels
    (default 1) or keeps less than ``min_visible`` (default 0.25) of the area it had before clipping. Ignore regions
    and proposals are clipped too, and only dropped when nothing of them is left.

Per-object fields are the target's tensors whose first dimension equals the number of boxes, except ``boxes``, the
region sets and ``orig_size``. Instance ``masks`` (``Tensor[N, H, W]``) are per-object and also move with the
image: flipped, resized and warped with nearest-neighbour sampling, cropped (so a mask stays aligned with its
pixels). KITTI's 3-D attributes describe the scene, not the picture, and are left unchanged.

Randomness comes from torch's global generator (so :func:`fastdet.data.make_data_loader`'s seed makes runs repeatable)
or from an explicit ``generator``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F

REGION_KEYS = ("ignore_boxes", "proposals")  # box sets that move with the image but are not objects
_NOT_PER_OBJECT = frozenset({"boxes", "orig_size", "image_id", *REGION_KEYS})
DEFAULT_MIN_VISIBLE = 0.25
DEFAULT_MIN_SIZE = 1.0


def _check_image(image: Any) -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] not in (1, 3):
        raise TypeError(f"image must be a Tensor[3, H, W] (or [1, H, W]), got "
                        f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
    if not image.is_floating_point():
        raise TypeError(f"image must be a floating-point tensor (0..1), got {image.dtype}")
    return image


def _check_target(target: Any) -> dict | None:
    if target is None:
        return None
    if not isinstance(target, dict):
        raise TypeError(f"target must be a dict or None, got {type(target).__name__}")
    boxes = target.get("boxes")
    if (not isinstance(boxes, torch.Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4):
        raise ValueError(f"target['boxes'] must be a Tensor[N, 4], got "
                         f"{tuple(boxes.shape) if isinstance(boxes, torch.Tensor) else type(boxes).__name__}")
    return target


def _rand(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * _rand(generator)


def _per_object_keys(target: dict, n: int) -> list[str]:
    return [key for key, value in target.items()
            if key not in _NOT_PER_OBJECT and isinstance(value, torch.Tensor) and value.dim() >= 1
            and value.shape[0] == n]


def _with_masks(target: dict | None, fn) -> dict | None:
    """A shallow copy of ``target`` whose instance ``masks`` (if any) went through ``fn``."""
    if target is None or not isinstance(target.get("masks"), torch.Tensor) or target["masks"].dim() != 3:
        return target
    out = dict(target)
    out["masks"] = fn(target["masks"])
    return out


def _resize_masks(masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if masks.shape[0] == 0:
        return masks.new_zeros((0, height, width))
    return F.interpolate(masks[:, None].float(), size=(height, width), mode="nearest")[:, 0].to(masks.dtype)


def clip_regions(boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Region boxes (ignore regions, proposals) clipped to ``width x height``, those wholly outside left out."""
    clipped = torch.minimum(boxes.clamp(min=0), boxes.new_tensor([width, height] * 2))
    wh = clipped[:, 2:] - clipped[:, :2]
    return clipped[(wh > 0).all(dim=1)]


def moved_regions(target: dict | None, move) -> dict:
    """The target's region sets (:data:`REGION_KEYS` present as tensors) moved by ``move(boxes) -> boxes``, for
    :func:`update_boxes`."""
    if target is None:
        return {}
    return {key: move(target[key]) for key in REGION_KEYS if isinstance(target.get(key), torch.Tensor)}


def update_boxes(target: dict | None, boxes: torch.Tensor, width: int, height: int,
                 ignore_boxes: torch.Tensor | None = None, min_visible: float = DEFAULT_MIN_VISIBLE,
                 min_size: float = DEFAULT_MIN_SIZE, regions: dict | None = None) -> dict | None:
    """A new target with ``boxes`` (already moved, not yet clipped) clipped to ``width x height`` and filtered by the
    module's rule; per-object fields follow, ``area`` is rescaled; the region sets in ``regions`` (already moved; see
    :func:`moved_regions`) and ``ignore_boxes`` (the same for that key) replace the target's, clipped, without the
    ones that lie wholly outside."""
    if target is None:
        return None
    old = target["boxes"]
    out = dict(target)
    bounds = boxes.new_tensor([width, height, width, height])
    clipped = torch.minimum(boxes.clamp(min=0), bounds)
    wh = clipped[:, 2:] - clipped[:, :2]
    moved_area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    clipped_area = wh[:, 0] * wh[:, 1]
    keep = (wh >= min_size).all(dim=1) & (clipped_area >= min_visible * moved_area) & (clipped_area > 0)
    for key in _per_object_keys(target, old.shape[0]):
        out[key] = target[key][keep]
    if "area" in target and isinstance(target["area"], torch.Tensor) and target["area"].shape[0] == old.shape[0]:
        old_area = ((old[:, 2] - old[:, 0]) * (old[:, 3] - old[:, 1]))[keep]
        ratio = torch.where(old_area > 0, clipped_area[keep] / old_area.clamp(min=1e-12),
                            torch.ones_like(old_area))
        out["area"] = (target["area"][keep] * ratio).to(target["area"].dtype)
    out["boxes"] = clipped[keep].to(old.dtype)
    regions = dict(regions or {})
    if ignore_boxes is not None:
        regions["ignore_boxes"] = ignore_boxes
    for key, region in regions.items():
        out[key] = clip_regions(region, width, height)
    return out


class AttachProposals:
    """Put an image's precomputed region proposals into its target as ``"proposals"`` (``Tensor[K, 4]`` float32, xyxy
    pixels of the image as stored, clipped to it; boxes wholly outside left out), looked up by the target's
    ``"image_id"``. Place it before the geometric transforms:
    they then move the proposals with the image (flips, resizes, crops), and R-CNN / Fast R-CNN / SPP-Net train on
    the target's proposals. ``proposals`` maps image ids to boxes (e.g.
    :func:`fastdet.models.proposals.load_proposals`); an image without an entry raises a ``KeyError`` naming its id."""

    def __init__(self, proposals):
        self.proposals = {int(k): torch.as_tensor(v, dtype=torch.float32).reshape(-1, 4) for k, v in proposals.items()}

    def __call__(self, image, target=None):
        target = _check_target(target)
        if target is None:
            return image, None
        image_id = int(torch.as_tensor(target.get("image_id", -1)).reshape(-1)[0])
        if image_id not in self.proposals:
            raise KeyError(f"AttachProposals: no proposals for image_id {image_id} ({len(self.proposals)} images)")
        height, width = image.shape[-2:]
        return image, {**target, "proposals": clip_regions(self.proposals[image_id], width, height)}

    def __repr__(self) -> str:
        return f"AttachProposals({len(self.proposals)} images)"


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence):
        transforms = list(transforms)
        for t in transforms:
            if not callable(t):
                raise TypeError(f"every transform must be callable (image, target) -> (image, target), got {t!r}")
        self.transforms = transforms

    def __call__(self, image, target=None):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


class Resize:
    """Resize the image (bilinear, antialiased when shrinking) and scale the boxes with it.

    Args:
        size: ``(height, width)`` for an exact size, or an int: the shorter side becomes ``size`` and the aspect ratio
            is kept.
        max_size: with an int ``size``, the longer side is capped at ``max_size`` (the shorter side then ends up
            smaller than ``size``), as detection models' resizing does.
    """

    def __init__(self, size: int | Sequence[int], max_size: int | None = None):
        if isinstance(size, int) and not isinstance(size, bool):
            if size < 1:
                raise ValueError(f"size must be positive, got {size}")
        elif not (isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) and s > 0
                                                                             for s in size)):
            raise ValueError(f"size must be a positive int or (height, width), got {size!r}")
        if max_size is not None and (not isinstance(size, int) or max_size < size):
            raise ValueError(f"max_size needs an int size and max_size >= size, got size={size!r}, "
                             f"max_size={max_size!r}")
        self.size = size
        self.max_size = max_size

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        if not isinstance(self.size, int):
            return int(self.size[0]), int(self.size[1])
        scale = self.size / min(height, width)
        if self.max_size is not None and max(height, width) * scale > self.max_size:
            scale = self.max_size / max(height, width)
        return max(int(round(height * scale)), 1), max(int(round(width * scale)), 1)

    def __call__(self, image, target=None):
        image = _check_image(image)
        target = _check_target(target)
        height, width = image.shape[-2:]
        new_h, new_w = self.output_size(height, width)
        shrinking = new_h < height or new_w < width
        resized = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", align_corners=False,
                                antialias=shrinking)[0]
        if target is None:
            return resized, None
        target = _with_masks(target, lambda m: _resize_masks(m, new_h, new_w))
        # Pixel edges scale exactly: an edge at x in the old grid sits at x * new_w / width in the new one.
        scale = target["boxes"].new_tensor([new_w / width, new_h / height] * 2)
        return resized, update_boxes(target, target["boxes"] * scale, new_w, new_h,
                                     regions=moved_regions(target, lambda b: b * scale.to(b.dtype)))

    def __repr__(self) -> str:
        return f"Resize(size={self.size}, max_size={self.max_size})"


class RandomHorizontalFlip:
    """Mirror the image left-right with probability ``p``; a box ``[x1, y1, x2, y2]`` becomes ``[W - x2, y1, W - x1,
    y2]`` (exact in the pixel-edge convention)."""

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must lie in [0, 1], got {p}")
        self.p = p
        self.generator = generator

    def __call__(self, image, target=None):
        image = _check_image(image)
        target = _check_target(target)
        if _rand(self.generator) >= self.p:
            return image, target
        width = image.shape[-1]
        flipped = image.flip(-1)
        if target is None:
            return flipped, None
        out = dict(target)

        def mirror(boxes):
            return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)

        out["boxes"] = mirror(target["boxes"])
        out.update(moved_regions(target, mirror))
        return flipped, _with_masks(out, lambda m: m.flip(-1))

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


def _box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)
    area_a = (a[:, 2:] - a[:, :2]).prod(dim=1)
    area_b = (b[:, 2:] - b[:, :2]).prod(dim=1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-12)


class RandomIoUCrop:
    """SSD-style random crop that keeps objects meaningful.

    Each call draws a minimum overlap from ``min_ious`` (``None`` in the list means "do not crop"); then up to
    ``trials`` crops with sides ``min_scale..max_scale`` of the image's and aspect ratio (w/h relative to the image's)
    within ``[min_aspect_ratio, max_aspect_ratio]`` are drawn, and the first one accepted is used. A crop is accepted
    when some object box overlaps it with IoU >= the drawn minimum and at least one object survives the box rule in
    the module docstring. If none is accepted (or the draw was ``None``) the sample is returned unchanged. Images
    without objects get a plain random crop.
    """

    def __init__(self, min_scale: float = 0.3, max_scale: float = 1.0, min_aspect_ratio: float = 0.5,
                 max_aspect_ratio: float = 2.0, min_ious: Sequence[float | None] = (None, 0.0, 0.1, 0.3, 0.5, 0.7),
                 trials: int = 40, min_visible: float = DEFAULT_MIN_VISIBLE, generator: torch.Generator | None = None):
        if not 0 < min_scale <= max_scale <= 1:
            raise ValueError(f"need 0 < min_scale <= max_scale <= 1, got {min_scale}, {max_scale}")
        if not 0 < min_aspect_ratio <= max_aspect_ratio:
            raise ValueError(f"need 0 < min_aspect_ratio <= max_aspect_ratio, got {min_aspect_ratio}, "
                             f"{max_aspect_ratio}")
        if not min_ious or any(v is not None and not 0 <= v <= 1 for v in min_ious):
            raise ValueError(f"min_ious must be a non-empty list of values in [0, 1] or None, got {min_ious!r}")
        if trials < 1:
            raise ValueError(f"trials must be >= 1, got {trials}")
        self.min_scale, self.max_scale = min_scale, max_scale
        self.min_aspect_ratio, self.max_aspect_ratio = min_aspect_ratio, max_aspect_ratio
        self.min_ious = list(min_ious)
        self.trials = trials
        self.min_visible = min_visible
        self.generator = generator

    def __call__(self, image, target=None):
        image = _check_image(image)
        target = _check_target(target)
        height, width = image.shape[-2:]
        g = self.generator
        min_iou = self.min_ious[int(torch.randint(len(self.min_ious), (), generator=g))]
        if min_iou is None:
            return image, target
        boxes = None if target is None else target["boxes"]
        for _ in range(self.trials):
            scale_w = _uniform(self.min_scale, self.max_scale, g)
            scale_h = _uniform(self.min_scale, self.max_scale, g)
            if not self.min_aspect_ratio <= scale_w / scale_h <= self.max_aspect_ratio:
                continue
            crop_w, crop_h = max(int(width * scale_w), 1), max(int(height * scale_h), 1)
            left = int(_rand(g) * (width - crop_w + 1))
            top = int(_rand(g) * (height - crop_h + 1))
            cropped = _with_masks(target, lambda m: m[:, top:top + crop_h, left:left + crop_w].clone())
            if boxes is None or boxes.shape[0] == 0:
                new_target = None if target is None else update_boxes(
                    cropped, boxes.reshape(-1, 4), crop_w, crop_h, regions=self._regions(target, left, top))
                return image[:, top:top + crop_h, left:left + crop_w].clone(), new_target
            crop = boxes.new_tensor([[left, top, left + crop_w, top + crop_h]])
            if _box_iou(boxes.float(), crop.float()).max() < min_iou:
                continue
            shifted = boxes - boxes.new_tensor([left, top, left, top])
            new_target = update_boxes(cropped, shifted, crop_w, crop_h, min_visible=self.min_visible,
                                      regions=self._regions(target, left, top))
            if new_target["boxes"].shape[0] == 0:
                continue
            return image[:, top:top + crop_h, left:left + crop_w].clone(), new_target
        return image, target

    @staticmethod
    def _regions(target, left, top):
        return moved_regions(target, lambda b: b - b.new_tensor([left, top, left, top]))

    def __repr__(self) -> str:
        return (f"RandomIoUCrop(scale=({self.min_scale}, {self.max_scale}), aspect=({self.min_aspect_ratio}, "
                f"{self.max_aspect_ratio}), min_ious={self.min_ious}, trials={self.trials})")


def _grey(image: torch.Tensor) -> torch.Tensor:
    if image.shape[0] == 1:
        return image
    weights = image.new_tensor([0.299, 0.587, 0.114]).view(3, 1, 1)  # ITU-R BT.601 luma
    return (image * weights).sum(dim=0, keepdim=True)


class ColorJitter:
    """Random brightness, contrast, saturation and hue changes (in a random order); boxes are untouched.

    ``brightness``, ``contrast`` and ``saturation`` ``b`` draw a factor from ``[max(0, 1 - b), 1 + b]``: brightness
    multiplies the image, contrast blends it with its mean grey level, saturation with its grey image. ``hue`` ``h``
    (at most 0.5) rotates the chroma of every pixel by an angle drawn from ``[-h, h]`` turns (in YIQ space, which keeps
    the luma). The result is clamped to ``[0, 1]``.
    """

    def __init__(self, brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.2, hue: float = 0.02,
                 generator: torch.Generator | None = None):
        for name, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not 0 <= hue <= 0.5:
            raise ValueError(f"hue must lie in [0, 0.5], got {hue}")
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.generator = generator

    def _factor(self, spread: float) -> float:
        return _uniform(max(0.0, 1.0 - spread), 1.0 + spread, self.generator)

    def __call__(self, image, target=None):
        image = _check_image(image)
        out = image
        for step in torch.randperm(4, generator=self.generator).tolist():
            if step == 0 and self.brightness:
                out = out * self._factor(self.brightness)
            elif step == 1 and self.contrast:
                factor = self._factor(self.contrast)
                out = out * factor + _grey(out).mean() * (1 - factor)
            elif step == 2 and self.saturation and out.shape[0] == 3:
                factor = self._factor(self.saturation)
                out = out * factor + _grey(out) * (1 - factor)
            elif step == 3 and self.hue and out.shape[0] == 3:
                angle = _uniform(-self.hue, self.hue, self.generator) * 2 * math.pi
                out = _rotate_hue(out, angle)
            out = out.clamp(0.0, 1.0)
        return (out.clone() if out is image else out), target

    def __repr__(self) -> str:
        return (f"ColorJitter(brightness={self.brightness}, contrast={self.contrast}, saturation={self.saturation}, "
                f"hue={self.hue})")


def _rotate_hue(image: torch.Tensor, angle: float) -> torch.Tensor:
    to_yiq = image.new_tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    cos, sin = math.cos(angle), math.sin(angle)
    rotate = image.new_tensor([[1, 0, 0], [0, cos, -sin], [0, sin, cos]])
    matrix = torch.linalg.inv(to_yiq) @ rotate @ to_yiq
    return torch.einsum("ij,jhw->ihw", matrix, image)


class RandomAffine:
    """Random rotation, translation, scaling and shear about the image centre (output size = input size).

    Args:
        degrees: rotation angle drawn from ``[-degrees, degrees]``.
        translate: ``(tx, ty)``: shifts drawn from ``[-tx * W, tx * W]`` and ``[-ty * H, ty * H]``.
        scale: ``(low, high)`` zoom factor range.
        shear: horizontal shear angle drawn from ``[-shear, shear]`` degrees.
        fill: value of pixels coming from outside the input.
        min_visible: the box rule's threshold (see the module docstring).

    A box becomes the axis-aligned box around its four transformed corners: exact for translation and scaling,
    looser than the object under rotation or shear (the usual compromise for box-only labels).
    """

    def __init__(self, degrees: float = 0.0, translate: Sequence[float] = (0.0, 0.0),
                 scale: Sequence[float] = (1.0, 1.0), shear: float = 0.0, fill: float = 0.0,
                 min_visible: float = DEFAULT_MIN_VISIBLE, generator: torch.Generator | None = None):
        if degrees < 0 or shear < 0:
            raise ValueError(f"degrees and shear must be >= 0, got {degrees}, {shear}")
        if len(translate) != 2 or not all(0 <= t <= 1 for t in translate):
            raise ValueError(f"translate must be (tx, ty) within [0, 1], got {translate!r}")
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {scale!r}")
        self.degrees, self.translate, self.scale, self.shear = degrees, tuple(translate), tuple(scale), shear
        self.fill = fill
        self.min_visible = min_visible
        self.generator = generator

    def sample_matrix(self, height: int, width: int) -> torch.Tensor:
        """The 3x3 forward matrix (input pixel coordinates -> output pixel coordinates) of one random draw."""
        g = self.generator
        angle = math.radians(_uniform(-self.degrees, self.degrees, g))
        shear = math.radians(_uniform(-self.shear, self.shear, g))
        zoom = _uniform(self.scale[0], self.scale[1], g)
        tx = _uniform(-self.translate[0], self.translate[0], g) * width
        ty = _uniform(-self.translate[1], self.translate[1], g) * height
        cx, cy = width / 2, height / 2
        centre = torch.tensor([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]], dtype=torch.float64)
        rotate = torch.tensor([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0],
                               [0, 0, 1]], dtype=torch.float64)
        shear_m = torch.tensor([[1, math.tan(shear), 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
        back = torch.tensor([[zoom, 0, cx + tx], [0, zoom, cy + ty], [0, 0, 1]], dtype=torch.float64)
        return back @ rotate @ shear_m @ centre

    def __call__(self, image, target=None):
        image = _check_image(image)
        target = _check_target(target)
        height, width = image.shape[-2:]
        forward = self.sample_matrix(height, width)
        warped = _warp(image, torch.linalg.inv(forward), self.fill)
        if target is None:
            return warped, None
        inverse = torch.linalg.inv(forward)
        target = _with_masks(target, lambda m: m.clone() if m.shape[0] == 0 else
                             _warp(m.float(), inverse, 0.0, mode="nearest").round().to(m.dtype))
        return warped, update_boxes(target, _transform_boxes(target["boxes"], forward), width, height,
                                    min_visible=self.min_visible,
                                    regions=moved_regions(target, lambda b: _transform_boxes(b, forward)))

    def __repr__(self) -> str:
        return (f"RandomAffine(degrees={self.degrees}, translate={self.translate}, scale={self.scale}, "
                f"shear={self.shear})")


def _transform_boxes(boxes: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    if boxes.shape[0] == 0:
        return boxes.clone()
    x1, y1, x2, y2 = boxes.double().unbind(dim=1)
    corners = torch.stack([torch.stack([x1, y1], 1), torch.stack([x2, y1], 1), torch.stack([x1, y2], 1),
                           torch.stack([x2, y2], 1)], dim=1)  # [N, 4, 2]
    moved = corners @ matrix[:2, :2].T + matrix[:2, 2]
    return torch.cat([moved.amin(dim=1), moved.amax(dim=1)], dim=1).to(boxes.dtype)


def _warp(image: torch.Tensor, inverse: torch.Tensor, fill: float, mode: str = "bilinear") -> torch.Tensor:
    """Sample ``image`` (``[C, H, W]``) at ``inverse @ (x, y)`` for every output pixel centre (bilinear, or nearest
    for masks)."""
    height, width = image.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64) + 0.5,
                            torch.arange(width, dtype=torch.float64) + 0.5, indexing="ij")
    src_x = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    src_y = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    # grid_sample with align_corners=False puts -1 and 1 at the outer pixel edges, i.e. x = 0 and x = W.
    grid = torch.stack([src_x / width * 2 - 1, src_y / height * 2 - 1], dim=-1).to(image.dtype)
    inside = F.grid_sample(torch.ones_like(image[:1])[None], grid[None], mode="bilinear", padding_mode="zeros",
                           align_corners=False)[0]
    warped = F.grid_sample(image[None], grid[None], mode=mode, padding_mode="zeros", align_corners=False)[0]
    return warped + (1 - inside) * fill


class Normalize:
    """``(image - mean) / std`` per channel (defaults: ImageNet statistics for 0..1 RGB). Boxes are untouched."""

    def __init__(self, mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225)):
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"mean and std need one value per channel and std > 0, got {mean!r}, {std!r}")
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def __call__(self, image, target=None):
        image = _check_image(image)
        if image.shape[0] != len(self.mean):
            raise ValueError(f"image has {image.shape[0]} channels but mean/std have {len(self.mean)}")
        mean = image.new_tensor(self.mean).view(-1, 1, 1)
        std = image.new_tensor(self.std).view(-1, 1, 1)
        return (image - mean) / std, target

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"
