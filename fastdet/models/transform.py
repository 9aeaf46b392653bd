"""Input and output transform of the detectors: normalise, resize, pad to a batch, and map boxes back.

``DetectionTransform`` reproduces torchvision's ``GeneralizedRCNNTransform`` numerically:

* normalise: ``(image - mean) / std`` per channel, in the image's dtype;
* resize (bilinear, ``align_corners=False``): the scale is ``min(min_size / shorter_side, max_size / longer_side)``
  computed in Python floats, handed to ``F.interpolate`` with ``recompute_scale_factor=True`` (so the output size is
  ``floor(side * scale)`` and the sampling grid uses ``side_in / side_out``); ``fixed_size = (width, height)`` instead
  resizes every image to exactly that size (SSD-style);
* boxes are multiplied by ``new_side / old_side`` computed as a float32 division, x by the width ratio and y by the
  height ratio;
* pad: images are copied into the top-left corner of a zero tensor whose height and width are the batch maxima
  rounded up to a multiple of ``size_divisible``.

Resizing loops over the images: they arrive with different sizes, so each needs its own interpolation call (the same
is true of torchvision). Everything after batching is tensor code over the whole batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DetectionTransform", "ImageBatch", "batched_postprocess_boxes", "resize_boxes"]


# torchvision's ImageNet normalisation, the default of the detectors' transforms.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageBatch:
    """A padded batch of images and the size of each image before padding.

    Attributes:
        tensors (Tensor[B, C, H, W]): the padded batch.
        image_sizes (list of (int, int)): ``(height, width)`` of each resized image inside the padding.
    """

    def __init__(self, tensors: Tensor, image_sizes: list[tuple[int, int]]):
        self.tensors = tensors
        self.image_sizes = image_sizes

    def to(self, device, **kwargs) -> "ImageBatch":
        return ImageBatch(self.tensors.to(device, **kwargs), self.image_sizes)

    def __repr__(self) -> str:
        return f"ImageBatch(tensors={tuple(self.tensors.shape)}, image_sizes={self.image_sizes})"


def _size_ratios(new_sizes, old_sizes, device) -> Tensor:
    """``[B, 2]`` float32 ratios ``(new_h / old_h, new_w / old_w)``, each a single float32 division as torchvision's
    ``resize_boxes`` computes it."""
    new = torch.tensor([[float(h), float(w)] for h, w in new_sizes], dtype=torch.float32)
    old = torch.tensor([[float(h), float(w)] for h, w in old_sizes], dtype=torch.float32)
    ratios = new / old
    if torch.device(device).type == "cuda" and not torch.compiler.is_compiling():
        # A pinned, non-blocking copy is queued on the stream instead of blocking the host.
        return ratios.pin_memory().to(device, non_blocking=True)
    return ratios.to(device)


def resize_boxes(boxes: Tensor, original_size: Sequence[int], new_size: Sequence[int]) -> Tensor:
    """Scale ``boxes (Tensor[N, 4])`` (xyxy) of an image of ``original_size (h, w)`` to one of ``new_size (h, w)``.
    Returns a new tensor of ``boxes.dtype``."""
    ratios = _size_ratios([new_size], [original_size], boxes.device)[0]
    return _scale_xyxy(boxes, ratios[0], ratios[1])


def _scale_xyxy(boxes: Tensor, ratio_h: Tensor, ratio_w: Tensor) -> Tensor:
    # Multiply in float32 (the ratios' dtype) or wider, then return the boxes' own dtype.
    dtype = boxes.dtype
    compute = boxes if dtype == torch.float64 else boxes.float()
    x1, y1, x2, y2 = compute.unbind(-1)
    scaled = torch.stack((x1 * ratio_w, y1 * ratio_h, x2 * ratio_w, y2 * ratio_h), dim=-1)
    return scaled.to(dtype)


def batched_postprocess_boxes(boxes: Tensor, image_sizes: Sequence[tuple[int, int]],
                              original_image_sizes: Sequence[tuple[int, int]]) -> Tensor:
    """Map ``boxes (Tensor[B, K, 4])`` (xyxy, in resized-image pixels) back to the original images, one multiplication
    for the whole batch (no loop over images). Padding slots are scaled too (0 stays 0)."""
    if boxes.dim() != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape [B, K, 4], got {tuple(boxes.shape)}")
    if len(image_sizes) != boxes.shape[0] or len(original_image_sizes) != boxes.shape[0]:
        raise ValueError(f"image_sizes ({len(image_sizes)}) and original_image_sizes ({len(original_image_sizes)}) "
                         f"must have one entry per image of boxes ({boxes.shape[0]})")
    ratios = _size_ratios(original_image_sizes, image_sizes, boxes.device)
    return _scale_xyxy(boxes, ratios[:, 0:1], ratios[:, 1:2])


class DetectionTransform(nn.Module):
    """Normalise, resize and batch images (and rescale their target boxes) for a detector; map detections back.

    Args:
        min_size (int or sequence of int): target length of the shorter side. A sequence means multi-scale training:
            each training image draws one entry uniformly (torchvision's rule, using torch's RNG); evaluation uses
            the last entry.
        max_size (int): upper bound on the longer side.
        image_mean, image_std (3 floats): per-channel normalisation.
        size_divisible (int): padded height and width are multiples of this.
        fixed_size ((int, int), optional): ``(width, height)``; if given, every image is resized to exactly this size
            (aspect ratio not kept) instead of the min/max rule.

    ``forward(images, targets=None) -> (ImageBatch, targets)``. Targets are shallow-copied dicts with new ``"boxes"``
    (and, where present, ``"masks"``) tensors; the caller's dicts and tensors are never modified.
    """

    def __init__(self, min_size, max_size: int, image_mean: Sequence[float], image_std: Sequence[float],
                 size_divisible: int = 32, fixed_size: tuple[int, int] | None = None):
        super().__init__()
        if isinstance(min_size, int):
            min_size = (min_size,)
        min_size = tuple(min_size)
        if len(min_size) == 0 or not all(isinstance(s, int) and s > 0 for s in min_size):
            raise ValueError(f"min_size must be a positive int or a non-empty sequence of them, got {min_size!r}")
        if not isinstance(max_size, int) or max_size <= 0:
            raise ValueError(f"max_size must be a positive int, got {max_size!r}")
        if len(image_mean) != len(image_std) or not all(s != 0 for s in image_std):
            raise ValueError(f"image_mean and image_std must have one entry per channel and std must be non-zero, got "
                             f"{list(image_mean)} and {list(image_std)}")
        if not isinstance(size_divisible, int) or size_divisible <= 0:
            raise ValueError(f"size_divisible must be a positive int, got {size_divisible!r}")
        if fixed_size is not None:
            fixed_size = tuple(fixed_size)
            if len(fixed_size) != 2 or not all(isinstance(s, int) and s > 0 for s in fixed_size):
                raise ValueError(f"fixed_size must be (width, height) positive ints, got {fixed_size!r}")
        self.min_size = min_size
        self.max_size = max_size
        self.image_mean = [float(m) for m in image_mean]
        self.image_std = [float(s) for s in image_std]
        self.size_divisible = size_divisible
        self.fixed_size = fixed_size

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
                ) -> tuple[ImageBatch, list[dict[str, Tensor]] | None]:
        if targets is not None:
            if len(targets) != len(images):
                raise ValueError(f"targets must have one dict per image: got {len(targets)} for {len(images)} images")
            targets = [dict(t) for t in targets]
        resized = []
        for i, image in enumerate(images):
            if image.dim() != 3:
                raise ValueError(f"images[{i}] must have shape [C, H, W], got {tuple(image.shape)}")
            image = self.normalize(image)
            old_size = tuple(image.shape[-2:])
            if targets is not None and "masks" in targets[i]:
                image, targets[i]["masks"] = self.resize(image, targets[i]["masks"])
            else:
                image = self.resize(image)
            if targets is not None:
                targets[i]["boxes"] = resize_boxes(targets[i]["boxes"], old_size, image.shape[-2:])
            resized.append(image)
        image_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in resized]
        return ImageBatch(self.batch_images(resized), image_sizes), targets

    def normalize(self, image: Tensor) -> Tensor:
        if not image.is_floating_point():
            raise TypeError(f"images must be floating point with values in [0, 1], got {image.dtype}")
        if image.shape[0] != len(self.image_mean):
            raise ValueError(f"images must have {len(self.image_mean)} channels to match image_mean, got shape "
                             f"{tuple(image.shape)}")
        mean = torch.as_tensor(self.image_mean, dtype=image.dtype, device=image.device)
        std = torch.as_tensor(self.image_std, dtype=image.dtype, device=image.device)
        return (image - mean[:, None, None]) / std[:, None, None]

    def _training_min_size(self) -> int:
        if not self.training:
            return self.min_size[-1]
        # torchvision draws the index as floor(U[0, n)) from torch's RNG on every training image; doing the same keeps
        # the RNG stream of a fastdet model in step with a torchvision model under the same seed.
        index = int(torch.empty(1).uniform_(0.0, float(len(self.min_size))).item())
        return self.min_size[index]

    def resize(self, image: Tensor, masks: Tensor | None = None):
        """Resize one normalised ``Tensor[C, H, W]`` (bilinear, align_corners=False). With ``masks`` (a target's
        instance masks ``[N, H, W]``), returns ``(image, masks)``: the masks resized by the same factor with nearest
        interpolation, as uint8 (torchvision's rule)."""
        target_min = self._training_min_size()
        if self.fixed_size is not None:
            size_args = {"size": [self.fixed_size[1], self.fixed_size[0]]}
        else:
            height, width = image.shape[-2:]
            scale = min(target_min / min(height, width), self.max_size / max(height, width))
            size_args = {"scale_factor": scale, "recompute_scale_factor": True}
        image = F.interpolate(image[None], mode="bilinear", align_corners=False, **size_args)[0]
        if masks is None:
            return image
        return image, F.interpolate(masks[:, None].float(), **size_args)[:, 0].byte()

    def batch_images(self, images: list[Tensor]) -> Tensor:
        """Zero-pad images to a common ``[C, H, W]`` with H and W rounded up to multiples of ``size_divisible``."""
        channels = max(img.shape[0] for img in images)
        stride = float(self.size_divisible)
        height = int(math.ceil(max(img.shape[1] for img in images) / stride) * stride)
        width = int(math.ceil(max(img.shape[2] for img in images) / stride) * stride)
        padded = [F.pad(img, (0, width - img.shape[2], 0, height - img.shape[1], 0, channels - img.shape[0]))
                  for img in images]
        return torch.stack(padded)

    def postprocess(self, detections: list[dict[str, Tensor]], image_sizes: Sequence[tuple[int, int]],
                    original_image_sizes: Sequence[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Rescale each detection dict's ``"boxes"`` from the resized image to the original one. Returns new dicts
        (other keys shared); unlike torchvision, this is also done in training mode if asked."""
        if not (len(detections) == len(image_sizes) == len(original_image_sizes)):
            raise ValueError(f"detections ({len(detections)}), image_sizes ({len(image_sizes)}) and "
                             f"original_image_sizes ({len(original_image_sizes)}) must have the same length")
        out = []
        for det, size, original in zip(detections, image_sizes, original_image_sizes):
            det = dict(det)
            det["boxes"] = resize_boxes(det["boxes"], size, original)
            out.append(det)
        return out

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(mean={self.image_mean}, std={self.image_std}, min_size={self.min_size}, "
                f"max_size={self.max_size}, size_divisible={self.size_divisible}, fixed_size={self.fixed_size})")
