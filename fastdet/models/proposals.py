"""External region proposals for the detectors that do not learn their own (R-CNN; Fast R-CNN and SPP-Net may use the
same): a selective-search proposal generator with a cap per image, and the checks and padding of proposal lists.

Proposals are a list with one ``Tensor[K_i, 4]`` (xyxy, image pixels) per image, on the images' device. Padded to a
batch they become ``boxes [B, P, 4]`` and ``valid [B, P]`` (``P = max(1, max K_i)``; padding slots hold zero boxes and
``valid = False``), the layout of :class:`fastdet.models.targets.PaddedTargets`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdet.models.targets import pad_box_lists
from fastdet.ops import selective_search

__all__ = ["SelectiveSearchProposals", "check_proposals", "pad_proposals"]


def _positive_int_or_none(value, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    return value


class SelectiveSearchProposals:
    """``generator(images, training) -> list[Tensor[K_i, 4]]``: :func:`fastdet.ops.selective_search` on every image,
    at most ``max_proposals_train`` / ``max_proposals_test`` boxes per image (the best ranked), float32 on the image's
    device.

    Args:
        mode (str): selective search's diversification mode (``"fast"``, the paper's R-CNN setting; ``"single"``,
            ``"quality"``).
        max_proposals_train, max_proposals_test (int or None): caps per image (R-CNN: 2000 both in the paper; None =
            all).
        max_side (int or None): an image whose longer side exceeds this is downscaled (bilinear) before the search
            and the boxes scaled back (selective search's cost grows with the pixel count; the paper works at about
            500 pixels; the op accepts at most 2048). None searches at full size.
        seed (int): seed of the proposal ranking's random draw (the same image always gives the same proposals).
        **search_kwargs: other :func:`fastdet.ops.selective_search` arguments (``min_size``, ``sigma``,
            ``strategies``).

    Selective search runs on the CPU (images elsewhere are copied there) one image at a time, its strategies in
    parallel on torch's intra-op threads. Boxes use the op's convention (``x2``, ``y2`` exclusive: the whole image is
    ``(0, 0, W, H)``).
    """

    def __init__(self, mode: str = "fast", max_proposals_train: int | None = 2000,
                 max_proposals_test: int | None = 1000, max_side: int | None = 500, seed: int = 0, **search_kwargs):
        self.mode = mode
        self.max_proposals_train = _positive_int_or_none(max_proposals_train, "max_proposals_train")
        self.max_proposals_test = _positive_int_or_none(max_proposals_test, "max_proposals_test")
        self.max_side = _positive_int_or_none(max_side, "max_side")
        self.seed = seed
        self.search_kwargs = dict(search_kwargs)
        # Fail on a bad mode or argument now, not at the first training step.
        selective_search(torch.zeros(3, 2, 2), mode, max_proposals=1, seed=seed, **self.search_kwargs)

    def __call__(self, images: list[Tensor], training: bool = False) -> list[Tensor]:
        cap = self.max_proposals_train if training else self.max_proposals_test
        return [self.propose(image, cap) for image in images]

    def propose(self, image: Tensor, max_proposals: int | None) -> Tensor:
        """Proposals of one ``Tensor[3, H, W]`` image (floating in [0, 1] or uint8), ``Tensor[K, 4]`` float32 on its
        device."""
        height, width = image.shape[-2:]
        search_image = image.detach().cpu()
        scale = 1.0
        if self.max_side is not None and max(height, width) > self.max_side:
            scale = self.max_side / max(height, width)
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            search_image = F.interpolate(search_image[None].float(), size=size, mode="bilinear",
                                         align_corners=False)[0]
            if not image.is_floating_point():
                search_image = search_image.round().clamp(0, 255).to(image.dtype)
        boxes = selective_search(search_image, self.mode, max_proposals=max_proposals, seed=self.seed,
                                 **self.search_kwargs)
        if scale != 1.0:
            factors = torch.tensor([width / search_image.shape[-1], height / search_image.shape[-2]] * 2)
            boxes = boxes * factors
        return boxes.to(image.device)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(mode={self.mode!r}, max_proposals_train={self.max_proposals_train}, "
                f"max_proposals_test={self.max_proposals_test}, max_side={self.max_side}, seed={self.seed})")


def check_proposals(proposals, num_images: int, device: torch.device | None = None) -> None:
    """Check user-given proposals: a list of ``num_images`` floating ``Tensor[K_i, 4]`` with finite coordinates on
    ``device``; raise ``TypeError``/``ValueError`` naming the bad entry."""
    if isinstance(proposals, Tensor) or not isinstance(proposals, (list, tuple)):
        raise TypeError(f"proposals must be a list of Tensor[K, 4] (one per image), got {type(proposals).__name__}")
    if len(proposals) != num_images:
        raise ValueError(f"proposals must have one entry per image: got {len(proposals)} for {num_images} images")
    for i, boxes in enumerate(proposals):
        if not isinstance(boxes, Tensor):
            raise TypeError(f"proposals[{i}] must be a Tensor[K, 4], got {type(boxes).__name__}")
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"proposals[{i}] must have shape [K, 4] (x1, y1, x2, y2), got {tuple(boxes.shape)}")
        if not boxes.is_floating_point():
            raise TypeError(f"proposals[{i}] must be a floating-point tensor, got {boxes.dtype}")
        if device is not None and boxes.device != device:
            raise ValueError(f"proposals[{i}] is on {boxes.device}, the images on {device}")
    finite = [torch.isfinite(b).all() for b in proposals if b.numel() > 0]
    if finite and not bool(torch.stack(finite).all()):
        bad = next(i for i, b in enumerate(proposals) if b.numel() > 0 and not bool(torch.isfinite(b).all()))
        raise ValueError(f"proposals[{bad}] contains NaN or infinite coordinates")


def pad_proposals(proposals: list[Tensor], max_per_image: int | None = None) -> tuple[Tensor, Tensor]:
    """Per-image proposals (each truncated to its first ``max_per_image``) -> ``(boxes [B, P, 4] float32, valid
    [B, P] bool)``, the padding of the module docstring."""
    if max_per_image is not None:
        proposals = [b[:max_per_image] for b in proposals]
    boxes = [b.float() for b in proposals]
    padded, _, valid = pad_box_lists(boxes, [b.new_zeros(b.shape[0], dtype=torch.int64) for b in boxes])
    return padded, valid

